"""Conversations: rows from a `messages` column, the chat template every HF tool applies, history
in `chat` and `serve`, and the ONNX export. (Resume and two-process coverage with conversations:
the `messages` mode of tests/test_trainer.py.)"""
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, as_args, cli, run_cli, saved_before_templates, tiny_flags, train

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_conversations(path, conversations, **extra):
    pq.write_table(pa.table({"messages": pa.array(conversations, pa.list_(MESSAGE)), **extra}), path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from utils.tokenizer import CHAT_TEMPLATE, load_tokenizer
    tok = load_tokenizer(tokenizer_dir)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_a_conversation_gives_a_row_per_assistant_turn_and_bad_ones_are_counted(tokenizer):
    from model.conversations import expand
    from model.objectives import Seq2Seq
    system = {"role": "system", "content": "S"}
    good = [system, user("把1写成中文数字。"), assistant("一"), user("它是多少？"), assistant("1")]
    bad = [[assistant("一")],  # no user turn before the answer
           [user("q")],  # no assistant turn
           [user("q"), {"role": "tool", "content": "x"}, assistant("a")],  # an unknown role
           [user("q"), assistant(" ")],  # an empty turn
           [user("q"), user("q"), assistant("a")],  # two user turns in a row
           [user("q"), system, assistant("a")]]  # a system turn after the first
    texts = {"messages": [good, *bad], "task": ["t0", *[f"b{i}" for i in range(len(bad))]]}
    out, rows, cut = expand(tokenizer, texts, np.arange(10, 17), ("response",), 256)
    assert out["prompt"][:2] == ["<system>S<user>把1写成中文数字。", "<system>S<user>把1写成中文数字。<assistant>一<user>它是多少？"]
    assert out["response"][:2] == ["一", "1"] and out["task"][:2] == ["t0", "t0"] and list(rows[:2]) == [10, 10]
    assert out["prompt"][2:] == [""] * len(bad) and cut == 0  # each malformed conversation: one row, skipped
    assert Seq2Seq().usable_rows(out).tolist() == [True, True] + [False] * len(bad)
    last, rows, _ = expand(tokenizer, {"messages": [good]}, np.arange(1), ("response",), 256, last_turn_only=True)
    assert last["response"] == ["1"] and list(rows) == [0]
    # Too long: the system message and the latest turns stay, whole old turns go first.
    long = [system] + [t for i in range(6) for t in (user(f"把{i}写成中文数字。"), assistant("零"))] + \
        [user("它是多少？"), assistant("5")]
    budget = len(tokenizer("<system>S<user>把5写成中文数字。<assistant>零<user>它是多少？")["input_ids"])
    cut_rows, _, cut = expand(tokenizer, {"messages": [long]}, np.arange(1), ("response",), budget, last_turn_only=True)
    assert cut_rows["prompt"] == ["<system>S<user>把5写成中文数字。<assistant>零<user>它是多少？"] and cut == 1
    # DPO: the conversation is the history chosen and rejected answer; it must end with a user turn.
    pairs, _, _ = expand(tokenizer, {"messages": [good[:-1], good], "chosen": ["1", "1"], "rejected": ["2", "2"]},
                         np.arange(2), ("chosen", "rejected"), 256)
    assert pairs["prompt"] == ["<system>S<user>把1写成中文数字。<assistant>一<user>它是多少？", ""]


def test_conversations_train_and_the_saved_template_gives_the_training_input(tmp_path, data_dir, tokenizer_dir,
                                                                              base_model):
    """A run on conversations mixed with single-turn rows (weighted sources): the encoder inputs of
    its batches are the template's text of each history, byte for byte, in the directory it saves
    (AutoTokenizer); a single-turn row's input is its prompt as before."""
    from transformers import AutoTokenizer
    conversations = [[user(f"记住{n}。"), assistant("好的。"), user("它是多少？"), assistant(str(n))] for n in range(64)]
    chats = write_conversations(tmp_path / "chats.parquet", conversations, row_id=list(range(64)))
    seen = {}

    class Capture:
        def on_batch(self, trainer, batch):
            if batch is not None:
                for row, ids, mask in zip(batch["row_index"].tolist(), batch["input_ids"], batch["attention_mask"]):
                    seen.setdefault(row, []).append(ids[mask.bool()].tolist())
    single = str(data_dir / "train.parquet")
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, train_file={chats: 1, single: 1}, validation_file="",
                       max_steps=12, max_seq_len=48)
    trainer = train(flags, hooks=[Capture()])
    saved = AutoTokenizer.from_pretrained(os.path.join(flags["output_dir"], "final"))
    for row in range(64):
        if row not in seen:
            continue
        history = conversations[row][:1], conversations[row][:3]
        expected = [saved(saved.apply_chat_template(h, tokenize=False))["input_ids"] for h in history]
        assert all(inputs in expected for inputs in seen[row]), row
        assert saved.apply_chat_template(history[1], tokenize=False) == f"<user>记住{row}。<assistant>好的。<user>它是多少？"
    prompts = pq.read_table(single).column("prompt").to_pylist()
    for row, inputs in seen.items():
        if row >= 64:  # a single-turn row: its prompt, as before conversations
            assert inputs == [saved(prompts[row - 64])["input_ids"]]
            assert saved.apply_chat_template([user(prompts[row - 64])], tokenize=False) == prompts[row - 64]
    assert len([r for r in seen if r < 64]) and len([r for r in seen if r >= 64])
    assert trainer.progress.samples == sum(len(v) for v in seen.values())
    # A single-turn model answers a one-message conversation as it answers the prompt, and a
    # model saved before templates existed answers as before.
    from model.infer import ChatBot
    bot = ChatBot(base_model, "cpu")
    assert bot.answer([[user(p)] for p in prompts[:4]]) == bot.answer(prompts[:4])
    old_bot = ChatBot(saved_before_templates(base_model, tmp_path / "old"), "cpu")
    assert not old_bot.has_template and old_bot.answer(prompts[:4]) == bot.answer(prompts[:4])


def test_bad_conversation_files_are_one_error_line(tmp_path, data_dir, tokenizer_dir, base_model, capsys):
    only_bad = write_conversations(tmp_path / "bad.parquet", [[user("q")], [assistant("a")], [user(" "), assistant("a")]])
    wrong_type = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"messages": ["not a conversation"]}), wrong_type)
    good = write_conversations(tmp_path / "good.parquet", [[user("q"), assistant("a")]])
    cases = [({"train_file": only_bad}, "no usable conversation"),
             ({"train_file": str(wrong_type)}, "list of {role, content}"),
             ({"train_file": good, "objective": "grpo", "init_from": base_model, "reward": "lcs_f1"}, "GRPO")]
    for change, message in cases:
        proc = cli(capsys, "train", *as_args(tiny_flags(tmp_path, data_dir, tokenizer_dir, validation_file="",
                                                        **change)))
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert message in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny model trained to answer 它是多少？ with the digit an earlier turn asked to remember
    (a model that did not read the history would be right one time in ten)."""
    import random
    out = tmp_path_factory.mktemp("chat")
    rng = random.Random(0)
    conversations = [[user(f"记住{n}。"), assistant("好的。"), user("它是多少？"), assistant(str(n))]
                     for n in rng.choices(range(10), k=800)]
    path = write_conversations(out / "chats.parquet", conversations)
    flags = dict(train_file=path, validation_file="", tokenizer_dir=str(out / "tokenizer"), vocab_size=96,
                 output_dir=str(out / "model"), train_state_dir=str(out / "model" / "state"), model_size="tiny",
                 max_seq_len=48, batch_size_per_gpu=32, gradient_accumulation_steps=1, learn_rate=3e-3,
                 warmup_steps=20, epochs=8, max_steps=150, last_turn_only=True, log_with="none", seed=3)
    train(flags)
    return str(out / "model" / "final")


def test_a_multi_turn_model_answers_from_the_history_in_serve_and_chat(chat_model):
    from openai import OpenAI

    from test_serve import live_server
    with live_server(chat_model) as base:
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        for n in (3, 7, 9):
            history = [user(f"记住{n}。"), assistant("好的。"), user("它是多少？")]
            reply = client.chat.completions.with_raw_response.create(model="test/model", messages=history)
            assert reply.parse().choices[0].message.content == str(n)
            assert reply.headers["x-chatlm-dropped-messages"] == "0" and "x-chatlm-ignored-messages" not in reply.headers
    script = "记住5。\n它是多少？\n/new\n记住8。\n它是多少？\n\n"
    proc = subprocess.run([sys.executable, "train.py", "chat", f"--model_dir={chat_model}"], cwd=ROOT, input=script,
                          capture_output=True, text=True, timeout=120)
    answers = [line.lstrip("> ").strip() for line in proc.stdout.splitlines()[1:]]
    assert proc.returncode == 0 and "/new" in proc.stdout.splitlines()[0], proc.stdout
    assert answers[1] == "5" and answers[4] == "8", answers


def test_onnx_export_answers_as_the_model(tmp_path, chat_model):
    from model.export import OnnxSeq2Seq
    from model.infer import ChatBot
    out = tmp_path / "onnx"
    proc = run_cli("train.py", "export", f"--model_dir={chat_model}", "--format=onnx", f"--output_dir={out}")
    assert "checked equal" in proc.stdout
    assert {"encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx", "config.json",
            "tokenizer.json"} <= set(os.listdir(out))
    bot = ChatBot(chat_model, "cpu")
    prompts = [bot.prompt_text([user(f"记住{n}。"), assistant("好的。"), user("它是多少？")]) for n in (3, 5, 9)]
    prompts += ["把12写成中文数字。", "记住"]
    assert OnnxSeq2Seq(str(out)).answer(bot.tokenizer, prompts, bot.max_new_tokens) == bot.answer(prompts)
    again = run_cli("train.py", "export", f"--model_dir={chat_model}", "--format=onnx", f"--output_dir={out}",
                    check=False)
    assert again.returncode == 2 and "--overwrite=True" in again.stderr and again.stderr.count("\n") == 1
    other = run_cli("train.py", "export", f"--model_dir={chat_model}", "--format=tflite", f"--output_dir={out}x",
                    check=False)
    assert other.returncode == 2 and "onnx" in other.stderr and not os.path.exists(f"{out}x")
    for over in (chat_model, os.path.dirname(chat_model)):  # the model itself, or the folder holding it
        itself = run_cli("train.py", "export", f"--model_dir={chat_model}", f"--output_dir={over}",
                         "--overwrite=True", check=False)
        assert itself.returncode == 2 and "model directory itself" in itself.stderr
        assert os.path.isfile(os.path.join(chat_model, "model.safetensors"))
