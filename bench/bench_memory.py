"""Peak RSS of a short training run on 100k and on 10M rows, with train.py and train_low_mem.py.

    python bench/bench_memory.py                 # uses /tmp/bench_data/synthetic_{100000,10m}.parquet

Each run: `<script> train --model_size=tiny --train_file=FILE --max_steps=30` with a tokenizer
trained on the real sample data and 64 rows of the real validation sample; peak RSS is the
training process's ru_maxrss (with its DataLoader workers, the largest of them).
"""
import os
import shutil
import sys

import fire

from common import DATA_DIR, SAMPLE_DIR, measure, synthetic, tokenizer


def main(small_rows: int = 100_000, big_rows: int = 10_000_000, steps: int = 30, model_size: str = "tiny"):
    files = {"100k": synthetic(small_rows), "10M": synthetic(big_rows)}
    print(f"{'script':18} {'rows':>5} {'peak RSS GB':>12} {'wall s':>7}")
    results = {}
    for script in ("train.py", "train_low_mem.py"):
        for name, path in files.items():
            out = os.path.join(DATA_DIR, "memory_run")
            shutil.rmtree(out, ignore_errors=True)
            r = measure([sys.executable, script, "train", f"--model_size={model_size}", f"--train_file={path}",
                         f"--max_steps={steps}", f"--tokenizer_dir={tokenizer()}", f"--output_dir={out}",
                         f"--train_state_dir={out}/state", "--log_with=none", "--max_eval_rows=64",
                         f"--validation_file={SAMPLE_DIR}/my_valid_dataset_1k.parquet"])
            if r["returncode"]:
                print(r["output"][-3000:])
                raise SystemExit(f"{script} failed on {name}")
            results[script, name] = r["peak_rss_gb"]
            print(f"{script:18} {name:>5} {r['peak_rss_gb']:12.2f} {r['seconds']:7.1f}")
    for script in ("train.py", "train_low_mem.py"):
        print(f"{script}: 10M / 100k peak RSS = {results[script, '10M'] / results[script, '100k']:.2f}x")


if __name__ == "__main__":
    fire.Fire(main)
