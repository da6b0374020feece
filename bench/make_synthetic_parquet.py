"""Write a synthetic prompt/response parquet file shaped like the Chinese sample data.

    python bench/make_synthetic_parquet.py --rows 10000000 --output /tmp/bench_data/synthetic_10m.parquet

Columns: row_id (int64, 0..rows-1), prompt (~40 characters), response (~150
characters) of Chinese-looking text: characters drawn with Zipf-like frequencies
from 3000 CJK ideographs, Chinese punctuation and some ASCII. So that smart
sampling has something to drop, about 1% of rows are exact duplicates (a third
of them differing only in whitespace or case), 1% near duplicates (a few
characters changed), 0.5% null or empty fields and 1% junk (repeated characters,
ASCII noise, one-character answers, over-long answers). Streaming: one row group
in memory at a time, text built with numpy, about 10 s per million rows.
"""
import os
import sys

import fire
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.errors import UserError, exit_on_user_error  # noqa: E402

SCHEMA = pa.schema([("row_id", pa.int64()), ("prompt", pa.string()), ("response", pa.string())])
# Share of rows replaced by each kind of planted row.
EXACT_DUP, NEAR_DUP, EMPTY, JUNK = 0.01, 0.01, 0.005, 0.01
POOL_SIZE = 4096  # earlier rows that duplicates copy, so duplicates also cross row groups


def _get_alphabet() -> tuple[np.ndarray, np.ndarray]:
    """A lookup table of 2**16 code points: drawing a uniform index into it
    draws characters with the table's frequencies (Zipf-like ideographs, ~11%
    punctuation, ~6% ASCII letters and digits), much faster than rng.choice(p=...)."""
    rng = np.random.default_rng(12345)
    ideographs = rng.choice(np.arange(0x4E00, 0x9FA6), size=3000, replace=False)
    weights = 1.0 / (np.arange(ideographs.size) + 20)
    counts = np.round(weights / weights.sum() * 0.83 * 65536).astype(int)
    punctuation = np.array([ord(c) for c in "，。、：？！；"])
    punctuation_counts = (np.array([0.55, 0.25, 0.08, 0.04, 0.03, 0.03, 0.02]) * 0.11 * 65536).astype(int)
    ascii_chars = np.array([ord(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"])
    table = np.concatenate([np.repeat(ideographs, counts), np.repeat(punctuation, punctuation_counts)])
    table = np.concatenate([table, rng.choice(ascii_chars, 65536 - table.size)])
    return rng.permutation(table).astype(np.uint32), ideographs.astype(np.uint32)


def _get_lengths(rng: np.random.Generator, n: int, median: float, sigma: float, high: int) -> np.ndarray:
    return np.clip(rng.lognormal(np.log(median), sigma, n), 4, high).astype(np.int64)


def _get_strings(chars: np.ndarray, lengths: np.ndarray) -> pa.StringArray:
    """A string array from concatenated code points and per-row lengths (no Python per row)."""
    data = chars.tobytes().decode("utf-32-le").encode("utf-8")
    width = np.where(chars < 0x80, 1, np.where(chars < 0x800, 2, 3))  # UTF-8 bytes, BMP only
    byte_ends = np.cumsum(width)[np.cumsum(lengths) - 1]
    offsets = np.concatenate([[0], byte_ends]).astype(np.int32)
    return pa.StringArray.from_buffers(lengths.size, pa.py_buffer(offsets), pa.py_buffer(data))


def _get_text(rng, alphabet: np.ndarray, lengths: np.ndarray, question: bool) -> pa.StringArray:
    chars = alphabet[rng.integers(0, alphabet.size, int(lengths.sum()))]
    if question:  # most prompts end with a question mark
        ends = np.cumsum(lengths) - 1
        chars[ends[rng.random(lengths.size) < 0.7]] = ord("？")
    return _get_strings(chars, lengths)


def _get_junk(rng, ideographs: np.ndarray, prompt: str) -> tuple[str | None, str | None]:
    kind = rng.integers(5)
    if kind == 0:  # one character repeated
        return prompt, chr(int(rng.choice(ideographs[:50]))) * int(rng.integers(20, 200))
    if kind == 1:  # a short phrase repeated
        return prompt, "".join(chr(int(c)) for c in rng.choice(ideographs[:200], 3)) * int(rng.integers(10, 60))
    if kind == 2:  # ASCII noise
        return prompt, "".join(chr(int(c)) for c in rng.integers(33, 127, int(rng.integers(20, 150))))
    if kind == 3:  # a one-character answer
        return prompt, chr(int(rng.choice(ideographs[:50])))
    return prompt, "".join(chr(int(c)) for c in rng.choice(ideographs, 2500))  # over-long answer


def _get_near_duplicate(rng, ideographs: np.ndarray, prompt: str, response: str) -> tuple[str, str]:
    chars = list(response)
    for pos in rng.integers(0, len(chars), 3):
        chars[pos] = chr(int(rng.choice(ideographs)))
    return prompt, "".join(chars)


def _plant_rows(rng, ideographs, prompts: pa.StringArray, responses: pa.StringArray, pool: list):
    """Replace a few rows by duplicates, near duplicates, empty fields and junk."""
    n = len(prompts)
    kinds = rng.random(n)
    limits = np.cumsum([EXACT_DUP, NEAR_DUP, EMPTY, JUNK])
    planted = np.flatnonzero(kinds < limits[-1])
    new_prompts, new_responses = prompts.to_pylist(), responses.to_pylist()  # only rows of this group
    unplanted = np.setdiff1d(rng.integers(0, n, 64), planted)  # copies may come from this group too
    pool.extend(zip([new_prompts[i] for i in unplanted], [new_responses[i] for i in unplanted]))
    del pool[:-POOL_SIZE]
    for i in planted:
        source_prompt, source_response = pool[rng.integers(len(pool))]
        if kinds[i] < limits[0]:
            if rng.random() < 1 / 3:  # same text after normalisation: spaces and case differ
                source_prompt = " " + source_prompt.upper() + " "
            new_prompts[i], new_responses[i] = source_prompt, source_response
        elif kinds[i] < limits[1]:
            new_prompts[i], new_responses[i] = _get_near_duplicate(rng, ideographs, source_prompt, source_response)
        elif kinds[i] < limits[2]:
            blank = [None, "", "  "][rng.integers(3)]
            if rng.random() < 0.5:
                new_prompts[i] = blank
            else:
                new_responses[i] = blank
        else:
            new_prompts[i], new_responses[i] = _get_junk(rng, ideographs, new_prompts[i])
    return pa.array(new_prompts, pa.string()), pa.array(new_responses, pa.string())


def main(rows: int, output: str, seed: int = 0, row_group_size: int = 50_000):
    """Write `rows` synthetic rows to `output` in row groups of `row_group_size`."""
    if not isinstance(rows, int) or rows <= 0:
        raise UserError(f"--rows must be a whole number > 0, got {rows!r}")
    if not isinstance(row_group_size, int) or row_group_size <= 0:
        raise UserError(f"--row_group_size must be a whole number > 0, got {row_group_size!r}")
    alphabet, ideographs = _get_alphabet()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{output}.tmp-{os.getpid()}"
    pool = []
    # Dictionary encoding does not pay off for unique texts, and trying it costs time.
    with pq.ParquetWriter(tmp, SCHEMA, compression="snappy", use_dictionary=False) as writer:
        for group, start in enumerate(range(0, rows, row_group_size)):
            n = min(row_group_size, rows - start)
            rng = np.random.default_rng([seed, group])
            prompts = _get_text(rng, alphabet, _get_lengths(rng, n, 26, 0.8, 320), question=True)
            responses = _get_text(rng, alphabet, _get_lengths(rng, n, 150, 0.6, 320), question=False)
            prompts, responses = _plant_rows(rng, ideographs, prompts, responses, pool)
            row_id = pa.array(np.arange(start, start + n, dtype=np.int64))
            writer.write_table(pa.Table.from_arrays([row_id, prompts, responses], schema=SCHEMA))
    os.replace(tmp, output)
    print(f"wrote {rows:,} rows to {output} ({os.path.getsize(output) / 1e9:.2f} GB)")


if __name__ == "__main__":
    exit_on_user_error(fire.Fire, main)
