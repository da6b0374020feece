"""Shared by the benchmarks: measured child processes, synthetic data and a tokenizer."""
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DIR = os.path.join(ROOT, "..", "shared", "data", "chatlm_sample")
DATA_DIR = os.environ.get("CHATLM_BENCH_DATA", "/tmp/bench_data")
TOKENIZER_DIR = os.path.join(DATA_DIR, "tokenizer_8k")
sys.path.insert(0, ROOT)


def measure(command: list[str], until: str | None = None) -> dict:
    """Run `command` from the project root; wall seconds, peak RSS (GB, from os.wait4), output.

    With `until`, also the seconds until a line containing `until` was printed. Linux keeps
    ru_maxrss across exec, so a child reports at least its parent's size when it was forked:
    the benchmark parents import neither torch nor transformers, which keeps that floor low.
    """
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines, first_seen = [], None
    for line in child.stdout:
        lines.append(line)
        if until and first_seen is None and until in line:
            first_seen = time.perf_counter() - start
    _, status, usage = os.wait4(child.pid, 0)
    return {"seconds": time.perf_counter() - start, "until_seconds": first_seen,
            "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9, "returncode": os.waitstatus_to_exitcode(status),
            "output": "".join(lines)}


def synthetic(rows: int) -> str:
    """Path of a synthetic parquet with `rows` rows (bench/make_synthetic_parquet.py), made once."""
    name = f"synthetic_{rows // 1_000_000}m.parquet" if rows % 1_000_000 == 0 else f"synthetic_{rows}.parquet"
    path = os.path.join(DATA_DIR, name)
    if not os.path.isfile(path):
        os.makedirs(DATA_DIR, exist_ok=True)
        subprocess.run([sys.executable, "bench/make_synthetic_parquet.py", "--rows", str(rows), "--output", path],
                       cwd=ROOT, check=True)
    return path


def tokenizer() -> str:
    """A tokenizer trained on the real sample data, made once (in a child: see measure())."""
    if not os.path.isfile(os.path.join(TOKENIZER_DIR, "tokenizer.json")):
        subprocess.run([sys.executable, "train.py", "train_tokenizer",
                        f"--files={os.path.join(SAMPLE_DIR, 'my_train_dataset_3k.parquet')}",
                        f"--output_dir={TOKENIZER_DIR}", "--vocab_size=8000"], cwd=ROOT, check=True)
    return TOKENIZER_DIR
