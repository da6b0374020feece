"""Write the bundled demo data: three synthetic Chinese tasks a tiny model learns on a CPU.

    python data/make_demo_data.py            # writes data/demo_{train,valid,test}.parquet
                                             # and data/demo_{dpo,style,chat}_{train,valid,test}.parquet

Tasks (column `task` names them; `prompt` and `response` are what the trainer reads):
- `num2zh`:  把1205写成中文数字。          -> 一千二百零五
- `zh2num`:  一千二百零五是多少？          -> 1205
- `date2zh`: 把2024-03-05写成中文日期。    -> 二〇二四年三月五日

The alignment demos teach the trained demo model a new style of answer, `是{answer}。`: DPO on
pairs (chosen in the style, rejected the plain answer) and seq2seq with LoRA and a KL penalty.

The multi-turn demo (`messages`: a conversation of {role, content} turns; data/demo_chat.yaml)
asks a question that cannot be answered without the earlier turn:
- `chat_num2zh`:  记住1205。 -> 好的。 -> 把它写成中文数字。 -> 一千二百零五
- `chat_zh2num`:  记住一千二百零五。 -> 好的。 -> 它是多少？ -> 1205
- `chat_date2zh`: 记住2024-03-05。 -> 好的。 -> 把它写成中文日期。 -> 二〇二四年三月五日
a third of them after a system message; its test split also holds the single-turn tasks (as
one-question conversations), which the demo trains on beside the conversations.

The output is a pure function of the seed. Held-out numbers and dates never occur in the
training split, in either direction, so the test split measures generalisation.
"""
import datetime
import os
import random

import fire
import pyarrow as pa
import pyarrow.parquet as pq

DIGITS = "零一二三四五六七八九"
YEAR_DIGITS = "〇一二三四五六七八九"
UNITS = ["", "十", "百", "千"]


def to_chinese_number(n: int) -> str:
    """0 <= n <= 9999 in Chinese numerals: 10 -> 十, 15 -> 十五, 101 -> 一百零一, 1050 -> 一千零五十."""
    if not 0 <= n <= 9999:
        raise ValueError(f"{n} is outside 0..9999")
    if n == 0:
        return DIGITS[0]
    digits = [int(d) for d in str(n)]
    out, pending_zero = [], False
    for i, d in enumerate(digits):
        unit = UNITS[len(digits) - 1 - i]
        if d == 0:
            pending_zero = True  # one 零 stands for any run of inner zeros; trailing zeros vanish
            continue
        if pending_zero:
            out.append(DIGITS[0])
            pending_zero = False
        # 10..19 read 十, 十五 (not 一十五); inside larger numbers the 一 stays: 一百一十.
        if not (d == 1 and unit == "十" and i == 0):
            out.append(DIGITS[d])
        out.append(unit)
    return "".join(out)


def to_chinese_date(day: datetime.date) -> str:
    """2024-03-05 -> 二〇二四年三月五日: the year digit by digit, month and day as numbers."""
    year = "".join(YEAR_DIGITS[int(c)] for c in f"{day.year:04d}")
    return f"{year}年{to_chinese_number(day.month)}月{to_chinese_number(day.day)}日"


def num2zh(n: int) -> tuple[str, str]:
    return f"把{n}写成中文数字。", to_chinese_number(n)


def zh2num(n: int) -> tuple[str, str]:
    return f"{to_chinese_number(n)}是多少？", str(n)


def date2zh(day: datetime.date) -> tuple[str, str]:
    return f"把{day.isoformat()}写成中文日期。", to_chinese_date(day)


def all_dates() -> list[datetime.date]:
    first, last = datetime.date(1900, 1, 1), datetime.date(2099, 12, 31)
    return [first + datetime.timedelta(days=i) for i in range((last - first).days + 1)]


def write(rows: list[tuple[str, str, str]], path: str) -> None:
    tasks, prompts, responses = zip(*rows)
    table = pa.table({"prompt": list(prompts), "response": list(responses), "task": list(tasks)})
    pq.write_table(table, path, compression="zstd")


def styled(answer: str) -> str:
    """The alignment demos' new style: 1050 -> 是1050。 (characters the demo tokenizer has)."""
    return f"是{answer}。"


SYSTEM = "你是一个数字助手。"


def remembered(task: str, item) -> tuple[str, str, str]:
    """A conversation's fact, its question about it and the answer."""
    if task == "chat_num2zh":
        return str(item), "把它写成中文数字。", to_chinese_number(item)
    if task == "chat_zh2num":
        return to_chinese_number(item), "它是多少？", str(item)
    return item.isoformat(), "把它写成中文日期。", to_chinese_date(item)


def conversation(task: str, item, system: bool) -> list[dict]:
    fact, question, answer = remembered(task, item)
    turns = [{"role": "user", "content": f"记住{fact}。"}, {"role": "assistant", "content": "好的。"},
             {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return ([{"role": "system", "content": SYSTEM}] if system else []) + turns


def write_chat(rows: list[tuple[str, list[dict]]], path: str) -> None:
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    table = pa.table({"messages": pa.array([m for _, m in rows], pa.list_(message)),
                      "task": [t for t, _ in rows]})
    pq.write_table(table, path, compression="zstd")


def write_style(rows: list[tuple[str, str, str]], out_dir: str, name: str) -> None:
    """The same prompts as DPO pairs (chosen in the new style, rejected as before) and as
    prompt -> styled response for the seq2seq (LoRA + KL) demo."""
    tasks, prompts, responses = zip(*rows)
    pairs = pa.table({"prompt": list(prompts), "chosen": [styled(r) for r in responses],
                      "rejected": list(responses), "task": list(tasks)})
    pq.write_table(pairs, os.path.join(out_dir, f"demo_dpo_{name}.parquet"), compression="zstd")
    sft = pa.table({"prompt": list(prompts), "response": [styled(r) for r in responses], "task": list(tasks)})
    pq.write_table(sft, os.path.join(out_dir, f"demo_style_{name}.parquet"), compression="zstd")


def main(out_dir: str = os.path.dirname(os.path.abspath(__file__)), seed: int = 42,
         test_per_task: int = 300, valid_per_task: int = 100, train_dates: int = 12000,
         style_rows_per_task: int = 1000) -> None:
    rng = random.Random(seed)
    numbers = list(range(10000))
    rng.shuffle(numbers)
    held = test_per_task + valid_per_task
    # The same held-out numbers are removed from both number tasks, so that neither
    # direction of a test item is seen in training.
    test_nums, valid_nums, train_nums = numbers[:test_per_task], numbers[test_per_task:held], numbers[held:]
    dates = all_dates()
    rng.shuffle(dates)
    test_dates, valid_dates = dates[:test_per_task], dates[test_per_task:held]
    train_date_items = dates[held:held + train_dates]

    def rows(nums, days):
        return ([("num2zh", *num2zh(n)) for n in nums] + [("zh2num", *zh2num(n)) for n in nums]
                + [("date2zh", *date2zh(d)) for d in days])

    train = rows(train_nums, train_date_items)
    rng.shuffle(train)
    os.makedirs(out_dir, exist_ok=True)
    splits = {"train": train, "valid": rows(valid_nums, valid_dates), "test": rows(test_nums, test_dates)}
    for name, split in splits.items():
        path = os.path.join(out_dir, f"demo_{name}.parquet")
        write(split, path)
        print(f"{path}: {len(split)} rows")
    # The alignment demos: style_rows_per_task training rows of each task, and the same
    # held-out valid and test splits (so held-out numbers and dates stay held out).
    per_task = {t: [r for r in train if r[0] == t][:style_rows_per_task] for t in ("num2zh", "zh2num", "date2zh")}
    style_train = [r for group in zip(*per_task.values()) for r in group]
    for name, split in {"train": style_train, "valid": splits["valid"], "test": splits["test"]}.items():
        write_style(split, out_dir, name)
        print(f"{out_dir}/demo_dpo_{name}.parquet, demo_style_{name}.parquet: {len(split)} rows")
    # The multi-turn demo: the same numbers and dates per split (held-out ones stay held out), a
    # generator of its own so the files above do not change.
    chat_rng = random.Random(seed + 1)

    def chat_rows(nums, days):
        items = ([("chat_num2zh", n) for n in nums] + [("chat_zh2num", n) for n in nums]
                 + [("chat_date2zh", d) for d in days])
        return [(task, conversation(task, item, chat_rng.random() < 1 / 3)) for task, item in items]

    chat_train = chat_rows(train_nums, train_date_items)
    chat_rng.shuffle(chat_train)
    single_test = [(task, [{"role": "user", "content": p}, {"role": "assistant", "content": r}])
                   for task, p, r in splits["test"]]
    chat_splits = {"train": chat_train, "valid": chat_rows(valid_nums, valid_dates),
                   "test": chat_rows(test_nums, test_dates) + single_test}
    for name, split in chat_splits.items():
        write_chat(split, os.path.join(out_dir, f"demo_chat_{name}.parquet"))
        print(f"{out_dir}/demo_chat_{name}.parquet: {len(split)} conversations")


if __name__ == "__main__":
    fire.Fire(main)
