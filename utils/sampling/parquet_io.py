"""Reading the chosen rows and writing the sample: a prefetching reader and atomic parquet outputs."""
from __future__ import annotations

import collections
import os
import queue
import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from utils.files import TEXT_COLUMNS
from utils.sampling.features import text_views
from utils.sampling.options import BATCH_ROWS, OUTPUT_COMPRESSION, SampleReport
from utils.sampling.random_mode import groups_to_read, row_group_sizes


def prefetch(iterator, depth: int = 2):
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
    sizes = row_group_sizes(parquet_file)
    group_starts = np.concatenate([[0], np.cumsum(sizes)])

    def batches():
        for g in groups_to_read(sizes, train, valid).tolist():
            row = int(group_starts[g])
            # One thread per batch: the prefetch thread already overlaps reading with
            # writing, and arrow's column threads would only add memory.
            for batch in parquet_file.iter_batches(batch_size=BATCH_ROWS, row_groups=[g], columns=names,
                                                   use_threads=False):
                yield row, batch
                row += batch.num_rows

    for row, batch in prefetch(batches()):
        end = row + batch.num_rows
        pieces = []
        for idx in (train, valid):
            local = idx[np.searchsorted(idx, row): np.searchsorted(idx, end)] - row
            pieces.append(batch.take(pa.array(local, pa.int64())))
        if count_before:
            report.rows_read += batch.num_rows
            for column, texts in zip(TEXT_COLUMNS, text_views(batch)):
                report.lengths_before[column].add(pc.drop_null(pc.utf8_length(texts)).to_numpy())
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
        for column, texts in zip(TEXT_COLUMNS, text_views(table)):
            report.lengths_after[column].add(pc.drop_null(pc.utf8_length(texts)).to_numpy())

    def commit(self, report: SampleReport):
        self.writer.close()
        os.replace(self.tmp, self.path)
        report.kept[self.path] = self.rows
        report.output_bytes[self.path] = os.path.getsize(self.path)

    def discard(self):
        self.writer.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def write_chosen(files, chosen, schema: pa.Schema, output: str, valid_output: str | None,
                  row_group_size: int, seed: int, count_before: bool, progress: bool, report: SampleReport):
    """Stream the chosen rows of every source into the outputs, one row group at a time.

    Each row group takes rows from every source in proportion to what that source
    still has to give, so a mix stays a mix throughout the file.
    """
    names = schema.names
    rows_to_read = 0
    for parquet_file, (train, valid) in zip(files, chosen):
        sizes = row_group_sizes(parquet_file)
        rows_to_read += int(sizes[groups_to_read(sizes, train, valid)].sum())
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
