"""Data pipeline: samples/s with 0, 1 and 2 DataLoader workers, and peak RSS at 100k and 10M rows.

    python bench/bench_loader.py                 # makes /tmp/bench_data/synthetic_{100000,10m}.parquet once

Each figure comes from a fresh child process that builds the training stream exactly as the
trainer does (model.dataset.TrainStream, batch 16, max_seq_len 256, buffer 10000) and reads
`rows` rows (100k by default, from either file). Peak RSS is that child's ru_maxrss from
os.wait4, which covers parquet reading, tokenization and batching; with workers it is the
largest of the process and its workers (which do the reading and tokenizing).
"""
import sys
import time

import fire

from common import measure, synthetic, tokenizer


def read_rows(file: str, workers: int, rows: int, buffer_size: int = 10000):
    from model.dataset import TrainStream, get_train_loader
    from utils.tokenizer import load_tokenizer
    tok = load_tokenizer(tokenizer())
    if rows == 0:  # the baseline: libraries and tokenizer loaded, nothing read
        return
    stream = TrainStream([file], tok, 16, 256, buffer_size, seed=0, num_workers=workers)
    seen, started = 0, time.perf_counter()
    for batch in get_train_loader(stream, workers):
        seen += len(batch["row_index"])
        if seen >= rows:
            break
    print(f"RESULT {seen / (time.perf_counter() - started):.0f}")


def main(rows: int = 100_000, small_rows: int = 100_000, big_rows: int = 10_000_000, child_file: str = "",
         workers: int = 0):
    if child_file:  # one measured run, in its own process
        return read_rows(child_file, workers, rows)
    files = {"100k": synthetic(small_rows), "10M": synthetic(big_rows)}
    tokenizer()
    baseline = measure([sys.executable, "bench/bench_loader.py", f"--child_file={files['100k']}", "--rows=0"])
    print(f"reading {rows:,} rows per run (batch 16, max_seq_len 256, buffer 10000 rows); a process that only "
          f"imports torch, transformers and the tokenizer peaks at {baseline['peak_rss_gb']:.2f} GB")
    print(f"{'file':>6} {'workers':>8} {'samples/s':>10} {'peak RSS GB':>12} {'minus imports':>14}")
    for name, path in files.items():
        for workers in (0, 1, 2):
            if name == "100k" and workers:
                continue
            r = measure([sys.executable, "bench/bench_loader.py", f"--child_file={path}",
                         f"--workers={workers}", f"--rows={rows}"])
            rate = next((line.split()[1] for line in r["output"].splitlines() if line.startswith("RESULT")), "failed")
            print(f"{name:>6} {workers:>8} {rate:>10} {r['peak_rss_gb']:12.2f} "
                  f"{r['peak_rss_gb'] - baseline['peak_rss_gb']:14.2f}")


if __name__ == "__main__":
    fire.Fire(main)
