"""Benchmark sample_training_data.py against pandas load-sample-write baselines.

    pip install -r bench/requirements-bench.txt   # pandas, for the baselines only
    python bench/make_synthetic_parquet.py --rows 10000000 --output /tmp/bench_data/synthetic_10m.parquet
    python bench/bench_sampling.py --input /tmp/bench_data/synthetic_10m.parquet --num_samples 3000000

Each mode runs in a fresh subprocess, one at a time; wall time is measured
around it and peak RSS is the child's ru_maxrss (os.wait4). The input is read
once first so every mode finds it in the page cache. Modes:
- random, smart, near_dup: this project's sampler (near_dup = --smart --near_dup);
- pandas_random: pd.read_parquet, DataFrame.sample, to_parquet;
- pandas_smart: the fork's smart mode: the rows with the highest character
  entropy of the prompt among a random 2x subset, with fixed length cut-offs.
Figures, not pass/fail: the table marks each against the issue's target.
"""
import math
import os
import sys
from collections import Counter

import fire

from common import measure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_MODES = ("pandas_random", "random", "pandas_smart", "smart", "near_dup")
OUR_FLAGS = {"random": [], "smart": ["--smart"], "near_dup": ["--smart", "--near_dup"]}
BASELINE_OF = {"random": "pandas_random", "smart": "pandas_smart", "near_dup": "pandas_smart"}
# The targets at 10M -> 3M rows: (max wall s or None, max wall ratio to baseline or None, max GB)
TARGETS = {"random": (None, 0.7, 0.5), "smart": (200, None, 2.0), "near_dup": (600, None, 4.0)}
# The fork's fixed length cut-offs (characters) of its smart mode.
FORK_MIN_CHARS, FORK_MAX_CHARS = 5, 320


def _prompt_entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(c / len(text) * math.log2(c / len(text)) for c in counts.values())


def run_pandas_baseline(kind: str, input: str, output: str, num_samples: int, seed: int):  # noqa: A002
    """What the fork did: load everything into pandas, sample, write."""
    import pandas as pd

    frame = pd.read_parquet(input)
    if kind == "random":
        frame = frame.sample(n=num_samples, random_state=seed)
    else:
        frame = frame.sample(n=min(2 * num_samples, len(frame)), random_state=seed)
        lengths_ok = (frame["prompt"].str.len().between(FORK_MIN_CHARS, FORK_MAX_CHARS)
                      & frame["response"].str.len().between(FORK_MIN_CHARS, FORK_MAX_CHARS))
        frame = frame[lengths_ok]
        entropy = frame["prompt"].map(_prompt_entropy)
        frame = frame.loc[entropy.nlargest(num_samples).index]
    frame.to_parquet(output, index=False)


def _warm_page_cache(path: str):
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def _target_note(mode: str, wall: float, rss: float, baseline_wall: float | None) -> str:
    if mode not in TARGETS:
        return ""
    max_wall, max_ratio, max_gb = TARGETS[mode]
    parts = []
    if max_wall is not None:
        parts.append(f"<= {max_wall} s {'ok' if wall <= max_wall else 'MISSED'}")
    if max_ratio is not None and baseline_wall:
        parts.append(f"<= {max_ratio}x {'ok' if wall <= max_ratio * baseline_wall else 'MISSED'}")
    parts.append(f"<= {max_gb} GB {'ok' if rss <= max_gb else 'MISSED'}")
    return ", ".join(parts)


def main(input: str, num_samples: int = 3_000_000, modes: str = ",".join(ALL_MODES),  # noqa: A002
         workdir: str = "/tmp/bench_out", seed: int = 42, repeat: int = 1, baseline: str | None = None,
         output: str | None = None):
    """Run each of `modes` (comma-separated, from ALL_MODES) `repeat` times and print a table.

    `--baseline random|smart --output PATH` runs one pandas baseline in this process
    (the benchmark starts itself that way).
    """
    if baseline is not None:
        return run_pandas_baseline(baseline, input, output, num_samples, seed)
    modes = modes.split(",") if isinstance(modes, str) else list(modes)
    unknown = set(modes) - set(ALL_MODES)
    if unknown:
        sys.exit(f"error: unknown modes {sorted(unknown)}: choose from {', '.join(ALL_MODES)}")
    if not os.path.isfile(input):
        sys.exit(f"error: input {input} does not exist: make it with bench/make_synthetic_parquet.py")
    os.makedirs(workdir, exist_ok=True)
    _warm_page_cache(input)
    results = {}
    for mode in modes:
        for attempt in range(repeat):
            output_path = os.path.join(workdir, f"{mode}.parquet")
            if mode.startswith("pandas_"):
                command = [sys.executable, __file__, "--baseline", mode.removeprefix("pandas_"), "--input", input,
                           "--output", output_path, "--num_samples", str(num_samples), "--seed", str(seed)]
            else:
                command = [sys.executable, "sample_training_data.py", "--input", input, "--output", output_path,
                           "--num_samples", str(num_samples), "--seed", str(seed), "--progress", "False",
                           *OUR_FLAGS[mode]]
            run = measure(command)
            wall, rss, code = run["seconds"], run["peak_rss_gb"], run["returncode"]
            if os.path.exists(output_path):
                os.remove(output_path)
            print(f"{mode} run {attempt + 1}: {wall:.1f} s, {rss:.2f} GB peak RSS"
                  + ("" if code == 0 else f", FAILED with exit status {code}"), flush=True)
            if code == 0:
                results.setdefault(mode, []).append((wall, rss))

    print(f"\n{num_samples:,} rows sampled from {input} ({os.path.getsize(input) / 1e9:.2f} GB); "
          f"median of {repeat} run(s)")
    print("| mode | wall s | peak RSS GB | wall vs baseline | RSS vs baseline | target (at 10M -> 3M rows) |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    medians = {m: tuple(sorted(v)[len(v) // 2] for v in zip(*runs)) for m, runs in results.items()}
    for mode, (wall, rss) in medians.items():
        base = medians.get(BASELINE_OF.get(mode))
        vs_wall = f"{wall / base[0]:.2f}x" if base else ""
        vs_rss = f"{rss / base[1]:.2f}x" if base else ""
        note = _target_note(mode, wall, rss, base[0] if base else None)
        print(f"| {mode} | {wall:.1f} | {rss:.2f} | {vs_wall} | {vs_rss} | {note} |")


if __name__ == "__main__":
    fire.Fire(main)
