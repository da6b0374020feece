import datetime

import pyarrow.parquet as pq

from conftest import ROOT
from make_demo_data import main, to_chinese_date, to_chinese_number


def test_numerals_follow_the_issue_examples():
    cases = {0: "零", 5: "五", 10: "十", 15: "十五", 20: "二十", 101: "一百零一", 110: "一百一十",
             1005: "一千零五", 1010: "一千零一十", 1050: "一千零五十", 2001: "二千零一", 9999: "九千九百九十九"}
    assert {n: to_chinese_number(n) for n in cases} == cases


def test_dates():
    assert to_chinese_date(datetime.date(2024, 3, 5)) == "二〇二四年三月五日"
    assert to_chinese_date(datetime.date(1900, 12, 31)) == "一九〇〇年十二月三十一日"


def test_generator_is_deterministic_and_test_split_is_held_out(tmp_path):
    main(out_dir=str(tmp_path), test_per_task=50, valid_per_task=20, train_dates=500)
    split = {name: pq.read_table(tmp_path / f"demo_{name}.parquet").to_pylist() for name in ("train", "valid", "test")}
    train_prompts = {r["prompt"] for r in split["train"]}
    assert not train_prompts & {r["prompt"] for r in split["test"]}
    # Held-out numbers appear in neither direction in training.
    test_numbers = {r["response"] for r in split["test"] if r["task"] == "zh2num"}
    assert not test_numbers & {r["response"] for r in split["train"] if r["task"] == "zh2num"}
    assert {r["task"] for r in split["test"]} == {"num2zh", "zh2num", "date2zh"}
    main(out_dir=str(tmp_path / "again"), test_per_task=50, valid_per_task=20, train_dates=500)
    assert pq.read_table(tmp_path / "again" / "demo_train.parquet").to_pylist() == split["train"]


def test_committed_demo_data_is_what_the_script_writes(tmp_path):
    main(out_dir=str(tmp_path))
    for name in ("train", "valid", "test"):
        for kind in ("demo", "demo_dpo", "demo_style", "demo_chat"):
            assert (pq.read_table(tmp_path / f"{kind}_{name}.parquet").to_pylist()
                    == pq.read_table(f"{ROOT}/data/{kind}_{name}.parquet").to_pylist()), (kind, name)


def test_style_demo_data_pairs_the_styled_answer_with_the_plain_one():
    pairs = pq.read_table(f"{ROOT}/data/demo_dpo_train.parquet").to_pylist()
    plain = {r["prompt"]: r["response"] for r in pq.read_table(f"{ROOT}/data/demo_train.parquet").to_pylist()}
    assert len(pairs) == 3000 and {r["task"] for r in pairs} == {"num2zh", "zh2num", "date2zh"}
    for r in pairs:
        assert r["rejected"] == plain[r["prompt"]] and r["chosen"] == f"是{r['rejected']}。"
    style = pq.read_table(f"{ROOT}/data/demo_style_test.parquet").to_pylist()
    assert all(r["response"].startswith("是") and r["response"].endswith("。") for r in style)


def test_chat_demo_needs_the_earlier_turn_and_holds_out_the_test_numbers():
    chats = {name: pq.read_table(f"{ROOT}/data/demo_chat_{name}.parquet").to_pylist() for name in ("train", "test")}
    questions = {"chat_num2zh": "把它写成中文数字。", "chat_zh2num": "它是多少？", "chat_date2zh": "把它写成中文日期。"}
    for row in chats["train"]:
        turns = [m for m in row["messages"] if m["role"] != "system"]
        assert [m["role"] for m in turns] == ["user", "assistant", "user", "assistant"]
        assert turns[0]["content"].startswith("记住") and turns[1]["content"] == "好的。"
        assert turns[2]["content"] == questions[row["task"]]  # the question alone does not say which number
    assert 0.25 < sum(r["messages"][0]["role"] == "system" for r in chats["train"]) / len(chats["train"]) < 0.4
    remembered = {r["messages"][-4]["content"] for r in chats["train"]}
    held = [r for r in chats["test"] if r["task"].startswith("chat_")]
    assert len(held) == 900 and not remembered & {r["messages"][-4]["content"] for r in held}
    assert {r["task"] for r in chats["test"]} == set(questions) | {"num2zh", "zh2num", "date2zh"}
