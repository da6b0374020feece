"""Tests of the streaming dataset sampler (the utils/sampling package, sample_training_data.py)."""
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from utils import sampling
from utils.errors import UserError
from utils.sampling import SmartOptions, Source, get_sources, get_text_features, sample_parquet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IDEOGRAPHS = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]


def _chinese(rng: np.random.Generator, length: int) -> str:
    """Chinese-looking text without repeated phrases: random ideographs, a comma every ~12."""
    chars = [IDEOGRAPHS[i] for i in rng.integers(0, len(IDEOGRAPHS), length)]
    for pos in range(11, length, 12):
        chars[pos] = "，"
    return "".join(chars)


def _write(path, prompts, responses, row_ids=None, row_group_size=64, pandas_metadata=True):
    row_ids = list(range(len(prompts))) if row_ids is None else row_ids
    table = pa.table({"row_id": pa.array(row_ids, pa.int64()), "prompt": pa.array(prompts, pa.string()),
                      "response": pa.array(responses, pa.string())})
    if pandas_metadata:  # as files written by pandas carry, with the input's (wrong for a sample) index
        table = table.replace_schema_metadata({b"pandas": b'{"index_columns": []}', b"origin": b"test"})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def _make_input(path, rows=1000, seed=0, prefix="", row_group_size=64):
    rng = np.random.default_rng(seed)
    prompts = [prefix + _chinese(rng, int(rng.integers(10, 40))) + "？" for _ in range(rows)]
    responses = [_chinese(rng, int(rng.integers(80, 200))) for _ in range(rows)]
    return _write(path, prompts, responses, row_group_size=row_group_size)


def _row_ids(path) -> np.ndarray:
    return pq.read_table(path, columns=["row_id"])["row_id"].to_numpy()


@pytest.fixture(scope="module")
def input_1k(tmp_path_factory):
    # 1000 rows in row groups of 64, the last one partial (1000 = 15 * 64 + 40)
    return _make_input(tmp_path_factory.mktemp("data") / "train.parquet")


# ---------------------------------------------------------------- random mode

def test_random_takes_exact_count_without_repeats_and_keeps_rows_intact(input_1k, tmp_path):
    out = str(tmp_path / "out.parquet")
    report = sample_parquet([Source(input_1k, num_samples=300)], out, row_group_size=50, progress=False)

    sample = pq.read_table(out)
    source = pq.read_table(input_1k)
    ids = sample["row_id"].to_numpy()
    assert sample.num_rows == 300 and len(set(ids)) == 300
    assert sample["prompt"].to_pylist() == source["prompt"].take(ids).to_pylist()
    assert sample["response"].to_pylist() == source["response"].take(ids).to_pylist()
    assert report.kept == {out: 300}


def test_output_has_input_schema_row_groups_and_no_temporary_file(input_1k, tmp_path):
    out = str(tmp_path / "out.parquet")
    sample_parquet([Source(input_1k, num_samples=230)], out, row_group_size=50, progress=False)

    parquet_file = pq.ParquetFile(out)
    assert parquet_file.schema_arrow.equals(pq.read_schema(input_1k), check_metadata=False)
    assert parquet_file.schema_arrow.field("prompt").type == pa.string()
    # pandas metadata describes the input's index, wrong for the sample; other metadata stays
    assert parquet_file.schema_arrow.metadata == {b"origin": b"test"}
    sizes = [parquet_file.metadata.row_group(g).num_rows for g in range(parquet_file.metadata.num_row_groups)]
    assert sizes == [50, 50, 50, 50, 30]
    assert os.listdir(tmp_path) == ["out.parquet"]


def test_same_seed_same_rows_other_seed_other_rows(input_1k, tmp_path):
    paths = [str(tmp_path / f"{name}.parquet") for name in ("a", "b", "c")]
    for path, seed in zip(paths, (7, 7, 8)):
        sample_parquet([Source(input_1k, num_samples=100)], path, seed=seed, progress=False)
    a, b, c = (_row_ids(p) for p in paths)
    assert np.array_equal(a, b)
    assert len(set(a) & set(c)) < 50  # two independent draws of 10% share ~10 rows


def test_random_sample_is_uniform_over_row_ids(tmp_path):
    # 1000 rows in row groups of 70 (the last one partial); 200 draws of 50 rows.
    path = _make_input(tmp_path / "in.parquet", rows=1000, row_group_size=70)
    counts = np.zeros(20, np.int64)  # buckets of 50 row ids
    for seed in range(200):
        out = str(tmp_path / "out.parquet")
        sample_parquet([Source(path, num_samples=50)], out, seed=seed, progress=False, overwrite=True)
        counts += np.bincount(_row_ids(out) // 50, minlength=20)
    expected = 200 * 50 / 20
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 43.82, (chi_square, counts)  # 19 degrees of freedom, p = 0.001


def test_ratio_takes_that_share_of_rows(input_1k, tmp_path):
    out = str(tmp_path / "out.parquet")
    sample_parquet(get_sources([input_1k], None, [0.25]), out, progress=False)
    assert pq.read_metadata(out).num_rows == 250


def test_validation_sample_is_disjoint_random(input_1k, tmp_path):
    out, valid = str(tmp_path / "train.parquet"), str(tmp_path / "valid.parquet")
    report = sample_parquet([Source(input_1k, num_samples=400)], out, valid_output=valid, valid_samples=100,
                            progress=False)
    train_ids, valid_ids = _row_ids(out), _row_ids(valid)
    assert (len(train_ids), len(valid_ids)) == (400, 100)
    assert not set(train_ids) & set(valid_ids)
    assert report.kept == {out: 400, valid: 100}


def test_several_inputs_are_mixed_in_proportion(tmp_path):
    a = _make_input(tmp_path / "a.parquet", rows=600, seed=1, prefix="甲")
    b = _make_input(tmp_path / "b.parquet", rows=300, seed=2, prefix="乙")
    out = str(tmp_path / "out.parquet")
    sample_parquet([Source(a, num_samples=200), Source(b, num_samples=100)], out, row_group_size=30,
                   progress=False)

    parquet_file = pq.ParquetFile(out)
    prompts = pq.read_table(out)["prompt"].to_pylist()
    assert sum(p.startswith("甲") for p in prompts) == 200 and sum(p.startswith("乙") for p in prompts) == 100
    for group in range(parquet_file.metadata.num_row_groups):  # every row group holds both, 2:1
        firsts = [p[0] for p in parquet_file.read_row_group(group)["prompt"].to_pylist()]
        assert firsts.count("甲") == 20 and firsts.count("乙") == 10


def test_more_than_available_warns_and_keeps_all_rows(input_1k, tmp_path, capsys):
    out = str(tmp_path / "out.parquet")
    report = sample_parquet([Source(input_1k, num_samples=5000)], out, progress=False)
    assert sorted(_row_ids(out)) == list(range(1000))
    assert "warning:" in capsys.readouterr().err and len(report.warnings) == 1


def test_reads_only_row_groups_holding_chosen_rows(input_1k, tmp_path):
    report = sample_parquet([Source(input_1k, num_samples=1)], str(tmp_path / "out.parquet"), progress=False)
    assert report.rows_read in (64, 40)  # one row group of the 1000-row input


def test_never_reads_a_whole_file_or_row_group_at_once(input_1k, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the sampler must stream record batches")
    monkeypatch.setattr(pq.ParquetFile, "read", refuse)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", refuse)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", refuse)
    monkeypatch.setattr(pq, "read_table", refuse)
    sample_parquet([Source(input_1k, num_samples=100)], str(tmp_path / "r.parquet"), progress=False)
    sample_parquet([Source(input_1k, num_samples=100)], str(tmp_path / "s.parquet"), smart=SmartOptions(near_dup=True),
                   progress=False)


def test_statistics_describe_input_and_output(tmp_path):
    prompts = ["问" * n for n in range(1, 101)]
    path = _write(tmp_path / "in.parquet", prompts, ["答" * 10] * 100)
    out = str(tmp_path / "out.parquet")
    report = sample_parquet([Source(path, num_samples=100)], out, progress=False)

    before = report.lengths_before["prompt"]
    assert (report.rows_read, before.count, before.mean) == (100, 100, 50.5)
    assert (before.percentile(50), before.percentile(95)) == (50, 95)
    assert report.lengths_after["response"].mean == 10
    assert report.output_bytes[out] == os.path.getsize(out)
    text = report.format()
    assert "rows read: 100" in text and "kept: 100 rows" in text and "prompt before" in text


# ---------------------------------------------------------------- smart mode

def _planted_dataset(path):
    """200 good rows, then planted rows; returns the path and each planted kind's row ids."""
    rng = np.random.default_rng(3)
    prompts = [_chinese(rng, int(rng.integers(15, 40))) + "？" for _ in range(200)]
    responses = [_chinese(rng, int(rng.integers(100, 200))) for _ in range(200)]
    kinds = {}

    def add(kind, prompt, response):
        kinds.setdefault(kind, []).append(len(prompts))
        prompts.append(prompt)
        responses.append(response)

    for i in range(10):  # exact duplicates: identical after normalisation
        add("exact", prompts[i], responses[i])
        add("exact", " " + prompts[i + 10] + " ", responses[i + 10].replace("，", ","))  # spaces, half-width comma
    for i in range(20, 30):  # near duplicates: three characters of the answer changed
        chars = list(responses[i])
        for pos in (5, 50, 90):
            chars[pos] = "中" if chars[pos] != "中" else "国"
        add("near", prompts[i], "".join(chars))
    for prompt, response in ((None, "答案是这样的。" * 5), (prompts[0], None), ("", responses[1]),
                             ("  ", responses[2]), (prompts[3], " \n ")):
        add("empty", prompt, response)
    add("response_length", "太短？", "好")
    add("response_length", "太长？", _chinese(rng, 3000))
    add("prompt_length", "问" * 600 + "？", responses[4])
    # junk that passes the filters but scores low: repetition, no Chinese, a very short answer
    add("junk", "笑什么？", "哈" * 150)
    add("junk", "说什么？", "好的好的" * 40)
    add("junk", "what?", "asdf qwer zxcv 1234 " * 8)
    add("junk", "几点？", "三点钟吧。")
    return _write(path, prompts, responses), kinds


def test_smart_drops_planted_duplicates_and_junk_and_keeps_good_rows(tmp_path):
    path, kinds = _planted_dataset(tmp_path / "in.parquet")
    out = str(tmp_path / "out.parquet")
    report = sample_parquet([Source(path, num_samples=200)], out, smart=SmartOptions(near_dup=True),
                            progress=False)

    kept = set(_row_ids(out))
    assert len(kept) == 200
    planted = {i for ids in kinds.values() for i in ids}
    exact_pairs = [(i, 200 + 2 * i) for i in range(10)] + [(i + 10, 201 + 2 * i) for i in range(10)]
    near_pairs = list(zip(range(20, 30), kinds["near"]))
    for good, copy in exact_pairs + near_pairs:  # one of each pair, whichever scored first
        assert (good in kept) != (copy in kept)
    assert not kept & (planted - set(kinds["exact"]) - set(kinds["near"]))
    assert report.dropped == {"null_or_empty": 5, "prompt_length": 1, "response_length": 2,
                              "exact_duplicate": 20, "near_duplicate": 10, "not_selected": 4}


def test_smart_keeps_near_duplicates_without_near_dup(tmp_path):
    path, kinds = _planted_dataset(tmp_path / "in.parquet")
    out = str(tmp_path / "out.parquet")
    report = sample_parquet([Source(path, num_samples=10_000)], out, smart=SmartOptions(near_dup=False),
                            progress=False)
    assert set(kinds["near"]) <= set(_row_ids(out))
    assert report.dropped["near_duplicate"] == 0 and report.dropped["exact_duplicate"] == 20
    assert len(report.warnings) == 1  # more asked than left after the filters: all 214 kept
    assert pq.read_metadata(out).num_rows == 200 + 10 + 4


def test_smart_length_bounds_follow_the_options(tmp_path):
    path, _ = _planted_dataset(tmp_path / "in.parquet")
    options = SmartOptions(max_prompt_chars=20, min_response_chars=150)
    report = sample_parquet([Source(path, num_samples=10_000)], str(tmp_path / "out.parquet"), smart=options,
                            progress=False)
    prompts = pq.read_table(tmp_path / "out.parquet")["prompt"].to_pylist()
    responses = pq.read_table(tmp_path / "out.parquet")["response"].to_pylist()
    assert max(len(p) for p in prompts) <= 20 and min(len(r) for r in responses) >= 150
    assert report.dropped["prompt_length"] > 100 and report.dropped["response_length"] > 10


def test_smart_is_reproducible_and_validation_is_disjoint(tmp_path):
    path, _ = _planted_dataset(tmp_path / "in.parquet")
    runs = []
    for name in ("a", "b"):
        out, valid = str(tmp_path / f"{name}.parquet"), str(tmp_path / f"{name}_valid.parquet")
        sample_parquet([Source(path, num_samples=150)], out, valid_output=valid, valid_samples=40,
                       smart=SmartOptions(), progress=False)
        runs.append((_row_ids(out), _row_ids(valid)))
    (train, valid), (train_again, valid_again) = runs
    assert (len(train), len(valid)) == (150, 40) and not set(train) & set(valid)
    assert np.array_equal(train, train_again) and np.array_equal(valid, valid_again)


def test_quality_score_prefers_varied_chinese_text():
    rng = np.random.default_rng(0)
    good = _chinese(rng, 120)
    texts = {"good": good, "repeated": "哈" * 120, "phrase": "好的好的" * 30, "english": "hello world " * 10,
             "short": "三点。"}
    feats = get_text_features(pa.array(["问题是什么？"] * len(texts)), pa.array(list(texts.values())))
    score = dict(zip(texts, feats.score))
    assert score["good"] > 0.95
    assert all(score[k] < 0.5 for k in ("repeated", "phrase", "english", "short")), score


def test_exact_hash_ignores_case_space_and_width_but_not_the_split():
    prompts = ["Hello 世界？", "hello世界?", "ＨＥＬＬＯ　世界？", "Hello 世", "Hello 世界？"]
    responses = ["你好。", "你好", "你好。", "界你好。", "你好啊。"]
    hashes = get_text_features(pa.array(prompts), pa.array(responses)).exact_hash
    assert hashes[0] == hashes[1] == hashes[2]
    assert len({hashes[0], hashes[3], hashes[4]}) == 3  # prompt/response split and content matter


def test_lsh_bands_catch_near_and_not_unrelated_texts():
    rng = np.random.default_rng(1)
    base = _chinese(rng, 180)
    near = base[:60] + "变" + base[61:120] + "化" + base[121:]
    unrelated = _chinese(rng, 180)
    lsh = sampling.get_lsh_params(0.7)
    bands = get_text_features(pa.array(["问"] * 3), pa.array([base, near, unrelated]), lsh).band_hashes
    assert (bands[0] == bands[1]).any()
    assert not (bands[0] == bands[2]).any()


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("num_samples, ratio, message", [
    ([0], None, "--num_samples must be a whole number > 0"),
    ([-5], None, "--num_samples must be a whole number > 0"),
    ([2.5], None, "--num_samples must be a whole number > 0"),
    (None, [0.0], "--ratio must be a number in (0, 1]"),
    (None, [1.5], "--ratio must be a number in (0, 1]"),
    ([10], [0.5], "either --num_samples or --ratio"),
    (None, None, "either --num_samples or --ratio"),
    ([10, 20, 30], None, "2 input(s) but 3 values of --num_samples"),
])
def test_bad_counts_are_user_errors(num_samples, ratio, message):
    with pytest.raises(UserError, match=re.escape(message)):
        get_sources(["a.parquet", "b.parquet"], num_samples, ratio)


def test_bad_files_are_user_errors(input_1k, tmp_path):
    text_file = tmp_path / "notes.parquet"
    text_file.write_text("not parquet")
    other_columns = tmp_path / "other.parquet"
    pq.write_table(pa.table({"question": ["a"], "answer": ["b"]}), other_columns)
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"prompt": [1], "response": [2]}), numbers)
    out = str(tmp_path / "out.parquet")
    cases = [(tmp_path / "missing.parquet", "not found"), (tmp_path, "is a directory"),
             (text_file, "is not a readable parquet file"), (other_columns, r"no column prompt, response \(found: question, answer\)"),
             (numbers, "must be strings")]
    for path, message in cases:
        with pytest.raises(UserError, match=message):
            sample_parquet([Source(str(path), num_samples=1)], out, progress=False)
    with pytest.raises(UserError, match="also an input"):
        sample_parquet([Source(input_1k, num_samples=1)], input_1k, progress=False)
    no_row_id = tmp_path / "no_row_id.parquet"
    pq.write_table(pa.table({"prompt": ["问"], "response": ["答"]}), no_row_id)
    with pytest.raises(UserError, match="different columns"):
        sample_parquet([Source(input_1k, num_samples=1), Source(str(no_row_id), num_samples=1)], out,
                       progress=False)
    with pytest.raises(UserError, match="--valid_output and --valid_samples together"):
        sample_parquet([Source(input_1k, num_samples=1)], out, valid_output=str(tmp_path / "v.parquet"),
                       progress=False)
    with pytest.raises(UserError, match="same file"):
        sample_parquet([Source(input_1k, num_samples=1)], out, valid_output=out, valid_samples=1, progress=False)
    assert pq.read_metadata(input_1k).num_rows == 1000 and not os.path.exists(out)


def test_failed_write_leaves_no_file(input_1k, tmp_path, monkeypatch):
    out = tmp_path / "out.parquet"
    out.write_bytes(b"previous sample")

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(sampling.parquet_io._Output, "write", fail)
    with pytest.raises(OSError):
        sample_parquet([Source(input_1k, num_samples=10)], str(out), progress=False, overwrite=True)
    assert out.read_bytes() == b"previous sample" and os.listdir(tmp_path) == ["out.parquet"]


# ---------------------------------------------------------------- command line

def _run_cli(*args):
    return subprocess.run([sys.executable, "sample_training_data.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_bad_input_prints_one_line_and_exits_non_zero(tmp_path):
    missing = _run_cli("--input", tmp_path / "missing.parquet", "--output", tmp_path / "out.parquet",
                       "--num_samples", 10)
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: file ") and "missing.parquet not found" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "Traceback" not in missing.stderr

    path = _make_input(tmp_path / "in.parquet", rows=50)
    zero = _run_cli("--input", path, "--output", tmp_path / "out.parquet", "--num_samples", 0)
    assert zero.returncode == 2 and zero.stderr.strip() == (
        "error: --num_samples must be a whole number > 0, got 0")


def test_cli_mixes_inputs_and_splits_validation(tmp_path):
    a = _make_input(tmp_path / "a.parquet", rows=300, seed=1, prefix="甲")
    b = _make_input(tmp_path / "b.parquet", rows=300, seed=2, prefix="乙")
    out, valid = tmp_path / "out" / "train.parquet", tmp_path / "out" / "valid.parquet"
    result = _run_cli("--input", f"{a},{b}", "--output", out, "--num_samples", "100,50",
                      "--valid_output", valid, "--valid_samples", 30, "--smart", "--row_group_size", 40)
    assert result.returncode == 0, result.stderr
    assert "rows read: 600" in result.stdout and f"kept: 150 rows -> {out}" in result.stdout
    assert "scoring" in result.stderr and "writing" in result.stderr  # progress bars
    train, held_out = pq.read_table(out), pq.read_table(valid)
    assert (train.num_rows, held_out.num_rows) == (150, 30)
    assert [p[0] for p in train["prompt"].to_pylist()].count("甲") == 100
    keys = lambda t: set(zip(t["prompt"].to_pylist(), t["row_id"].to_pylist()))  # noqa: E731
    assert not keys(train) & keys(held_out)
    assert pq.ParquetFile(out).metadata.row_group(0).num_rows == 40


def test_near_dup_threshold_sets_how_similar_a_near_duplicate_is():
    rng = np.random.default_rng(2)
    base = _chinese(rng, 180)
    # one character in 12 changed: about half of the 3-grams differ (Jaccard ~0.5)
    half = "".join("变" if i % 12 == 6 else c for i, c in enumerate(base))
    texts = pa.array([base, half])
    loose = get_text_features(pa.array(["问"] * 2), texts, sampling.get_lsh_params(0.3)).band_hashes
    strict = get_text_features(pa.array(["问"] * 2), texts, sampling.get_lsh_params(0.9)).band_hashes
    assert (loose[0] == loose[1]).any()
    assert not (strict[0] == strict[1]).any()


def test_output_is_read_by_the_training_stream(input_1k, tmp_path, tokenizer_dir):
    from model.dataset import TrainStream
    from utils.tokenizer import load_tokenizer
    out, valid = str(tmp_path / "train.parquet"), str(tmp_path / "valid.parquet")
    sample_parquet([Source(input_1k, num_samples=300)], out, valid_output=valid, valid_samples=50,
                   row_group_size=64, progress=False)
    ids = pq.read_table(out, columns=["row_id"])["row_id"].to_pylist()
    stream = TrainStream([out, valid], load_tokenizer(tokenizer_dir), 16, 64, 100, seed=0, world_size=2, rank=1)
    seen = [i for batch in stream for i in batch["row_index"].tolist()]
    other = TrainStream([out, valid], load_tokenizer(tokenizer_dir), 16, 64, 100, seed=0, world_size=2, rank=0)
    seen += [i for batch in other for i in batch["row_index"].tolist()]
    assert sorted(seen) == list(range(350))  # every row of both files, once, across two processes
    assert len(set(ids)) == 300


def test_conversations_are_sampled_whole_and_measured_by_their_last_answer(tmp_path):
    """A file of conversations (a messages column): both modes copy conversations whole; smart mode
    measures the turns before the last answer and that answer, so one that does not end with an
    answer is dropped as empty, and duplicated conversations are dropped once."""
    rng = np.random.default_rng(3)
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    conversations = []
    for i in range(200):
        turns = [{"role": "user", "content": _chinese(rng, 20)}, {"role": "assistant", "content": _chinese(rng, 80)}]
        if i % 10 == 0:
            turns = turns[:1]  # no answer
        conversations.append(turns)
    conversations[5] = conversations[4]  # a duplicate
    path = tmp_path / "chats.parquet"
    pq.write_table(pa.table({"row_id": pa.array(range(200), pa.int64()),
                             "messages": pa.array(conversations, pa.list_(message))}), path, row_group_size=64)
    out = tmp_path / "random.parquet"
    sample_parquet([Source(str(path), num_samples=50)], str(out), seed=1, progress=False)
    kept = pq.read_table(out).to_pylist()
    assert len(kept) == 50 and all(r["messages"] == conversations[r["row_id"]] for r in kept)
    smart = tmp_path / "smart.parquet"
    report = sample_parquet([Source(str(path), num_samples=1000)], str(smart), seed=1, progress=False,
                            smart=SmartOptions(min_response_chars=4))
    ids = {r["row_id"] for r in pq.read_table(smart).to_pylist()}
    assert not ids & set(range(0, 200, 10)) and report.dropped["null_or_empty"] == 20
    assert len(ids) == 200 - 20 - 1 and not {4, 5} <= ids
