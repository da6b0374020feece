"""Settings, the report and the checks of the sampler (utils.sampling)."""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from utils.errors import UserError
from utils.files import TEXT_COLUMNS, refuse_to_replace


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
KEPT, NULL_OR_EMPTY, PROMPT_LENGTH, RESPONSE_LENGTH = range(4)


@dataclass(frozen=True)
class Source:
    """One input file and how many rows to take from it: `num_samples` or `ratio` of its rows."""
    path: str
    num_samples: int | None = None
    ratio: float | None = None

    def __post_init__(self):
        if (self.num_samples is None) == (self.ratio is None):
            raise UserError("give either --num_samples or --ratio (one value, or one per input)")
        if self.num_samples is not None and (not is_whole(self.num_samples) or self.num_samples <= 0):
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
            if not is_whole(getattr(self, name)) or getattr(self, name) < 0:
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



def is_whole(value) -> bool:
    return (isinstance(value, (int, np.integer)) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer())


def check_outputs(outputs: list[str], inputs: list[str], overwrite: bool = False):
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
    for out, flag in zip(outputs, ("output", "valid_output")):
        refuse_to_replace(out, flag, overwrite)


def get_output_schema(files: list[pq.ParquetFile], paths: list[str]) -> pa.Schema:
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


def get_count(source: Source, num_rows: int) -> int:
    if num_rows == 0:
        raise UserError(f"input {source.path} has no rows: give a non-empty file")
    if source.num_samples is not None:
        return int(source.num_samples)
    count = round(source.ratio * num_rows)
    if count == 0:
        raise UserError(f"--ratio {source.ratio} of the {num_rows:,} rows of {source.path} is 0 rows: "
                        "give a larger ratio")
    return count


def split_in_proportion(total: int, weights: list[int]) -> list[int]:
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


def fit_to_available(path: str, available: int, train: int, valid: int, report: SampleReport,
                      what: str = "rows") -> tuple[int, int]:
    """Shrink the asked counts to what is available: train is served first."""
    if train + valid <= available:
        return train, valid
    _warn(report, f"{path} has {available:,} {what}, fewer than the {train + valid:,} asked: keeping all of them")
    train = min(train, available)
    return train, min(valid, available - train)
