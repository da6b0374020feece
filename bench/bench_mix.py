"""Weighted sources: the share of rows each source gets over an epoch, and a resume mid-mix.

    python bench/bench_mix.py                     # 0.7/0.3 over two synthetic sources
    python bench/bench_mix.py --weights=0.5,0.3,0.2

Sources of different sizes (rows shaped like the real data, bench/make_synthetic_parquet.py)
are streamed by `TrainStream` as process 0 of `processes` reads them (its shard), batch 16,
windows of 10k rows. Printed per mix strategy: the rows taken from each
source after 1%, 10%, 50% and all of the epoch, against the weights, and whether a stream
resumed from a state saved a third of the way through yields the same batches as the rest of
the uninterrupted epoch.
"""
import json
import os
import sys

import fire
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model.dataset import TrainStream, get_sources  # noqa: E402
from utils.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402


def main(weights: str = "0.7,0.3", rows: str = "60000,40000", processes: int = 2, batch_size: int = 16,
         data_dir: str = "/tmp/chatlm_bench_mix", seed: int = 0):
    from make_synthetic_parquet import main as make_rows
    weights = [float(w) for w in str(weights).split(",")]
    sizes = [int(r) for r in str(rows).split(",")]
    os.makedirs(data_dir, exist_ok=True)
    files = []
    for i, n in enumerate(sizes):
        path = os.path.join(data_dir, f"source{i}_{n}.parquet")
        if not os.path.isfile(path):
            make_rows(rows=n, output=path, seed=i, row_group_size=10_000)
        files.append(path)
    tokenizer_dir = os.path.join(data_dir, "tokenizer")
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        train_tokenizer(files[0], tokenizer_dir, 4000, max_rows=20_000)
    tokenizer = load_tokenizer(tokenizer_dir)
    sources = get_sources(dict(zip(files, weights)))
    starts = np.cumsum([0] + sizes)
    print(f"sources: {', '.join(f'{s.label} {n:,} rows x {w}' for s, n, w in zip(sources, sizes, weights))}; "
          f"process 0 of {processes}, batch {batch_size}")
    for strategy in ("first_exhausted", "all_exhausted"):
        def stream():
            return TrainStream(files, tokenizer, batch_size, 128, 10_000, seed, 0, processes, sources=sources,
                               mix_strategy=strategy)
        batches = [b["row_index"].numpy() for b in stream()]
        which = [np.searchsorted(starts, b, side="right") - 1 for b in batches]
        line = []
        for share in (0.01, 0.1, 0.5, 1.0):
            taken = np.concatenate(which[:max(1, int(len(which) * share))])
            counts = np.bincount(taken, minlength=len(sizes)) / len(taken)
            line.append(f"{share:.0%}: " + "/".join(f"{c:.2%}" for c in counts))
        per_source = np.bincount(np.concatenate(which), minlength=len(sizes))
        # Resume a third of the way through from the JSON state a train state would hold.
        cut = len(batches) // 3
        head = stream()
        for _, b in zip(range(cut), stream()):
            head.advance(b)
        resumed = stream()
        resumed.load_state_dict(json.loads(json.dumps(head.state_dict())))
        rest = [b["row_index"].numpy() for b in resumed]
        same = len(rest) == len(batches) - cut and all(np.array_equal(a, b) for a, b in zip(rest, batches[cut:]))
        print(f"{strategy}: {len(batches):,} batches, rows per source {', '.join(f'{n:,}' for n in per_source)}; "
              f"shares after {'; '.join(line)}; resumed at batch {cut:,}: "
              f"{'the same' if same else 'DIFFERENT'} {len(rest):,} batches")


if __name__ == "__main__":
    fire.Fire(main)
