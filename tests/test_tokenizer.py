import pytest
from transformers import AutoTokenizer

from conftest import write_rows
from utils.errors import UserError
from utils.tokenizer import iter_corpus, load_tokenizer, train_tokenizer


def test_special_ids_eos_appended_and_loadable(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.unk_token is not None
    ids = tok("把12写成中文数字。").input_ids
    assert ids[-1] == 1 and ids.count(1) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "把12写成中文数字。"


def test_truncation_keeps_eos(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    ids = tok("一二三四五六七八九十" * 10, truncation=True, max_length=8).input_ids
    assert len(ids) == 8 and ids[-1] == 1


def test_digits_split_and_spaces_survive(tmp_path):
    path = write_rows(tmp_path / "t.parquet", ["hello world 2024"] * 50, ["你好 世界"] * 50)
    tok = train_tokenizer(path, str(tmp_path / "tok"), vocab_size=300)
    assert tok.decode(tok("hello world 2024").input_ids, skip_special_tokens=True) == "hello world 2024"
    assert "2024" not in tok.convert_ids_to_tokens(tok("2024").input_ids)


def test_vocab_size_flag(tmp_path, data_dir):
    tok = train_tokenizer(str(data_dir / "train.parquet"), str(tmp_path / "tok"), vocab_size=150)
    assert len(tok) == 150


def test_corpus_is_sampled_not_loaded_whole(tmp_path):
    path = write_rows(tmp_path / "big.parquet", [f"问题{i}" for i in range(20000)],
                      [f"回答{i}" for i in range(20000)], row_group_size=1000)
    prompts = [t for t in iter_corpus([path], max_rows=2000, seed=0) if t.startswith("问题")]
    assert 1700 < len(prompts) < 2300  # about max_rows rows of 20000, from every part of the file
    assert min(int(t[2:]) for t in prompts) < 1000 and max(int(t[2:]) for t in prompts) > 19000


def test_text_files_are_a_corpus_too(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("今天天气很好\n" * 100 + "\n" + "明天下雨\n" * 100, encoding="utf-8")
    tok = train_tokenizer(str(path), str(tmp_path / "tok"), vocab_size=100)
    assert tok.decode(tok("今天下雨").input_ids, skip_special_tokens=True) == "今天下雨"


def test_bad_corpus_file_is_one_line_and_exit_2(tmp_path):
    from conftest import run_cli
    bad = tmp_path / "notes.parquet"
    bad.write_text("x")
    proc = run_cli("train.py", "train_tokenizer", f"--files={bad}", f"--output_dir={tmp_path / 'tok'}", check=False)
    assert proc.returncode == 2 and "not a readable parquet file" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_missing_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no tokenizer"):
        load_tokenizer(str(tmp_path))
