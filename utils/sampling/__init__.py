"""Sample rows of prompt/response parquet files, or of conversations (a `messages` column of
{role, content} turns, measured as the turns before the last answer and that answer), without
loading them.

Two modes share one streaming reader and one writer:
- random: a uniform sample without replacement, reproducible from the seed;
- smart: skip null/empty rows and rows outside length bounds, drop exact (and,
  opt-in, near) duplicates, score every row and keep the best.

Memory: inputs are read one record batch at a time (`ParquetFile(pre_buffer=False)`
plus `iter_batches`). Across the whole input we keep a few bytes per row (the
chosen indices; in smart mode a score, a hash and the LSH band hashes), never text.

The package, by section: options (settings, the report, checks), random_mode, smart,
features (text features and MinHash) and parquet_io (reading and writing).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from utils.errors import UserError
from utils.files import MESSAGES, open_parquet
from utils.sampling.options import (DEFAULT_ROW_GROUP_SIZE, SampleReport, SmartOptions, Source, check_outputs,
                                    get_count, get_output_schema, is_whole, split_in_proportion)
from utils.sampling.parquet_io import write_chosen
from utils.sampling.random_mode import choose_random, row_group_sizes
from utils.sampling.features import get_text_features
from utils.sampling.smart import choose_smart, get_lsh_params

__all__ = ["DEFAULT_ROW_GROUP_SIZE", "SampleReport", "SmartOptions", "Source", "get_lsh_params", "get_sources",
           "get_text_features", "sample_parquet"]


def sample_parquet(sources: list[Source], output: str, *, valid_output: str | None = None,
                   valid_samples: int = 0, smart: SmartOptions | None = None, seed: int = 42,
                   row_group_size: int = DEFAULT_ROW_GROUP_SIZE, progress: bool = True,
                   overwrite: bool = False) -> SampleReport:
    """Sample `sources` into `output` (and a disjoint `valid_samples` rows into `valid_output`).

    Random mode when `smart` is None, else smart mode with those filters. Rows of
    several sources are interleaved in proportion and shuffled within each output
    row group; a single source keeps its order. Raises `UserError` for bad input.
    """
    if not sources:
        raise UserError("no input given: pass --input PATH")
    if not is_whole(row_group_size) or row_group_size <= 0:
        raise UserError(f"--row_group_size must be a whole number > 0, got {row_group_size!r}")
    if not is_whole(seed) or seed < 0:
        raise UserError(f"--seed must be a whole number >= 0, got {seed!r}")
    if (valid_output is None) != (not valid_samples):
        raise UserError("give --valid_output and --valid_samples together, or neither")
    if valid_samples and (not is_whole(valid_samples) or valid_samples <= 0):
        raise UserError(f"--valid_samples must be a whole number > 0, got {valid_samples!r}")
    files = [open_input(s.path) for s in sources]
    outputs = [p for p in (output, valid_output) if p is not None]
    check_outputs(outputs, [s.path for s in sources], overwrite)
    schema = get_output_schema(files, [s.path for s in sources])
    train_asked = [get_count(s, f.metadata.num_rows) for s, f in zip(sources, files)]
    valid_asked = split_in_proportion(int(valid_samples or 0), train_asked)

    report = SampleReport()
    if smart is None:
        chosen = [choose_random(row_group_sizes(f), n, v, np.random.default_rng([seed, i]), s.path, report)
                  for i, (s, f, n, v) in enumerate(zip(sources, files, train_asked, valid_asked))]
    else:
        chosen = choose_smart(files, sources, train_asked, valid_asked, smart, seed, progress, report)
    if valid_output is not None and sum(v.size for _, v in chosen) == 0:
        raise UserError("no rows left for the validation sample: lower --num_samples or --valid_samples")
    if sum(t.size for t, _ in chosen) == 0:
        raise UserError("no rows left to sample: check the inputs or loosen the smart filters")

    write_chosen(files, chosen, schema, output, valid_output, row_group_size, seed,
                  count_before=smart is None, progress=progress, report=report)
    return report


def open_input(path: str):
    """An input: string prompt and response columns, or a messages column of {role, content} turns."""
    names = open_parquet(path, ()).schema_arrow.names
    if MESSAGES in names and "prompt" not in names:
        pf = open_parquet(path, ())
        kind = pf.schema_arrow.field(MESSAGES).type
        if not ((pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_struct(kind.value_type)
                and {"role", "content"} <= {f.name for f in kind.value_type}):
            raise UserError(f"column messages of {path} is {kind}; it must be a list of {{role, content}} structs")
        return pf
    return open_parquet(path)


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
