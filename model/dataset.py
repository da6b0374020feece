"""Parquet datasets: a resumable training stream and a small evaluation set.

Training data is read as a stream of parquet row groups, never as a whole table:

- Shards. Every training process and every DataLoader worker is one shard. Each row group
  is cut into `num_shards` contiguous slices and shard `s` keeps slice `s` of every row
  group, so shards are disjoint, balanced to a row, and cover every row, also for a file of
  one row group. The price: every shard decodes every row group, so S shards decode the file
  S times an epoch (about 15 s per 10M rows each on one core: little next to the training).
- Order. Each epoch visits the row groups in a seeded permutation. A shard's rows, in that
  order, are cut into windows of `dataloader_buffer_size` rows. A window is tokenized,
  shuffled and (with group_by_length) sorted into batches of similar length, whose order is
  shuffled again.
- Position. Window boundaries depend only on parquet metadata and every shuffle is seeded
  by (seed, epoch, shard, window), so "window k, batch j" names the same rows in every run.
  A resumed run skips whole windows without reading them and re-tokenizes one window.
- Weighted sources (`train_file` as {path or glob: weight}). Each source is read as above, on
  its own (a "pass" over its rows, seeded by epoch, source and pass number), and each batch
  comes from one source: draw n of a shard takes the source whose share of the cumulative
  weights holds frac(offset + n * golden ratio), a seeded low-discrepancy sequence, so the
  sources' shares of batches stay within a few batches of their weights at every point of a
  run, and "draw n" is a number a resumed run starts from. With `first_exhausted` an epoch ends
  when a draw falls on a source with no batch left; with `all_exhausted` that source starts a
  new pass (a new order) and the epoch ends once every source has run out at least once.
- Validation split. With `validation_split`, a row whose seeded hash of its global row number
  falls under the share is held out: never in a training batch, read by `EvalSet` instead.
- Conversations. When a file has a `messages` column (model/conversations.py), every row is read
  as a conversation (a prompt/response row of another file as a user and an assistant turn),
  windows are still cut in parquet rows, and a window's conversations become rows of the
  objective's columns there (each assistant turn a row), so positions and the validation split
  stay those of parquet rows: a conversation's turns are all trained or all held out.
"""
import ctypes
import dataclasses
import itertools
import math
import os
import signal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from model import conversations as conv
from model.objectives import Seq2Seq, non_empty  # noqa: F401 (non_empty: also imported from here)
from utils.errors import UserError
from utils.files import expand_files, open_parquet


@dataclasses.dataclass(frozen=True)
class Piece:
    """One row group of one file."""
    file: int
    row_group: int
    num_rows: int
    first_row: int  # global index of its first row, counting across all files in order
    file_row: int  # index of its first row within its file
    source: int = 0  # the weighted source its file belongs to


@dataclasses.dataclass(frozen=True)
class Source:
    """Files drawn from together, with their weight among the sources."""
    label: str  # short name for the log and metrics
    weight: float
    files: tuple[str, ...]


def get_sources(spec) -> list[Source]:
    """The sources of `train_file`: one unweighted source, or one per key of a {path or glob: weight} mapping."""
    if not isinstance(spec, dict):
        return [Source("all", 1.0, tuple(expand_files(spec)))]
    sources, labels, seen = [], set(), {}
    for i, (pattern, weight) in enumerate(spec.items()):
        files = tuple(expand_files(pattern))
        for f in files:
            if f in seen:
                raise UserError(f"{f} is in two weighted sources ({seen[f]!r} and {pattern!r}); give each file once")
            seen[f] = pattern
        stem = os.path.splitext(os.path.basename(pattern))[0]
        label = os.path.basename(os.path.dirname(pattern)) if any(c in stem for c in "*?[") else stem
        label = label if label and label not in labels else f"source{i}"
        labels.add(label)
        sources.append(Source(label, float(weight), files))
    return sources


def get_pieces(files: list[str], sources: list[Source] | None = None) -> list[Piece]:
    source_of = {f: i for i, src in enumerate(sources or []) for f in src.files}
    pieces, offset = [], 0
    for i, path in enumerate(files):
        meta, file_row = open_parquet(path, columns=()).metadata, 0
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            if n:
                pieces.append(Piece(i, rg, n, offset + file_row, file_row, source_of.get(path, 0)))
            file_row += n
        offset += file_row
    return pieces


def held_out(rows: np.ndarray, seed: int, share: float) -> np.ndarray:
    """Rows (global row numbers) in the validation split: splitmix64 of the row number and the
    seed, as a uniform number in [0, 1), below `share`. No pass over the data, no copy."""
    if not share:
        return np.zeros(len(rows), dtype=bool)
    with np.errstate(over="ignore"):
        x = np.asarray(rows, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53 < share


GOLDEN = (math.sqrt(5) - 1) / 2


def mix_offset(seed: int, epoch: int, shard: int) -> float:
    return float(np.random.default_rng([seed, epoch, shard, 0x5EED]).random())


def mix_choices(weights, offset: float, start: int, count: int) -> np.ndarray:
    """The sources of draws start .. start + count - 1 (see the module docstring)."""
    bounds = np.cumsum(weights) / np.sum(weights)
    u = np.mod(offset + np.arange(start, start + count, dtype=np.float64) * GOLDEN, 1.0)
    return np.minimum(np.searchsorted(bounds, u, side="right"), len(bounds) - 1)


def mixed_batches(weights, pass_batches, offset: float, strategy: str) -> int:
    """Batches a shard yields in an epoch of weighted sources, from each source's batches per pass
    (`pass_batches[k]`; 0 for a source with no rows in the shard, which all_exhausted skips)."""
    need = np.asarray(pass_batches, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    start, chunk, counts, ends = 0, max(1024, int(need.sum()) + 16), np.zeros(len(need), np.int64), {}
    while len(ends) < len(need):
        choices = mix_choices(weights, offset, start, chunk)
        for k in range(len(need)):
            if k in ends:
                continue
            hits = np.flatnonzero(choices == k)
            if counts[k] + len(hits) > need[k]:  # the draw after the pass's last batch
                ends[k] = start + int(hits[need[k] - counts[k]])
            counts[k] += len(hits)
        if strategy == "first_exhausted" and ends:
            return min(ends.values())
        start += chunk
    end = max(ends.values())
    dead = [k for k in range(len(need)) if need[k] == 0]
    return end - sum(int((mix_choices(weights, offset, 0, end) == k).sum()) for k in dead)


def count_rows(spec) -> int:
    """Rows in the parquet files of `spec`, from metadata alone."""
    return sum(open_parquet(f, columns=()).metadata.num_rows for f in expand_files(spec))


def shard_slices(pieces: list[Piece], key: list[int], shard: int, num_shards: int, which=None):
    """The (piece index, first row, end row) slices shard `shard` reads in a pass, in order.

    `which`: the pieces of the pass (default all); `key` seeds their order: [seed, epoch] for
    unweighted data, [seed, epoch, source, pass] for a weighted source."""
    which = np.arange(len(pieces)) if which is None else np.asarray(which)
    order = which[np.random.default_rng(key).permutation(len(which))]
    out = []
    for i in order:
        n = pieces[i].num_rows
        start, stop = n * shard // num_shards, n * (shard + 1) // num_shards
        if stop > start:
            out.append((int(i), start, stop))
    return out


def pass_batches(pieces: list[Piece], key: list[int], shard: int, num_shards: int, buffer_size: int,
                 batch_size: int, which=None, split: tuple[int, float] = (0, 0.0)) -> int:
    """Batches shard `shard` reads in a pass, from metadata alone. Without a validation split the
    order of the row groups does not change a shard's rows or its windows' sizes; with one it does
    (the held-out rows fall into other windows), and the rows' hashes are counted per window.

    Exact when no row is empty; empty rows can only make it smaller."""
    slices = shard_slices(pieces, key, shard, num_shards, which)
    if not split[1]:
        rows = sum(hi - lo for _, lo, hi in slices)
        return rows // buffer_size * math.ceil(buffer_size / batch_size) + math.ceil(rows % buffer_size / batch_size)
    if not slices:
        return 0
    kept = np.concatenate([~held_out(np.arange(pieces[i].first_row + lo, pieces[i].first_row + hi), *split)
                           for i, lo, hi in slices])
    per_window = np.add.reduceat(kept, np.arange(0, len(kept), buffer_size))
    return int(np.ceil(per_window / batch_size).sum())


def epoch_batches(pieces: list[Piece], sources: list[Source], shards: range, num_shards: int, buffer_size: int,
                  batch_size: int, seed: int, epoch: int, strategy: str = "first_exhausted",
                  validation_share: float = 0.0) -> int:
    """Batches the shards `shards` (one process's) read in `epoch`."""
    split = (seed, validation_share)
    if len(sources) <= 1:
        return sum(pass_batches(pieces, [seed, epoch], shard, num_shards, buffer_size, batch_size, split=split)
                   for shard in shards)
    which = [[i for i, p in enumerate(pieces) if p.source == k] for k in range(len(sources))]
    weights = [src.weight for src in sources]
    return sum(mixed_batches(weights, [pass_batches(pieces, [seed, epoch, k, 0], shard, num_shards, buffer_size,
                                                    batch_size, which[k], split) for k in range(len(sources))],
                             mix_offset(seed, epoch, shard), strategy) for shard in shards)


def release_memory() -> None:
    """Give freed memory back to the system after reading a row group or tokenizing a window.

    Arrow's allocator and glibc's (which the tokenizer's threads use) keep freed pages for
    reuse; returning them keeps the resident size of a stream near its live data (measured:
    peak 464 MB instead of 520 MB for a process streaming 10M rows, 280 MB of it the libraries).
    """
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


try:  # glibc only; elsewhere freed memory simply stays with the process
    _LIBC = ctypes.CDLL("libc.so.6")
    if not hasattr(_LIBC, "malloc_trim"):
        _LIBC = None
except OSError:
    _LIBC = None


class Ragged:
    """Token ids of many texts in one flat int32 array: text i is ids[offsets[i]:offsets[i + 1]].

    A window of 10k texts as Python lists of ints costs about 70 MB; as this, 8 MB.
    """

    def __init__(self, ids: np.ndarray, lengths: np.ndarray):
        self.ids, self.lengths = ids, lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]


def encode(tokenizer, texts: list[str], max_seq_len: int, chunk: int = 1024) -> Ragged:
    """Tokenize `texts`; the tokenizer appends [EOS] and truncation keeps it as the last token.

    Chunks of `chunk` texts bound the tokenizer's own per-token bookkeeping (offsets, token
    strings), which would otherwise peak at hundreds of MB for a window.
    """
    ids, lengths = [], []
    for i in range(0, len(texts), chunk):
        rows = tokenizer(texts[i:i + chunk], truncation=True, max_length=max_seq_len, add_special_tokens=True,
                         return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        lengths += map(len, rows)
        ids.append(np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32))
    return Ragged(np.concatenate(ids) if ids else np.zeros(0, np.int32), np.array(lengths, dtype=np.int64))


def target_lengths(ids: dict, columns: tuple) -> np.ndarray:
    """Per row, the length of its longest target text (columns after the first); 0 for an
    objective whose rows are prompts alone (GRPO with a reward that reads no response)."""
    if len(columns) < 2:
        return np.zeros_like(ids[columns[0]].lengths)
    return np.max([ids[c].lengths for c in columns[1:]], axis=0)


@dataclasses.dataclass(frozen=True)
class Budget:
    """Micro-batches by padded tokens: rows x (longest prompt + targets x longest target), each
    rounded up to `multiple`, at most `tokens` (`targets`: the target texts a row pads, 2 for DPO)."""
    tokens: int
    multiple: int = 1
    targets: int = 1

    def cut(self, order: np.ndarray, prompt_lens: np.ndarray, target_lens: np.ndarray) -> list[np.ndarray]:
        """`order` cut greedily, in order, into batches within the budget."""
        m = self.multiple
        p = -(-prompt_lens[order] // m) * m
        t = -(-target_lens[order] // m) * m
        batches, start, longest_p, longest_t = [], 0, 0, 0
        for i in range(len(order)):
            lp, lt = max(longest_p, p[i]), max(longest_t, t[i])
            if i > start and (i - start + 1) * (lp + self.targets * lt) > self.tokens:
                batches.append(order[start:i])
                start, lp, lt = i, p[i], t[i]
            longest_p, longest_t = lp, lt
        if len(order):
            batches.append(order[start:])
        return batches


def random_batches(n: int, batch_size: int, rng: np.random.Generator, budget: Budget | None = None,
                   prompt_lens=None, target_lens=None) -> list[np.ndarray]:
    order = rng.permutation(n)
    if budget is not None:
        return budget.cut(order, prompt_lens, target_lens)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def length_grouped_batches(prompt_lens: np.ndarray, response_lens: np.ndarray, batch_size: int,
                           rng: np.random.Generator, budget: Budget | None = None) -> list[np.ndarray]:
    """Indices grouped into batches of similar length, in a shuffled batch order.

    Each batch pads to its own longest prompt and longest response, so rows of similar
    lengths should share a batch. Rows are shuffled (ties fall at random), sorted by
    response length, cut into about sqrt(#batches) runs of similar response length, and
    each run is sorted by prompt length before it is cut into batches. On the real sample
    data this pads 13-24% of the computed tokens, against 46-56% for random batches; the
    sqrt rule was the best of 1..64 runs at every window and batch size we tried.
    """
    n = len(prompt_lens)
    order = rng.permutation(n)
    order = order[np.lexsort((prompt_lens[order], response_lens[order]))]
    expected = math.ceil(n / batch_size) if budget is None else \
        math.ceil(int((prompt_lens + budget.targets * response_lens).sum()) / budget.tokens)
    runs = [run[np.argsort(prompt_lens[run], kind="stable")]
            for run in np.array_split(order, max(1, round(math.sqrt(expected))))]
    if budget is None:
        order = np.concatenate(runs)
        batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    else:  # with a budget, each run is cut on its own: its rows are of similar length
        batches = [b for run in runs for b in budget.cut(run, prompt_lens, response_lens)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(examples_input: list, examples_labels: list) -> dict:
    """Pad to the batch's longest: pad id 0 for inputs, -100 for labels (ignored by the loss)."""
    return Seq2Seq().collate({"prompt": examples_input, "response": examples_labels})


class TrainStream(IterableDataset):
    """The training rows of one process, as length-grouped batches, resumable at any batch.

    Each item is a padded batch plus metadata: `row_index` (global row numbers), `position`
    ((shard, where the shard stands after it)), `skipped` (empty rows dropped since the previous
    batch, each reported once) and, for weighted sources, `source` (the index of its source).
    Where a shard stands: (window, batches of that window done); for weighted sources
    (draws made, [[pass, window, done] per source]).
    """

    def __init__(self, files: list[str], tokenizer, batch_size: int, max_seq_len: int, buffer_size: int,
                 seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 keep_in_memory: bool = False, group_by_length: bool = True, objective=None,
                 sources: list[Source] | None = None, mix_strategy: str = "first_exhausted",
                 validation_split: float = 0.0, max_tokens_per_batch: int = 0, last_turn_only: bool = False):
        # The objective names the text columns (the first is the encoder's input) and pads a
        # batch of their token ids; the stream reads, shards, groups and resumes any of them alike.
        self.objective = objective or Seq2Seq()
        self.columns = tuple(self.objective.columns)
        self.files, self.tokenizer = files, tokenizer
        self.batch_size, self.max_seq_len, self.buffer_size = batch_size, max_seq_len, buffer_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.group_by_length = group_by_length
        self.workers = max(1, num_workers)
        self.sources = sources if sources and len(sources) > 1 else None
        self.mix_strategy, self.validation_split = mix_strategy, validation_split
        self.budget = Budget(max_tokens_per_batch, self.objective.pad_multiple, len(self.columns) - 1) \
            if max_tokens_per_batch else None
        # Conversations (a `messages` column in any file): every row is read as one, each file's
        # rows in its own format (conv_files), and made rows of the objective's columns per window.
        self.conv_files = [conv.has_conversations(open_parquet(f, ()).schema_arrow.names) for f in files]
        self.conversations, self.last_turn_only = any(self.conv_files), last_turn_only
        for path in files:
            open_data(path, self.objective)  # a missing or mistyped column fails now, naming what is there
        # Columns that travel as raw values in batch["texts"] (what GRPO's rewards read).
        self.text_columns = text_columns(self.objective, files)
        read = (conv.MESSAGES,) + conv.file_targets(self.objective) if self.conversations else self.columns
        self.read_columns = read + tuple(c for c in self.text_columns if c not in read)
        self.pieces = get_pieces(files, self.sources)
        if self.sources:
            self.source_pieces = [[i for i, p in enumerate(self.pieces) if p.source == k]
                                  for k in range(len(self.sources))]
        # Held in memory, the table is shared with the DataLoader workers by fork.
        self.tables = [pq.read_table(f, columns=self.file_columns(i)) for i, f in enumerate(files)] \
            if keep_in_memory else None
        self._open: dict[int, pq.ParquetFile] = {}
        self.set_epoch(0)

    @property
    def num_shards(self) -> int:
        return self.world_size * self.workers

    def set_epoch(self, epoch: int, positions: dict | None = None, first_worker: int = 0) -> None:
        """Start `epoch` after the batches recorded in `positions` ({shard: where it stands}).

        `first_worker` is the worker whose batch comes next: DataLoader worker 0 plays it,
        so the round-robin order of an interrupted epoch continues unchanged.
        """
        self.epoch, self.positions, self.first_worker = epoch, dict(positions or {}), first_worker
        # What the training process has taken so far; the workers hold copies of the above.
        self.consumed, self.next_worker = dict(self.positions), first_worker

    def advance(self, batch: dict) -> tuple[torch.Tensor, int, int, int]:
        """Take the metadata off a batch the trainer is about to use and move the position past it.

        Returns the batch's global row indices, the empty rows skipped before it, its source, its
        tokens (the objective's count_tokens) and the conversation histories cut before it.
        """
        rows, (shard, where), skipped = batch.pop("row_index"), batch.pop("position"), batch.pop("skipped")
        self.consumed[shard] = where
        self.next_worker = (shard - self.rank * self.workers + 1) % self.workers
        return rows, skipped, batch.pop("source", 0), batch.pop("counts")[0], batch.pop("truncated", 0)

    def state_dict(self) -> dict:
        """This process's position: the epoch, where each shard stands, the next worker. JSON."""
        return {"epoch": self.epoch, "positions": {str(s): json_list(p) for s, p in sorted(self.consumed.items())},
                "next_worker": self.next_worker}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(int(state["epoch"]), {int(s): json_tuple(p) for s, p in state["positions"].items()},
                       int(state["next_worker"]))

    def shard_of_worker(self, worker: int) -> int:
        return self.rank * self.workers + (worker + self.first_worker) % self.workers

    def __iter__(self):
        info = get_worker_info()
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError("TrainStream was built for a different number of workers")
        shard = self.shard_of_worker(info.id if info is not None else 0)
        if self.sources is None:
            window, done = self.positions.get(shard, (0, 0))
            for batch, where in self.one_pass(shard, [self.seed, self.epoch], None, window, done):
                batch["position"] = (shard, where)
                yield batch
            return
        yield from self.mixed(shard)

    def mixed(self, shard: int):
        """The batches of weighted sources in shard `shard`, from where it stands."""
        k_sources = len(self.sources)
        draw, stand = self.positions.get(shard, (0, tuple((0, 0, 0) for _ in range(k_sources))))
        stand = [list(p) for p in stand]
        weights = [src.weight for src in self.sources]
        offset = mix_offset(self.seed, self.epoch, shard)

        def start(k):
            cycle, window, done = stand[k]
            return self.one_pass(shard, [self.seed, self.epoch, k, cycle], self.source_pieces[k], window, done)

        passes, dead, chunk = [start(k) for k in range(k_sources)], set(), []
        while len(dead) < k_sources:
            if not chunk:
                chunk = mix_choices(weights, offset, draw, 1024).tolist()[::-1]
            k = chunk.pop()
            draw += 1
            item = next(passes[k], None) if k not in dead else None
            if item is None and k not in dead:
                if self.mix_strategy == "first_exhausted":
                    return
                stand[k] = [stand[k][0] + 1, 0, 0]
                if all(p[0] >= 1 for p in stand):
                    return
                passes[k] = start(k)
                item = next(passes[k], None)
                if item is None:  # no row of this source in this shard
                    dead.add(k)
            if item is None:
                continue
            batch, (window, done) = item
            stand[k][1:] = [window, done]
            batch["position"] = (shard, (draw, tuple(tuple(p) for p in stand)))
            batch["source"] = k
            yield batch

    def one_pass(self, shard: int, key: list[int], which, window: int, done: int):
        """(batch, (window, batches of it done)) of one pass over the pieces `which` (all: None)."""
        skipped = truncated = 0  # not yet reported; a resumed window's were reported before
        held = None  # each batch waits for the next, so the shard's last one can carry trailing empties
        for k, texts, rows in self.windows(shard, key, which, window):
            if self.conversations:
                texts, rows, cut = conv.expand(self.tokenizer, texts, rows, conv.targets(self.objective),
                                               self.max_seq_len, self.last_turn_only)
                if not (k == window and done):
                    truncated += cut
            usable = self.objective.usable_rows(texts)
            train = ~held_out(rows, self.seed, self.validation_split)
            keep = usable & train
            if not (k == window and done):
                skipped += int((~usable & train).sum())
            if not keep.any():
                continue
            ids = {c: encode(self.tokenizer, [t for t, m in zip(texts[c], keep) if m], self.max_seq_len)
                   for c in self.columns}
            raw = {c: [t for t, m in zip(texts[c], keep) if m] for c in self.text_columns}
            rows = rows[keep]
            release_memory()
            rng = np.random.default_rng([*key[:2], shard, k, *key[2:]])
            prompt_lens = ids[self.columns[0]].lengths
            target_lens = target_lengths(ids, self.columns)
            if self.group_by_length:
                batches = length_grouped_batches(prompt_lens, target_lens, self.batch_size, rng, self.budget)
            else:
                batches = random_batches(len(rows), self.batch_size, rng, self.budget, prompt_lens, target_lens)
            for j, idx in enumerate(batches):
                if k == window and j < done:
                    continue
                picked = {c: [ids[c][i] for i in idx] for c in self.columns}
                batch = self.objective.collate(picked)
                # Counted here, from the id arrays: the loop never reads a tensor to know them.
                batch["counts"] = (self.objective.count_tokens(picked), self.objective.loss_units(picked))
                if raw:
                    batch["texts"] = {c: [raw[c][i] for i in idx] for c in raw}
                batch["row_index"] = torch.from_numpy(rows[idx])
                batch["skipped"], skipped = skipped, 0
                batch["truncated"], truncated = truncated, 0
                if held is not None:
                    yield held
                held = (batch, (k, j + 1))
        if held is not None:
            held[0]["skipped"] += skipped
            held[0]["truncated"] += truncated
            yield held

    def windows(self, shard: int, key: list[int], which, first_window: int):
        """Yield (k, {column: texts}, global row indices) for windows k >= first_window of a pass.

        Windows before `first_window` are skipped by arithmetic on row counts: nothing is read.
        """
        size = self.buffer_size
        start = first_window * size  # shard-local position of the first row wanted
        pos, k = 0, first_window
        parts, buffered = [], 0
        for i, lo, hi in shard_slices(self.pieces, key, shard, self.num_shards, which):
            n = hi - lo
            if pos + n <= start:
                pos += n
                continue
            skip = max(0, start - pos)
            pos += n
            parts.append(self.read(i, lo + skip, hi))
            buffered += n - skip
            while buffered >= size:
                table = pa.concat_tables(parts)
                yield k, *self._columns(table.slice(0, size))
                k, buffered = k + 1, buffered - size
                parts = [table.slice(size)] if buffered else []
        if buffered:
            yield k, *self._columns(pa.concat_tables(parts))

    def read(self, i: int, lo: int, hi: int) -> pa.Table:
        """Rows [lo, hi) of piece i, with a `row_index` column of global row numbers."""
        piece = self.pieces[i]
        if self.tables is not None:
            table = self.tables[piece.file].slice(piece.file_row + lo, hi - lo)
        else:
            pf = self._open.get(piece.file)
            if pf is None:
                pf = self._open[piece.file] = open_parquet(self.files[piece.file], ())
            # Batch by batch on one thread: decoding a whole row group at once peaks at about
            # five times its size. Then hand the decode buffers back to the system.
            table = pa.Table.from_batches(list(pf.iter_batches(
                batch_size=8192, row_groups=[piece.row_group], columns=self.file_columns(piece.file),
                use_threads=False))).slice(lo, hi - lo)
            release_memory()
        if self.conversations and not self.conv_files[piece.file]:
            table = conv.as_conversations(table, self.objective)
        index = pa.array(np.arange(piece.first_row + lo, piece.first_row + hi, dtype=np.int64))
        return table.select(list(self.read_columns)).append_column("row_index", index)

    def file_columns(self, file: int) -> list[str]:
        """The columns read from file `file`: the stream's, or, for a prompt/response file among
        conversations, its own text columns (made a conversation after reading)."""
        if not self.conversations or self.conv_files[file]:
            return list(self.read_columns)
        return list(dict.fromkeys([*self.columns, *(c for c in self.read_columns if c != conv.MESSAGES)]))

    def _columns(self, table: pa.Table):
        return {c: table.column(c).to_pylist() for c in self.read_columns}, table.column("row_index").to_numpy()


def json_list(value):
    """A position as JSON lists."""
    return [json_list(v) for v in value] if isinstance(value, (list, tuple)) else value


def json_tuple(value):
    """A position from JSON, as the tuples the stream makes."""
    return tuple(json_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def open_data(path: str, objective) -> pq.ParquetFile:
    """`path` opened, its columns checked for the objective: its text columns, or, for a file of
    conversations, a `messages` column of {role, content} turns and the objective's other targets."""
    names = open_parquet(path, ()).schema_arrow.names
    if not conv.has_conversations(names):
        return open_parquet(path, objective.columns)
    if objective.name == "grpo":
        raise UserError(f"{path} holds conversations (a messages column): GRPO samples from prompt rows; "
                        "give a file with a prompt column")
    pf = open_parquet(path, conv.file_targets(objective))
    conv.check_column(pf, path)
    return pf


def has_usable_row(path: str, objective, tokenizer=None, max_seq_len: int = 10**6) -> bool:
    """Whether a row of `path` trains under `objective`; reads only until it finds one."""
    pf = open_data(path, objective)
    conversations = conv.has_conversations(pf.schema_arrow.names)
    columns = [conv.MESSAGES, *conv.file_targets(objective)] if conversations else list(objective.columns)
    for batch in pf.iter_batches(batch_size=4096, columns=columns):
        texts = {c: batch.column(c).to_pylist() for c in columns}
        if conversations:
            texts = conv.expand(tokenizer, texts, np.arange(batch.num_rows), conv.targets(objective), max_seq_len)[0]
        if objective.usable_rows(texts).any():
            return True
    return False


def text_columns(objective, files: list[str]) -> tuple[str, ...]:
    """The raw columns `objective` wants in its batches; "*" means every column of the files.
    A column the files lack is an error now, naming what they have."""
    wanted = tuple(objective.text_columns)
    if not wanted:
        return ()
    names = open_parquet(files[0], ()).schema_arrow.names
    if "*" in wanted:
        wanted = tuple(dict.fromkeys([c for c in wanted if c != "*"] + names))
    for path in files:
        have = open_parquet(path, ()).schema_arrow.names
        missing = [c for c in wanted if c not in have]
        if missing:
            from utils.errors import UserError
            raise UserError(f"{path} has no column {', '.join(missing)} (found: {', '.join(have)}); "
                            f"the reward reads it")
    return wanted


def _ignore_signals(_worker_id: int) -> None:
    # Ctrl+C and SIGTERM reach the whole process group; the training process saves and stops
    # the workers itself, so a worker must not die first and break the last batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def prefetch(iterator, depth: int = 4):
    """Yield `iterator`'s items, read ahead by a thread: without DataLoader workers on a GPU the
    next batches are read and tokenized while the GPU computes (the tokenizer and parquet release
    the GIL). The thread stops when the iterator ends; one left blocked at a stop is a daemon."""
    import queue
    import threading
    items, done = queue.Queue(maxsize=depth), object()

    def fill():
        try:
            for item in iterator:
                items.put(item)
        except BaseException as err:  # noqa: BLE001 (handed to the consumer, raised there)
            items.put(err)
        items.put(done)

    threading.Thread(target=fill, daemon=True, name="chatlm-prefetch").start()
    while (item := items.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def get_train_loader(stream: TrainStream, num_workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        stream, batch_size=None, num_workers=num_workers, worker_init_fn=_ignore_signals,
        prefetch_factor=4 if num_workers else None, pin_memory=pin_memory,
        # Its own generator: creating an iterator must not draw from the global torch RNG,
        # or a resumed run's dropout would drift from an uninterrupted one.
        generator=torch.Generator())


class EvalSet(Dataset):
    """The first `max_rows` rows of a file whose texts are all non-empty, tokenized, shortest first.

    The objective names the text columns; `extra` columns (a `task` to group the report by)
    are kept as they are when the file has them.
    """

    def __init__(self, path: str | list[str], tokenizer, max_seq_len: int, max_rows: int, objective=None,
                 extra: tuple = ("task",), split: tuple[int, float] | None = None, last_turn_only: bool = False):
        """`path`: a file, or the training files with `split` = (seed, validation_split): then
        the rows are those the training stream holds out, in file order. A file of conversations
        gives the rows the training stream makes of them (model/conversations.py)."""
        self.objective = objective or Seq2Seq()
        columns = tuple(self.objective.columns)
        files = [path] if isinstance(path, str) else list(path)
        names = set.intersection(*(set(open_data(f, self.objective).schema_arrow.names) for f in files))
        # Besides `task`, the raw columns the objective's rewards read (GRPO evaluates with them).
        extra = tuple(dict.fromkeys(extra + text_columns(self.objective, files)))
        extra = [c for c in extra if c in names and c not in columns and c != conv.MESSAGES]
        texts, self.extra, self.skipped = {c: [] for c in columns}, {c: [] for c in extra}, 0
        offset = 0  # global row number of the file's first row, as the training stream counts
        for f in files:
            pf = open_data(f, self.objective)
            conversations = conv.has_conversations(pf.schema_arrow.names)
            read = [conv.MESSAGES, *conv.file_targets(self.objective)] if conversations else list(columns)
            for batch in pf.iter_batches(batch_size=4096, columns=read + extra):
                values = {c: batch.column(c).to_pylist() for c in read + extra}
                rows = np.arange(offset, offset + batch.num_rows)
                offset += batch.num_rows
                if conversations:
                    values, rows, _ = conv.expand(tokenizer, values, rows, conv.targets(self.objective), max_seq_len,
                                                  last_turn_only)
                usable = self.objective.usable_rows(values)
                chosen = held_out(rows, *split) if split else True
                keep = usable & chosen
                self.skipped += int((~usable & chosen).sum())
                for c, store in (*texts.items(), *self.extra.items()):
                    store += [x for x, m in zip(values[c], keep) if m]
                if len(texts[columns[0]]) >= max_rows:
                    break
            if len(texts[columns[0]]) >= max_rows:
                break
        self.texts = {c: v[:max_rows] for c, v in texts.items()}
        self.extra = {c: v[:max_rows] for c, v in self.extra.items()}
        self.ids = {c: encode(tokenizer, v, max_seq_len) for c, v in self.texts.items()}
        target_lens = target_lengths(self.ids, columns)
        self.order = np.lexsort((target_lens, self.ids[columns[0]].lengths)).tolist()  # shortest first

    @property
    def prompts(self) -> list[str]:
        return self.texts[self.objective.columns[0]]

    @property
    def responses(self) -> list[str] | None:
        """The texts greedy answers are compared with (response, or chosen for DPO); None when the
        objective has none (GRPO on prompts alone)."""
        return self.texts[self.objective.target] if self.objective.target else None

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> int:
        return self.order[i]

    def collate(self, rows: list[int]) -> dict:
        """Pad a batch of rows; `index` says which row of the EvalSet each one is."""
        batch = self.objective.collate({c: [self.ids[c][j] for j in rows] for c in self.ids})
        batch["index"] = torch.tensor(rows)
        return batch


def get_eval_loader(dataset: EvalSet, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=dataset.collate)


def describe(files: list[str]) -> str:
    size = sum(os.path.getsize(f) for f in files)
    return f"{len(files)} file(s), {count_rows(files):,} rows, {size / 2**20:.1f} MiB"


def get_tokenizer(cfg, run, train_files: list[str], logger):
    """The tokenizer in tokenizer_dir, trained there from the training files first when missing
    (by the main process; the others wait and load it)."""
    from utils.tokenizer import load_tokenizer, train_tokenizer
    with run.main_first():
        if run.is_main and not os.path.isfile(os.path.join(cfg.tokenizer_dir, "tokenizer.json")):
            logger.info(f"no tokenizer in {cfg.tokenizer_dir}: training one "
                        f"(vocab_size={cfg.vocab_size}) on {', '.join(train_files)}")
            train_tokenizer(train_files, cfg.tokenizer_dir, cfg.vocab_size, model_max_length=cfg.max_seq_len,
                            seed=cfg.seed)
        tokenizer = load_tokenizer(cfg.tokenizer_dir)
    if not tokenizer.chat_template:
        # A tokenizer trained before conversations: the models this run saves carry the template.
        tokenizer.chat_template = conv.CHAT_TEMPLATE
    return tokenizer


def get_stream(cfg, plan, tokenizer, accelerator, logger) -> TrainStream:
    """This process's training stream: its shard of the plan's sources, owning its position."""
    keep_in_memory = cfg.keep_in_memory and accelerator.num_processes == 1
    if cfg.keep_in_memory and not keep_in_memory:
        logger.info("several processes: streaming the training data instead of holding it in memory")
    logger.info(f"training data: {describe(plan.train_files)}, {'in memory' if keep_in_memory else 'streamed'}")
    if len(plan.sources) > 1:
        logger.info("weighted sources (" + cfg.mix_strategy + "): " + "; ".join(
            f"{src.label} = {src.weight:g} x {describe(list(src.files))}" for src in plan.sources))
    return TrainStream(plan.train_files, tokenizer, cfg.batch_size_per_gpu, cfg.max_seq_len,
                       cfg.dataloader_buffer_size, cfg.seed, accelerator.process_index, accelerator.num_processes,
                       cfg.num_workers, keep_in_memory, cfg.group_by_length, plan.objective,
                       plan.sources, cfg.mix_strategy, cfg.validation_split, cfg.max_tokens_per_batch,
                       cfg.last_turn_only)
