import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SAMPLE_DIR, write_rows
from model.dataset import EvalSet, TrainStream, collate, encode, get_train_loader
from utils.errors import UserError
from utils.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def rows_file(tmp_path, n=300, row_group_size=70, empty_every=0):
    prompts = [f"{i}是多少？" for i in range(n)]
    responses = [str(i) * (1 + i % 5) for i in range(n)]
    if empty_every:
        for i in range(0, n, empty_every):
            if (i // empty_every) % 2:
                prompts[i] = None
            else:
                responses[i] = "  "
    return write_rows(tmp_path / "rows.parquet", prompts, responses, row_group_size=row_group_size,
                      row_id=list(range(n)))


def consume(stream, num_workers, limit=None, record=None):
    """Iterate like the trainer: returns row ids in order and the resume point after `limit` batches."""
    ids, positions, next_worker = [], dict(stream.positions), stream.first_worker
    for n, batch in enumerate(get_train_loader(stream, num_workers)):
        if limit is not None and n == limit:
            break
        shard, where = batch["position"]
        positions[shard] = where
        next_worker = (shard - stream.rank * stream.workers + 1) % stream.workers
        ids.append(batch["row_index"].tolist())
    return ids, positions, next_worker


def make(path, tok, rank=0, world=1, workers=0, batch=4, buffer=32, memory=False):
    return TrainStream([path], tok, batch, 32, buffer, seed=3, rank=rank, world_size=world, num_workers=workers,
                       keep_in_memory=memory)


def test_shards_are_disjoint_and_cover_every_row(tmp_path, tok):
    path = rows_file(tmp_path, empty_every=0)
    seen = []
    for rank in range(2):
        ids, _, _ = consume(make(path, tok, rank, 2, workers=2), num_workers=2)
        seen += [i for b in ids for i in b]
    assert sorted(seen) == list(range(300))


def test_empty_rows_are_skipped_and_counted(tmp_path, tok):
    path = rows_file(tmp_path, empty_every=10)
    stream = make(path, tok)
    skipped = sum(b["skipped"] for b in stream)
    ids = [i for b in make(path, tok) for i in b["row_index"].tolist()]
    assert skipped == 30 and len(ids) == 270 and not set(ids) & set(range(0, 300, 10))


def test_a_window_of_only_empty_rows_is_counted_too(tmp_path, tok):
    prompts = [None] * 40 + [f"{i}是多少？" for i in range(20)]
    path = write_rows(tmp_path / "e.parquet", prompts, ["1"] * 60)
    batches = list(make(path, tok, buffer=32))
    assert sum(b["skipped"] for b in batches) == 40 and sum(len(b["row_index"]) for b in batches) == 20


def test_each_epoch_reshuffles_and_same_seed_repeats(tmp_path, tok):
    path = rows_file(tmp_path)
    a, b = make(path, tok), make(path, tok)
    first = [x["row_index"].tolist() for x in a]
    assert first == [x["row_index"].tolist() for x in b]
    a.set_epoch(1)
    assert first != [x["row_index"].tolist() for x in a]


@pytest.mark.parametrize("workers,limit", [(0, 7), (2, 7), (2, 12)])
def test_resume_continues_with_the_next_unseen_batch(tmp_path, tok, workers, limit):
    path = rows_file(tmp_path, empty_every=9)
    full, _, _ = consume(make(path, tok, workers=workers), workers)
    head, positions, next_worker = consume(make(path, tok, workers=workers), workers, limit=limit)
    resumed = make(path, tok, workers=workers)
    resumed.set_epoch(0, positions, next_worker)
    tail, _, _ = consume(resumed, workers)
    assert head + tail == full  # the same batches in the same order: none repeated, none skipped


def test_resume_skips_windows_without_reading_them(tmp_path, tok, monkeypatch):
    path = rows_file(tmp_path, n=600, row_group_size=50)
    stream = make(path, tok, buffer=50)
    reads = []
    original = TrainStream.read
    monkeypatch.setattr(TrainStream, "read", lambda self, i, lo, hi: reads.append(i) or original(self, i, lo, hi))
    stream.set_epoch(0, {0: (10, 2)})
    batches = list(stream)
    assert len(reads) == 2  # only the last two row groups: windows 10 and 11
    assert batches[0]["position"] == (0, (10, 3))


def test_keep_in_memory_gives_the_same_batches(tmp_path, tok):
    path = rows_file(tmp_path)
    streamed = [b["row_index"].tolist() for b in make(path, tok)]
    assert streamed == [b["row_index"].tolist() for b in make(path, tok, memory=True)]


def test_several_files_and_globs_form_one_dataset(tmp_path, tok):
    a = write_rows(tmp_path / "a.parquet", ["一是多少？"] * 10, ["1"] * 10)
    b = write_rows(tmp_path / "b.parquet", ["二是多少？"] * 5, ["2"] * 5)
    stream = TrainStream([a, b], tok, 4, 32, 100, seed=0)
    assert sorted(i for x in stream for i in x["row_index"].tolist()) == list(range(15))


def test_missing_columns_name_the_columns_found(tmp_path, tok):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"question": ["a"], "answer": ["b"]}), path)
    with pytest.raises(UserError, match="found: question, answer"):
        make(str(path), tok)
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(UserError, match="not a readable parquet"):
        make(str(not_parquet), tok)
    numbers = tmp_path / "n.parquet"
    pq.write_table(pa.table({"prompt": [1], "response": ["b"]}), numbers)
    with pytest.raises(UserError, match="not string"):
        make(str(numbers), tok)


def test_texts_get_eos_and_are_truncated(tmp_path, tok):
    path = write_rows(tmp_path / "long.parquet", ["一" * 100], ["二" * 5])
    batch = next(iter(TrainStream([path], tok, 4, 16, 10, seed=0)))
    assert batch["input_ids"].shape == (1, 16) and batch["input_ids"][0, -1] == 1
    assert batch["labels"][0].tolist()[-1] == 1


@pytest.mark.skipif(not os.path.isfile(f"{SAMPLE_DIR}/my_train_dataset_3k.parquet"),
                    reason="needs the real sample data in ../shared/data/chatlm_sample (not in a lone clone)")
def test_length_grouping_pads_far_less_than_random_batches(tok, tmp_path):
    from utils.tokenizer import train_tokenizer
    path = f"{SAMPLE_DIR}/my_train_dataset_3k.parquet"
    table = pq.read_table(path)
    real_tok = train_tokenizer(path, str(tmp_path / "tok_real"), vocab_size=3000)

    def pad_fraction(batches):
        real = sum(int(b["attention_mask"].sum() + (b["labels"] >= 0).sum()) for b in batches)
        padded = sum(b["attention_mask"].numel() + b["labels"].numel() for b in batches)
        return 1 - real / padded

    grouped = pad_fraction(list(TrainStream([path], real_tok, 16, 256, 3000, seed=0)))
    src = encode(real_tok, table.column("prompt").to_pylist(), 256)
    tgt = encode(real_tok, table.column("response").to_pylist(), 256)
    order = np.random.default_rng(0).permutation(len(src))
    random_batches = [collate([src[i] for i in order[k:k + 16]], [tgt[i] for i in order[k:k + 16]])
                      for k in range(0, len(order), 16)]
    assert pad_fraction(random_batches) > 0.45
    assert grouped < 0.2


def test_eval_set_caps_rows_and_keeps_extra_columns(tmp_path, tok):
    path = write_rows(tmp_path / "v.parquet", ["一是多少？", None, "三是多少？", "四是多少？"], ["1", "2", "3", "4"],
                      task=["a", "b", "c", "d"])
    ev = EvalSet(path, tok, 32, max_rows=2)
    assert len(ev) == 2 and ev.skipped == 1 and ev.extra["task"] == ["a", "c"]


def test_stream_memory_does_not_grow_with_the_file(tmp_path, tokenizer_dir):
    """Reading the first 5000 rows of a 200k-row file costs what it costs on a 20k-row file.

    The rows are long (about 900 bytes), so a loader that read the whole 200k-row file
    (180 MB of text) would stand far above the tolerance.
    """
    import subprocess
    import sys

    from conftest import ROOT
    peaks = {}
    for rows in (20_000, 200_000):
        path = write_rows(tmp_path / f"{rows}.parquet", [f"{i}" + "问" * 50 for i in range(rows)],
                          ["答" * 250] * rows, row_group_size=5000)
        child = f"""
import sys
sys.path.insert(0, {ROOT!r})
from model.dataset import TrainStream
from utils.logging import peak_rss_gb
from utils.tokenizer import load_tokenizer
stream = TrainStream([{path!r}], load_tokenizer({tokenizer_dir!r}), 16, 64, 1000, seed=0)
seen = 0
for batch in stream:
    seen += len(batch["row_index"])
    if seen >= 5000:
        break
print(peak_rss_gb() * 1024 * 1024)
"""
        out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
        peaks[rows] = float(out.stdout.split()[-1]) / 1024  # MB
    assert peaks[200_000] < peaks[20_000] * 1.1 + 20, peaks
