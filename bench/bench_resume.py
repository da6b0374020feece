"""Resume 90% into a 10M-row epoch: seconds from start to the first training step.

    python bench/bench_resume.py                 # uses /tmp/bench_data/synthetic_10m.parquet

1. `train.py train` runs one step on the 10M-row file and saves a train state.
2. That state's data position is moved to 90% of the epoch (each window of the stream is
   named by arithmetic alone, so the position is a window number and a batch number), and
   its manifest rewritten.
3. `train.py train --is_keep_training=True` is timed until it logs its first step, beside a
   fresh run's time to its first step on the same file: the difference is the cost of resuming.
"""
import glob
import os
import shutil
import subprocess
import sys

import fire

from common import DATA_DIR, ROOT, measure, synthetic, tokenizer


def main(rows: int = 10_000_000, buffer_size: int = 10000, at: float = 0.9):
    data = synthetic(rows)
    out = os.path.join(DATA_DIR, "resume_run")
    shutil.rmtree(out, ignore_errors=True)
    flags = [f"--train_file={data}", f"--tokenizer_dir={tokenizer()}", "--model_size=tiny", f"--output_dir={out}",
             f"--train_state_dir={out}/state", "--validation_file=", "--log_with=none", "--logging_steps=1",
             "--batch_size_per_gpu=16", "--gradient_accumulation_steps=1", f"--dataloader_buffer_size={buffer_size}"]
    fresh = measure([sys.executable, "train.py", "train", *flags, "--max_steps=1"], until="step 1/")
    assert fresh["returncode"] == 0, fresh["output"][-3000:]
    state = sorted(glob.glob(f"{out}/state/step_*"))[-1]
    window = int(rows * at) // buffer_size
    # In a child, so that this process stays small (see common.measure).
    subprocess.run([sys.executable, "-c", f"""import json, os
import model.checkpoint as ckpt
path = os.path.join({state!r}, ckpt.STATE_JSON)
state = json.load(open(path))
state["data"][0]["positions"] = {{"0": [{window}, 3]}}
json.dump(state, open(path, "w"))
os.remove(os.path.join({state!r}, ckpt.MANIFEST))
ckpt.write_manifest({state!r})"""], check=True, cwd=ROOT)
    resumed = measure([sys.executable, "train.py", "train", *flags, "--is_keep_training=True", "--max_steps=2"],
                      until="step 2/")
    assert resumed["returncode"] == 0, resumed["output"][-3000:]
    print(f"resume at {at:.0%} of a {rows:,}-row epoch (window {window}, batch 3 of it)")
    print(f"fresh run, start to first step:   {fresh['until_seconds']:6.1f} s")
    print(f"resumed run, start to first step: {resumed['until_seconds']:6.1f} s "
          f"(peak RSS {resumed['peak_rss_gb']:.2f} GB)")


if __name__ == "__main__":
    fire.Fire(main)
