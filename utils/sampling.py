"""Sample rows of prompt/response parquet files without loading them.

Two modes share one streaming reader and one writer:
- random: a uniform sample without replacement, reproducible from the seed;
- smart: skip null/empty rows and rows outside length bounds, drop exact (and,
  opt-in, near) duplicates, score every row and keep the best.

Memory: inputs are read one record batch at a time (`ParquetFile(pre_buffer=False)`
plus `iter_batches`). Across the whole input we keep a few bytes per row (the
chosen indices; in smart mode a score, a hash and the LSH band hashes), never text.
"""
from __future__ import annotations

import collections
import functools
import math
import os
import queue
import sys
import threading
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from utils.errors import UserError
from utils.files import TEXT_COLUMNS, open_parquet

# 10k rows (~6 MB of Chinese text) per output row group: small enough that a
# streaming reader holds little, and a 300k-row validation file still has 30
# groups to share out across ranks and dataloader workers.
DEFAULT_ROW_GROUP_SIZE = 10_000
# Rows per record batch read from an input.
BATCH_ROWS = 8_192
# Rows per batch of the smart-mode text analysis: its per-character arrays
# (~6 MB each) then stay in CPU cache, twice as fast as 16k rows. Must be below
# 65536: a row's index is packed into 16 bits beside a 48-bit 3-gram hash.
SCORE_BATCH_ROWS = 4_096
OUTPUT_COMPRESSION = "zstd"

# Smart-mode quality score: a response shorter than this many non-space
# characters is scaled down linearly; longer ones are not preferred further.
FULL_RESPONSE_CHARS = 64
# One-permutation MinHash: bins per signature, which the LSH bands split.
MINHASH_BINS = 128

# Why a row was not kept, in the order the filters run.
DROP_REASONS = ("null_or_empty", "prompt_length", "response_length",
                "exact_duplicate", "near_duplicate", "not_selected")
# Per-row status after the row filters: kept so far, or the first three reasons above.
_KEPT, _NULL_OR_EMPTY, _PROMPT_LENGTH, _RESPONSE_LENGTH = range(4)


@dataclass(frozen=True)
class Source:
    """One input file and how many rows to take from it: `num_samples` or `ratio` of its rows."""
    path: str
    num_samples: int | None = None
    ratio: float | None = None

    def __post_init__(self):
        if (self.num_samples is None) == (self.ratio is None):
            raise UserError("give either --num_samples or --ratio (one value, or one per input)")
        if self.num_samples is not None and (not _is_whole(self.num_samples) or self.num_samples <= 0):
            raise UserError(f"--num_samples must be a whole number > 0, got {self.num_samples!r}")
        if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float))
                                       or not 0 < self.ratio <= 1):
            raise UserError(f"--ratio must be a number in (0, 1], got {self.ratio!r}")


@dataclass(frozen=True)
class SmartOptions:
    """Filters of smart mode; lengths are characters of the stored text, bounds inclusive."""
    min_prompt_chars: int = 2
    max_prompt_chars: int = 512
    min_response_chars: int = 4
    max_response_chars: int = 1024
    near_dup: bool = False
    near_dup_threshold: float = 0.7

    def __post_init__(self):
        for name in ("min_prompt_chars", "max_prompt_chars", "min_response_chars", "max_response_chars"):
            if not _is_whole(getattr(self, name)) or getattr(self, name) < 0:
                raise UserError(f"--{name} must be a whole number >= 0, got {getattr(self, name)!r}")
        if self.min_prompt_chars > self.max_prompt_chars or self.min_response_chars > self.max_response_chars:
            raise UserError("a --min_*_chars bound is above its --max_*_chars bound: swap or widen them")
        if not 0 < self.near_dup_threshold < 1:
            raise UserError(f"--near_dup_threshold must be between 0 and 1, got {self.near_dup_threshold!r}")


class LengthStats:
    """Count, mean and percentiles of text lengths (characters) from a histogram,
    so memory grows with the longest text, not with the number of rows."""

    def __init__(self):
        self.hist = np.zeros(0, np.int64)
        self.total = 0

    def add(self, lengths: np.ndarray):
        if lengths.size == 0:
            return
        counts = np.bincount(lengths)
        if counts.size > self.hist.size:
            counts[: self.hist.size] += self.hist
            self.hist = counts
        else:
            self.hist[: counts.size] += counts
        self.total += int(lengths.sum(dtype=np.int64))

    @property
    def count(self) -> int:
        return int(self.hist.sum())

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def percentile(self, q: float) -> int:
        """The smallest length with at least `q` percent of texts at or below it."""
        if not self.count:
            return 0
        rank = max(1, math.ceil(q / 100 * self.count))
        return int(np.searchsorted(np.cumsum(self.hist), rank))


@dataclass
class SampleReport:
    """What a run read, dropped and wrote; `format()` is what the CLI prints."""
    rows_read: int = 0
    dropped: dict = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    kept: dict = field(default_factory=dict)  # output path -> rows written
    output_bytes: dict = field(default_factory=dict)  # output path -> file size
    lengths_before: dict = field(default_factory=lambda: {c: LengthStats() for c in TEXT_COLUMNS})
    lengths_after: dict = field(default_factory=lambda: {c: LengthStats() for c in TEXT_COLUMNS})
    warnings: list = field(default_factory=list)

    def format(self) -> str:
        lines = [f"rows read: {self.rows_read:,}"]
        dropped = {k: v for k, v in self.dropped.items() if v}
        lines.append("dropped: " + (", ".join(f"{k} {v:,}" for k, v in dropped.items()) or "none"))
        for path, rows in self.kept.items():
            lines.append(f"kept: {rows:,} rows -> {path} ({self.output_bytes.get(path, 0) / 1e6:,.1f} MB)")
        lines.append(f"{'length (chars)':<24}{'mean':>8}{'p50':>8}{'p95':>8}")
        for column in TEXT_COLUMNS:
            for when, stats in (("before", self.lengths_before[column]), ("after", self.lengths_after[column])):
                lines.append(f"{column + ' ' + when:<24}{stats.mean:>8.1f}"
                             f"{stats.percentile(50):>8}{stats.percentile(95):>8}")
        return "\n".join(lines)


def sample_parquet(sources: list[Source], output: str, *, valid_output: str | None = None,
                   valid_samples: int = 0, smart: SmartOptions | None = None, seed: int = 42,
                   row_group_size: int = DEFAULT_ROW_GROUP_SIZE, progress: bool = True) -> SampleReport:
    """Sample `sources` into `output` (and a disjoint `valid_samples` rows into `valid_output`).

    Random mode when `smart` is None, else smart mode with those filters. Rows of
    several sources are interleaved in proportion and shuffled within each output
    row group; a single source keeps its order. Raises `UserError` for bad input.
    """
    if not sources:
        raise UserError("no input given: pass --input PATH")
    if not _is_whole(row_group_size) or row_group_size <= 0:
        raise UserError(f"--row_group_size must be a whole number > 0, got {row_group_size!r}")
    if not _is_whole(seed) or seed < 0:
        raise UserError(f"--seed must be a whole number >= 0, got {seed!r}")
    if (valid_output is None) != (not valid_samples):
        raise UserError("give --valid_output and --valid_samples together, or neither")
    if valid_samples and (not _is_whole(valid_samples) or valid_samples <= 0):
        raise UserError(f"--valid_samples must be a whole number > 0, got {valid_samples!r}")
    files = [open_parquet(s.path) for s in sources]
    outputs = [p for p in (output, valid_output) if p is not None]
    _check_outputs(outputs, [s.path for s in sources])
    schema = _get_output_schema(files, [s.path for s in sources])
    train_asked = [_get_count(s, f.metadata.num_rows) for s, f in zip(sources, files)]
    valid_asked = _split_in_proportion(int(valid_samples or 0), train_asked)

    report = SampleReport()
    if smart is None:
        chosen = [_choose_random(_group_sizes(f), n, v, np.random.default_rng([seed, i]), s.path, report)
                  for i, (s, f, n, v) in enumerate(zip(sources, files, train_asked, valid_asked))]
    else:
        chosen = _choose_smart(files, sources, train_asked, valid_asked, smart, seed, progress, report)
    if valid_output is not None and sum(v.size for _, v in chosen) == 0:
        raise UserError("no rows left for the validation sample: lower --num_samples or --valid_samples")
    if sum(t.size for t, _ in chosen) == 0:
        raise UserError("no rows left to sample: check the inputs or loosen the smart filters")

    _write_chosen(files, chosen, schema, output, valid_output, row_group_size, seed,
                  count_before=smart is None, progress=progress, report=report)
    return report


def get_sources(inputs: list[str], num_samples: list | None, ratio: list | None) -> list[Source]:
    """Pair each input with its count or ratio; one value given for several inputs applies to each."""
    if (num_samples is None) == (ratio is None):
        raise UserError("give either --num_samples or --ratio (one value, or one per input)")
    values = num_samples if ratio is None else ratio
    if len(values) == 1:
        values = values * len(inputs)
    if len(values) != len(inputs):
        flag = "--num_samples" if ratio is None else "--ratio"
        raise UserError(f"{len(inputs)} input(s) but {len(values)} values of {flag}: give one value per input")
    if ratio is None:
        return [Source(p, num_samples=n) for p, n in zip(inputs, values)]
    return [Source(p, ratio=r) for p, r in zip(inputs, values)]


# ---------------------------------------------------------------- checks

def _is_whole(value) -> bool:
    return (isinstance(value, (int, np.integer)) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer())


def _check_outputs(outputs: list[str], inputs: list[str]):
    real_inputs = {os.path.realpath(p) for p in inputs}
    if len({os.path.realpath(p) for p in outputs}) < len(outputs):
        raise UserError("--output and --valid_output are the same file: give two paths")
    for out in outputs:
        same = os.path.realpath(out) in real_inputs or (
            os.path.exists(out) and any(os.path.samefile(out, p) for p in inputs))
        if same:
            raise UserError(f"output {out} is also an input: write to a new path")
        if os.path.isdir(out):
            raise UserError(f"output {out} is a directory: give a file path ending in .parquet")


def _get_output_schema(files: list[pq.ParquetFile], paths: list[str]) -> pa.Schema:
    # pandas metadata describes the input's index (a RangeIndex of its length),
    # which is wrong for a sample, so it is dropped; other metadata is kept.
    schema = files[0].schema_arrow
    metadata = {k: v for k, v in (schema.metadata or {}).items() if k != b"pandas"}
    schema = schema.with_metadata(metadata or None)
    for parquet_file, path in zip(files[1:], paths[1:]):
        other = parquet_file.schema_arrow
        if set(other.names) != set(schema.names) or any(
                other.field(f.name).type != f.type for f in schema):
            raise UserError(f"inputs {paths[0]} and {path} have different columns ({schema} vs {other}): "
                            "give inputs with the same columns and types")
    return schema


def _get_count(source: Source, num_rows: int) -> int:
    if num_rows == 0:
        raise UserError(f"input {source.path} has no rows: give a non-empty file")
    if source.num_samples is not None:
        return int(source.num_samples)
    count = round(source.ratio * num_rows)
    if count == 0:
        raise UserError(f"--ratio {source.ratio} of the {num_rows:,} rows of {source.path} is 0 rows: "
                        "give a larger ratio")
    return count


def _split_in_proportion(total: int, weights: list[int]) -> list[int]:
    """Integers summing to `total`, proportional to `weights` (largest remainder)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _warn(report: SampleReport, message: str):
    report.warnings.append(message)
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _fit_to_available(path: str, available: int, train: int, valid: int, report: SampleReport,
                      what: str = "rows") -> tuple[int, int]:
    """Shrink the asked counts to what is available: train is served first."""
    if train + valid <= available:
        return train, valid
    _warn(report, f"{path} has {available:,} {what}, fewer than the {train + valid:,} asked: keeping all of them")
    train = min(train, available)
    return train, min(valid, available - train)


# ---------------------------------------------------------------- random mode

def _choose_random(group_sizes: np.ndarray, train: int, valid: int, rng: np.random.Generator, path: str,
                   report: SampleReport) -> tuple[np.ndarray, np.ndarray]:
    """Sorted row indices of a uniform sample without replacement, split into disjoint train/valid.

    Row group by row group: how many train and valid rows fall into a group is
    a multivariate hypergeometric draw from what is left, then positions inside
    the group are drawn uniformly. The result is a uniform sample, and memory is
    the chosen indices, not a permutation of every row.
    """
    train, valid = _fit_to_available(path, int(group_sizes.sum()), train, valid, report)
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


def _group_sizes(parquet_file: pq.ParquetFile) -> np.ndarray:
    metadata = parquet_file.metadata
    return np.array([metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)], np.int64)


def _groups_to_read(group_sizes: np.ndarray, train: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Indices of the row groups holding at least one chosen row."""
    bounds = np.concatenate([[0], np.cumsum(group_sizes)])
    holds = np.zeros(group_sizes.size, bool)
    for idx in (train, valid):
        at = np.searchsorted(idx, bounds)
        holds |= at[1:] > at[:-1]
    return np.flatnonzero(holds)


# ---------------------------------------------------------------- smart mode

def _choose_smart(files, sources, train_asked, valid_asked, options: SmartOptions, seed: int,
                  progress: bool, report: SampleReport) -> list[tuple[np.ndarray, np.ndarray]]:
    """Score every row of every source in one streaming pass, then filter, dedup and take the best."""
    lsh = get_lsh_params(options.near_dup_threshold) if options.near_dup else None
    starts = np.concatenate([[0], np.cumsum([f.metadata.num_rows for f in files])])
    rows = _score_rows(files, starts, options, lsh, progress, report)

    # Rank order: score descending, ties broken by the seed. Among duplicates the
    # first in this order (the best) is kept.
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(rows.status == _KEPT)
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
        train, valid = _fit_to_available(src.path, mine.size, train, valid, report,
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
    status: np.ndarray  # uint8: _KEPT or the filter that dropped the row
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
               | (feats.response_chars > options.max_response_chars)] = _RESPONSE_LENGTH
        reason[(feats.prompt_chars < options.min_prompt_chars)
               | (feats.prompt_chars > options.max_prompt_chars)] = _PROMPT_LENGTH
        reason[feats.empty] = _NULL_OR_EMPTY
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
            for batch in _prefetch(parquet_file.iter_batches(batch_size=SCORE_BATCH_ROWS,
                                                             columns=list(TEXT_COLUMNS))):
                pending.append((row, pool.submit(get_text_features, batch["prompt"], batch["response"], lsh)))
                row += batch.num_rows
                while len(pending) > 2 or (pending and pending[0][1].done()):
                    store(*pending.popleft())
            while pending:
                store(*pending.popleft())
    bar.close()
    report.rows_read = total
    for reason in (_NULL_OR_EMPTY, _PROMPT_LENGTH, _RESPONSE_LENGTH):
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


# ---------------------------------------------------------------- text features

@dataclass
class TextFeatures:
    """Per-row features of a batch of prompt/response pairs, all arrays of length rows."""
    prompt_chars: np.ndarray  # int64, characters as stored (null counts 0)
    response_chars: np.ndarray
    empty: np.ndarray  # bool: prompt or response is null or only whitespace
    score: np.ndarray  # float32 quality score in [0, 1], see `get_text_features`
    exact_hash: np.ndarray  # uint64 hash of the normalised prompt + response
    band_hashes: np.ndarray | None = None  # (rows, bands) uint64 LSH keys, with near-dup only
    has_signature: np.ndarray | None = None  # bool: normalised text has at least one 3-gram


_SPACE, _CHINESE, _DROP = 1, 2, 4  # bits of the per-character flags table
_SEPARATOR = "\x00"  # joins prompt and response; kept by normalisation, so "ab"+"c" != "a"+"bc"
_P = np.uint64(0x9E3779B97F4A7C15)  # odd, so invertible modulo 2**64
_P_INV = np.uint64(pow(int(_P), -1, 2**64))
_P2 = np.uint64(int(_P) ** 2 % 2**64)


@functools.cache
def _char_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per code point: flags, normalised code point, and a random 64-bit value
    for hashing. Built once (~0.05 s; the loop covers the BMP only, where every
    character that normalisation changes lives)."""
    flags = np.zeros(0x110000, np.uint8)
    fold = np.arange(0x110000, dtype=np.uint32)
    for cp in range(0x10000):
        ch = chr(cp)
        # Normalisation: per-character NFKC (full-width to ASCII, compatibility
        # forms) and lower case; then whitespace, punctuation and symbols are dropped.
        norm = unicodedata.normalize("NFKC", ch).lower() if 0xD800 > cp or cp > 0xDFFF else ch
        if len(norm) == 1:
            fold[cp] = ord(norm)
        category = unicodedata.category(chr(fold[cp]))
        if ch.isspace():
            flags[cp] |= _SPACE
        if (category[0] in "PSZ" or chr(fold[cp]).isspace()) and ch != _SEPARATOR:
            flags[cp] |= _DROP
        if (0x3400 <= cp <= 0x4DBF or 0x4E00 <= cp <= 0x9FFF or 0xF900 <= cp <= 0xFAFF  # ideographs
                or 0x3000 < cp <= 0x303F or 0xFF01 <= cp <= 0xFF65):  # CJK and full-width punctuation
            flags[cp] |= _CHINESE
    flags[0x20000:0x31350] = _CHINESE  # ideograph extensions B to H
    values = np.random.default_rng(20240607).integers(0, 2**64, size=0x110000, dtype=np.uint64)
    return flags, fold, values


class _Powers:
    """P**i and P**-i modulo 2**64 for i < n, grown on demand (uint64 wraps modulo 2**64)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.pow = self.inv = np.ones(1, np.uint64)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            if self.pow.size < n:
                size = max(n, 2 * self.pow.size)
                self.pow = np.cumprod(np.full(size, _P, np.uint64)) * _P_INV  # P**0 .. P**(size-1)
                self.inv = np.cumprod(np.full(size, _P_INV, np.uint64)) * _P
            return self.pow, self.inv


_POWERS = _Powers()


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place: spreads every input bit over the output."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def get_text_features(prompt: pa.Array, response: pa.Array,
                      lsh: tuple[int, int] | None = None) -> TextFeatures:
    """Features of each prompt/response pair, vectorised over the whole batch.

    Quality score = chinese * unique * fill, each in [0, 1]:
    - chinese: share of Chinese characters (CJK ideographs, CJK and full-width
      punctuation) among the non-space characters of prompt + response;
    - unique: distinct character 3-grams / all 3-grams of the normalised
      prompt + response (1 when there are none): repeated phrases lower it;
    - fill: min(1, non-space characters of the response / FULL_RESPONSE_CHARS).
    Normalised text: per-character NFKC, lower case, no whitespace, punctuation
    or symbols. `lsh=(bands, rows)` adds MinHash LSH band hashes of its 3-grams.
    """
    flags_table, fold_table, values = _char_tables()
    prompt_chars = _fill_null(pc.utf8_length(prompt), 0).to_numpy().astype(np.int64)
    response_chars = _fill_null(pc.utf8_length(response), 0).to_numpy().astype(np.int64)
    nulls = (pc.is_null(prompt).to_numpy(zero_copy_only=False)
             | pc.is_null(response).to_numpy(zero_copy_only=False))
    text = pc.binary_join_element_wise(_fill_null(prompt, ""), _fill_null(response, ""), _SEPARATOR)
    text = text.cast(pa.string()) if pa.types.is_large_string(text.type) else text
    cp = _code_points(text)
    rows = prompt_chars.size
    ends = np.cumsum(prompt_chars + response_chars + 1)
    starts = ends - prompt_chars - response_chars - 1
    seps = starts + prompt_chars
    assert ends[-1] == cp.size if rows else cp.size == 0, "character offsets out of step"

    flags = flags_table[cp]

    def segment_sum(mask, a, b):
        total = np.zeros(mask.size + 1, np.int32)
        np.cumsum(mask, out=total[1:])
        return (total[b] - total[a]).astype(np.int64)

    non_space = (flags & _SPACE) == 0
    prompt_visible = segment_sum(non_space, starts, seps)
    response_visible = segment_sum(non_space, seps + 1, ends)
    chinese = segment_sum((flags & _CHINESE) != 0, starts, ends)
    empty = nulls | (prompt_visible == 0) | (response_visible == 0)

    keep = (flags & _DROP) == 0
    norm_ends = np.cumsum(keep, dtype=np.int32)[ends - 1].astype(np.int64) if rows else ends
    norm_starts = np.concatenate([[0], norm_ends[:-1]])
    norm_len = norm_ends - norm_starts
    del flags, non_space
    hashed = values[fold_table[cp[keep]]]  # one random 64-bit value per normalised character
    del keep

    # Exact-duplicate key: polynomial hash sum(v_j * P**(j - start)) of each row's
    # normalised text, from a prefix sum over the whole batch (uint64 wraps mod 2**64).
    powers, inverses = _POWERS.get(hashed.size + 1)
    prefix = np.zeros(hashed.size + 1, np.uint64)
    np.cumsum(hashed * powers[: hashed.size], out=prefix[1:])
    exact_hash = _mix64((prefix[norm_ends] - prefix[norm_starts]) * inverses[norm_starts])
    del prefix

    # Character 3-grams of the normalised text; the last two positions of each row start none.
    if hashed.size >= 3:
        grams = hashed[:-2] * _P2 + hashed[1:-1] * _P + hashed[2:]
    else:
        grams = np.zeros(0, np.uint64)
    starts_gram = np.ones(hashed.size, bool)
    for back in (1, 2):
        starts_gram[norm_ends[norm_ends >= back] - back] = False
    gram_row = np.repeat(np.arange(rows, dtype=np.uint64), norm_len)[starts_gram]
    # (row << 48 | top 48 hash bits), sorted: distinct 3-grams per row are the
    # runs, and within a row the values come ordered by hash (MinHash bins below).
    packed = np.sort((gram_row << np.uint64(48)) | (grams[starts_gram[: grams.size]] >> np.uint64(16)))
    del grams, gram_row, hashed
    run_start = np.ones(packed.size, bool)
    run_start[1:] = packed[1:] != packed[:-1]
    distinct = np.bincount((packed[run_start] >> np.uint64(48)).astype(np.int64), minlength=rows)
    total_grams = np.maximum(norm_len - 2, 0)
    unique = np.where(total_grams > 0, distinct / np.maximum(total_grams, 1), 1.0)
    visible = prompt_visible + response_visible
    score = (chinese / np.maximum(visible, 1) * unique
             * np.minimum(1.0, response_visible / FULL_RESPONSE_CHARS)).astype(np.float32)
    feats = TextFeatures(prompt_chars, response_chars, empty, score, exact_hash)
    if lsh is not None:
        feats.band_hashes = _get_band_hashes(packed, rows, *lsh)
        feats.has_signature = total_grams > 0
    return feats


def _fill_null(array: pa.Array, value) -> pa.Array:
    # pc.fill_null costs milliseconds per call even without nulls, which most batches have.
    return pc.fill_null(array, value) if array.null_count else array


def _code_points(text: pa.StringArray) -> np.ndarray:
    """UTF-32 code points of all strings of `text`, concatenated."""
    offsets = np.frombuffer(text.buffers()[1], np.int32)[text.offset: text.offset + len(text) + 1]
    data = text.buffers()[2]
    if data is None or offsets[-1] == offsets[0]:
        return np.zeros(0, np.uint32)
    chars = str(memoryview(data)[offsets[0]: offsets[-1]], "utf-8")
    return np.frombuffer(chars.encode("utf-32-le"), np.uint32)


@functools.cache
def _densify_probes(probes: int = 64) -> np.ndarray:
    """(probes, bins) random bin indices: row t is the t-th bin each bin borrows from."""
    return np.random.default_rng(20240608).integers(0, MINHASH_BINS, size=(probes, MINHASH_BINS))


def _get_band_hashes(packed: np.ndarray, rows: int, bands: int, rows_per_band: int) -> np.ndarray:
    """LSH band keys (rows, bands) from one-permutation MinHash of sorted packed 3-gram hashes.

    Hand-written and vectorised: per-row Python MinHash libraries (datasketch)
    take hours on 10M rows. One-permutation hashing splits the hash range into
    MINHASH_BINS bins and keeps each bin's minimum; since `packed` is sorted by
    (row, hash), the first entry of each (row, bin) run is that minimum.
    Rows without any 3-gram get all-empty signatures; callers skip them.
    """
    bins = MINHASH_BINS
    shift = np.uint64(48 - int(math.log2(bins)))
    low_bits = np.uint64((1 << int(shift)) - 1)
    row_bin = packed >> shift  # row * bins + bin
    first = np.ones(packed.size, bool)
    first[1:] = row_bin[1:] != row_bin[:-1]
    empty_value = np.uint64(2**63)
    signature = np.full(rows * bins, empty_value, np.uint64)
    signature[row_bin[first]] = packed[first] & low_bits

    # Optimal densification (Shrivastava 2017): an empty bin takes the value of the
    # first non-empty bin on a probe sequence fixed per bin, the same for every row,
    # so two rows' bins still agree with probability = their Jaccard similarity.
    # (Copying the next bin to the right instead makes short unrelated texts
    # collide: their bands are mostly copies of the one or two bins they fill.)
    original = signature.copy()
    has_any = (original.reshape(rows, bins) != empty_value).any(axis=1)
    waiting = np.flatnonzero((signature == empty_value) & np.repeat(has_any, bins))
    waiting_row, waiting_bin = waiting // bins, waiting % bins
    for probe in _densify_probes():
        if not waiting.size:
            break
        value = original[waiting_row * bins + probe[waiting_bin]]
        found = value != empty_value
        signature[waiting[found]] = value[found]
        waiting, waiting_row, waiting_bin = waiting[~found], waiting_row[~found], waiting_bin[~found]
    # Bins of very sparse rows left after all probes: the row's smallest value (also a MinHash).
    signature[waiting] = original.reshape(rows, bins).min(axis=1)[waiting_row]
    signature = signature.reshape(rows, bins)

    used = signature[:, : bands * rows_per_band].reshape(rows, bands, rows_per_band)
    weights = np.cumprod(np.full(rows_per_band, _P, np.uint64))
    band_keys = (used * weights).sum(axis=2, dtype=np.uint64) + np.arange(bands, dtype=np.uint64) * _P
    return _mix64(band_keys)


# ---------------------------------------------------------------- reading and writing

def _prefetch(iterator, depth: int = 2):
    """Yield from `iterator`, producing up to `depth` items ahead in a thread
    (parquet decoding releases the GIL, so it overlaps with the consumer)."""
    items = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item):
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def produce():
        try:
            for item in iterator:
                if stop.is_set():
                    return
                put(item)
            put(done)
        except BaseException as err:  # re-raised in the consumer
            put(err)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the consumer stopped early: let the producer end too


def _iter_chosen(parquet_file: pq.ParquetFile, train: np.ndarray, valid: np.ndarray, names: list[str],
                 count_before: bool, report: SampleReport, bar):
    """Yield (train rows, valid rows) record batches, reading only the row groups holding chosen rows."""
    sizes = _group_sizes(parquet_file)
    group_starts = np.concatenate([[0], np.cumsum(sizes)])

    def batches():
        for g in _groups_to_read(sizes, train, valid).tolist():
            row = int(group_starts[g])
            # One thread per batch: the prefetch thread already overlaps reading with
            # writing, and arrow's column threads would only add memory.
            for batch in parquet_file.iter_batches(batch_size=BATCH_ROWS, row_groups=[g], columns=names,
                                                   use_threads=False):
                yield row, batch
                row += batch.num_rows

    for row, batch in _prefetch(batches()):
        end = row + batch.num_rows
        pieces = []
        for idx in (train, valid):
            local = idx[np.searchsorted(idx, row): np.searchsorted(idx, end)] - row
            pieces.append(batch.take(pa.array(local, pa.int64())))
        if count_before:
            report.rows_read += batch.num_rows
            for column in TEXT_COLUMNS:
                report.lengths_before[column].add(pc.drop_null(pc.utf8_length(batch[column])).to_numpy())
        bar.update(batch.num_rows)
        yield pieces


class _Output:
    """One output file: written under a temporary name, renamed by `commit`."""

    def __init__(self, path: str, schema: pa.Schema):
        self.path = path
        self.tmp = f"{path}.tmp-{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.writer = pq.ParquetWriter(self.tmp, schema, compression=OUTPUT_COMPRESSION)
        self.rows = 0

    def write(self, table: pa.Table, report: SampleReport):
        self.writer.write_table(table, row_group_size=table.num_rows)
        self.rows += table.num_rows
        for column in TEXT_COLUMNS:
            report.lengths_after[column].add(pc.drop_null(pc.utf8_length(table[column])).to_numpy())

    def commit(self, report: SampleReport):
        self.writer.close()
        os.replace(self.tmp, self.path)
        report.kept[self.path] = self.rows
        report.output_bytes[self.path] = os.path.getsize(self.path)

    def discard(self):
        self.writer.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def _write_chosen(files, chosen, schema: pa.Schema, output: str, valid_output: str | None,
                  row_group_size: int, seed: int, count_before: bool, progress: bool, report: SampleReport):
    """Stream the chosen rows of every source into the outputs, one row group at a time.

    Each row group takes rows from every source in proportion to what that source
    still has to give, so a mix stays a mix throughout the file.
    """
    names = schema.names
    rows_to_read = 0
    for parquet_file, (train, valid) in zip(files, chosen):
        sizes = _group_sizes(parquet_file)
        rows_to_read += int(sizes[_groups_to_read(sizes, train, valid)].sum())
    bar = tqdm(total=rows_to_read, unit="rows", desc="writing", disable=not progress, mininterval=1)
    streams = [_iter_chosen(f, t, v, names, count_before, report, bar) for f, (t, v) in zip(files, chosen)]
    # buffers[o][s]: record batches of source s waiting for output o (0 train, 1 valid)
    buffers = [[collections.deque() for _ in files] for _ in range(2)]
    buffered = np.zeros((2, len(files)), np.int64)
    remaining = np.array([[t.size for t, _ in chosen], [v.size for _, v in chosen]], np.int64)
    totals = remaining.sum(axis=1)
    outputs = [None, None]
    rng = np.random.default_rng([seed, 2**32])
    try:
        outputs[0] = _Output(output, schema)
        outputs[1] = _Output(valid_output, schema) if valid_output else None
        while remaining.sum():
            # Advance the output that is furthest behind, so both buffers stay small.
            o = int(np.argmin(np.where(remaining.sum(axis=1) > 0, 1 - remaining.sum(axis=1) / np.maximum(totals, 1), 2)))
            group_rows = min(row_group_size, int(remaining[o].sum()))
            quota = _quotas(remaining[o], group_rows)
            parts = []
            for s, need in enumerate(quota):
                while buffered[o, s] < need:
                    for out, piece in enumerate(next(streams[s])):
                        if piece.num_rows:
                            buffers[out][s].append(piece)
                            buffered[out, s] += piece.num_rows
                parts += _pop_rows(buffers[o][s], need)
                buffered[o, s] -= need
                remaining[o, s] -= need
            table = pa.Table.from_batches([_conform(b, schema) for b in parts], schema=schema)
            if len(files) > 1:
                table = table.take(pa.array(rng.permutation(table.num_rows)))
            outputs[o].write(table, report)
        for out in outputs:
            if out is not None:
                out.commit(report)
    except BaseException:
        for out in outputs:
            if out is not None:
                out.discard()
        raise
    finally:
        bar.close()


def _quotas(remaining: np.ndarray, group_rows: int) -> list[int]:
    """Rows each source gives to the next row group: in proportion to what it has left."""
    if remaining.size == 1:
        return [group_rows]
    quota = np.floor(remaining * group_rows / remaining.sum()).astype(np.int64)
    short = group_rows - int(quota.sum())
    order = np.argsort(-(remaining * group_rows / remaining.sum() - quota), kind="stable")
    for s in order:
        if short == 0:
            break
        if quota[s] < remaining[s]:
            quota[s] += 1
            short -= 1
    return quota.tolist()


def _pop_rows(batches: collections.deque, rows: int) -> list[pa.RecordBatch]:
    out = []
    while rows:
        batch = batches.popleft()
        if batch.num_rows > rows:
            batches.appendleft(batch.slice(rows))
            batch = batch.slice(0, rows)
        out.append(batch)
        rows -= batch.num_rows
    return out


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """`batch` with the output schema's column order and metadata."""
    return pa.RecordBatch.from_arrays([batch[name] for name in schema.names], schema=schema)
