"""Random mode: a uniform sample without replacement, by row group, reproducible from the seed."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from utils.sampling.options import SampleReport, fit_to_available


def choose_random(group_sizes: np.ndarray, train: int, valid: int, rng: np.random.Generator, path: str,
                   report: SampleReport) -> tuple[np.ndarray, np.ndarray]:
    """Sorted row indices of a uniform sample without replacement, split into disjoint train/valid.

    Row group by row group: how many train and valid rows fall into a group is
    a multivariate hypergeometric draw from what is left, then positions inside
    the group are drawn uniformly. The result is a uniform sample, and memory is
    the chosen indices, not a permutation of every row.
    """
    train, valid = fit_to_available(path, int(group_sizes.sum()), train, valid, report)
    left = np.array([train, valid, int(group_sizes.sum()) - train - valid], np.int64)
    train_parts, valid_parts = [], []
    start = 0
    for size in group_sizes.tolist():
        counts = rng.multivariate_hypergeometric(left, size)
        left -= counts
        if counts[0] or counts[1]:
            picked = start + rng.choice(size, counts[0] + counts[1], replace=False)
            train_parts.append(np.sort(picked[: counts[0]]))
            valid_parts.append(np.sort(picked[counts[0]:]))
        start += size
    empty = np.zeros(0, np.int64)
    return (np.concatenate(train_parts or [empty]).astype(np.int64),
            np.concatenate(valid_parts or [empty]).astype(np.int64))


def row_group_sizes(parquet_file: pq.ParquetFile) -> np.ndarray:
    metadata = parquet_file.metadata
    return np.array([metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)], np.int64)


def groups_to_read(group_sizes: np.ndarray, train: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Indices of the row groups holding at least one chosen row."""
    bounds = np.concatenate([[0], np.cumsum(group_sizes)])
    holds = np.zeros(group_sizes.size, bool)
    for idx in (train, valid):
        at = np.searchsorted(idx, bounds)
        holds |= at[1:] > at[:-1]
    return np.flatnonzero(holds)
