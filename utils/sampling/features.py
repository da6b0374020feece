"""Text features of smart mode: normalised lengths, a quality score, exact-duplicate hashes and MinHash band hashes."""
from __future__ import annotations

import functools
import math
import threading
import unicodedata
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from utils.files import MESSAGES
from utils.sampling.options import FULL_RESPONSE_CHARS, MINHASH_BINS


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


def text_views(batch) -> tuple[pa.Array, pa.Array]:
    """What the sampler measures of a batch (or table): its prompt and response, or of each
    conversation (a `messages` column) the turns before its last answer, joined by a space, and that
    answer (an assistant turn's; a conversation that does not end with one has none: an empty row)."""
    if "prompt" in batch.schema.names:
        return batch["prompt"], batch["response"]
    prompts, responses = [], []
    for turns in batch["messages"].to_pylist():
        turns = [t for t in turns or [] if isinstance(t, dict)]
        answer = turns[-1].get("content") if turns and turns[-1].get("role") == "assistant" else None
        prompts.append(" ".join(t.get("content") or "" for t in turns[:-1]) if answer is not None else None)
        responses.append(answer)
    return pa.array(prompts, pa.string()), pa.array(responses, pa.string())


def text_source_columns(names) -> list[str]:
    """The columns `text_views` reads."""
    return ["prompt", "response"] if "prompt" in names else [MESSAGES]


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
