"""Smart mode: filter, de-duplicate (exactly, and near duplicates by MinHash LSH) and score every row, keep the best."""
from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from utils.sampling.features import get_text_features, text_source_columns, text_views
from utils.sampling.options import (DROP_REASONS, KEPT, MINHASH_BINS, SCORE_BATCH_ROWS, SampleReport, SmartOptions,
                                    NULL_OR_EMPTY, PROMPT_LENGTH, RESPONSE_LENGTH, fit_to_available)
from utils.sampling.parquet_io import prefetch


def choose_smart(files, sources, train_asked, valid_asked, options: SmartOptions, seed: int,
                  progress: bool, report: SampleReport) -> list[tuple[np.ndarray, np.ndarray]]:
    """Score every row of every source in one streaming pass, then filter, dedup and take the best."""
    lsh = get_lsh_params(options.near_dup_threshold) if options.near_dup else None
    starts = np.concatenate([[0], np.cumsum([f.metadata.num_rows for f in files])])
    rows = _score_rows(files, starts, options, lsh, progress, report)

    # Rank order: score descending, ties broken by the seed. Among duplicates the
    # first in this order (the best) is kept.
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(rows.status == KEPT)
    ranked = candidates[np.lexsort((rng.random(candidates.size), -rows.score[candidates]))]
    del candidates
    unique = ranked[_first_occurrences(rows.exact_hash[ranked])]
    report.dropped["exact_duplicate"] = ranked.size - unique.size
    ranked = unique
    if lsh:
        # A row is a near duplicate when a better-ranked row shares one of its LSH bands.
        near = np.zeros(ranked.size, bool)
        signed = np.flatnonzero(rows.has_signature[ranked])
        signed_rows = ranked[signed]
        for band_keys in rows.band_hashes:
            first = np.zeros(signed.size, bool)
            first[_first_occurrences(band_keys[signed_rows])] = True
            near[signed[~first]] = True
        report.dropped["near_duplicate"] = int(near.sum())
        ranked = ranked[~near]

    chosen = []
    source_of = np.searchsorted(starts, ranked, side="right") - 1
    for i, (src, train, valid) in enumerate(zip(sources, train_asked, valid_asked)):
        mine = ranked[source_of == i]
        train, valid = fit_to_available(src.path, mine.size, train, valid, report,
                                         what="rows left after the smart filters")
        best = mine[: train + valid] - starts[i]
        report.dropped["not_selected"] += mine.size - best.size
        # The validation rows are a random share of the best, so both outputs have the same quality.
        best = best[np.random.default_rng([seed, i]).permutation(best.size)]
        chosen.append((np.sort(best[:train]), np.sort(best[train:])))
    return chosen


@dataclass
class _RowScores:
    """What smart mode keeps per input row (about 14 bytes, plus 8 per LSH band)."""
    status: np.ndarray  # uint8: KEPT or the filter that dropped the row
    score: np.ndarray  # float32
    exact_hash: np.ndarray  # uint64
    band_hashes: np.ndarray | None  # (bands, rows) uint64, band-major so each band is contiguous
    has_signature: np.ndarray | None  # bool


def _score_rows(files, starts: np.ndarray, options: SmartOptions, lsh: tuple[int, int] | None,
                progress: bool, report: SampleReport) -> _RowScores:
    """Pass 1: features of every row of every input, one batch at a time; applies the filters."""
    total = int(starts[-1])
    rows = _RowScores(np.zeros(total, np.uint8), np.zeros(total, np.float32), np.zeros(total, np.uint64),
                      np.zeros((lsh[0], total), np.uint64) if lsh else None,
                      np.zeros(total, bool) if lsh else None)

    def store(row: int, future):
        feats = future.result()
        at = slice(row, row + feats.score.size)
        valid = ~feats.empty
        report.lengths_before["prompt"].add(feats.prompt_chars[valid])
        report.lengths_before["response"].add(feats.response_chars[valid])
        reason = np.zeros(feats.score.size, np.uint8)  # later filters overwrite earlier ones
        reason[(feats.response_chars < options.min_response_chars)
               | (feats.response_chars > options.max_response_chars)] = RESPONSE_LENGTH
        reason[(feats.prompt_chars < options.min_prompt_chars)
               | (feats.prompt_chars > options.max_prompt_chars)] = PROMPT_LENGTH
        reason[feats.empty] = NULL_OR_EMPTY
        rows.status[at], rows.score[at], rows.exact_hash[at] = reason, feats.score, feats.exact_hash
        if lsh:
            rows.band_hashes[:, at] = feats.band_hashes.T
            rows.has_signature[at] = feats.has_signature
        bar.update(feats.score.size)

    bar = tqdm(total=total, unit="rows", desc="scoring", disable=not progress, mininterval=1)
    # numpy and arrow release the GIL on large arrays, so two threads use both cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        for parquet_file, start in zip(files, starts):
            pending = collections.deque()
            row = int(start)
            columns = text_source_columns(parquet_file.schema_arrow.names)
            for batch in prefetch(parquet_file.iter_batches(batch_size=SCORE_BATCH_ROWS, columns=columns)):
                pending.append((row, pool.submit(lambda b: get_text_features(*text_views(b), lsh), batch)))
                row += batch.num_rows
                while len(pending) > 2 or (pending and pending[0][1].done()):
                    store(*pending.popleft())
            while pending:
                store(*pending.popleft())
    bar.close()
    report.rows_read = total
    for reason in (NULL_OR_EMPTY, PROMPT_LENGTH, RESPONSE_LENGTH):
        report.dropped[DROP_REASONS[reason - 1]] = int(np.count_nonzero(rows.status == reason))
    return rows


def _first_occurrences(keys: np.ndarray) -> np.ndarray:
    """Sorted positions of the first occurrence of each distinct key."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    first = np.ones(keys.size, bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return np.sort(order[first])


def get_lsh_params(threshold: float, num_bins: int = MINHASH_BINS) -> tuple[int, int]:
    """(bands, rows per band) of LSH over `num_bins` MinHash values for a Jaccard `threshold`.

    Minimises the mean of the false-positive area below the threshold and the
    false-negative area above it, as datasketch's MinHashLSH does.
    """
    s = np.linspace(0, 1, 1001)
    best = (np.inf, 1, num_bins)
    for bands in range(1, num_bins + 1):
        for rows in range(1, num_bins // bands + 1):
            p = 1 - (1 - s ** rows) ** bands
            error = np.trapezoid(np.where(s < threshold, p, 0), s) + np.trapezoid(np.where(s >= threshold, 1 - p, 0), s)
            best = min(best, (error, bands, rows))
    return best[1], best[2]
