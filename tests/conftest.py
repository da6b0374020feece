"""Shared fixtures: tiny parquet data and a tiny tokenizer, made in temporary folders."""
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` on two cores: one compute thread per test process (and in the processes its
    # tests start), or OpenMP threads spin on each other and every test crawls.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DIR = os.path.join(ROOT, "..", "shared", "data", "chatlm_sample")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data"))


def write_rows(path, prompts, responses, row_group_size=None, **extra):
    table = pa.table({"prompt": pa.array(prompts, pa.string()), "response": pa.array(responses, pa.string()),
                      **{k: pa.array(v) for k, v in extra.items()}})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def demo_rows(n, seed=0):
    """n rows of the demo's number tasks (short, learnable)."""
    import random

    from make_demo_data import num2zh, zh2num
    rng = random.Random(seed)
    rows = [(num2zh if i % 2 else zh2num)(rng.randrange(10000)) for i in range(n)]
    return [p for p, _ in rows], [r for _, r in rows]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prompts, responses = demo_rows(400)
    write_rows(d / "train.parquet", prompts, responses, row_group_size=150, row_id=list(range(400)))
    prompts, responses = demo_rows(24, seed=1)
    write_rows(d / "valid.parquet", prompts, responses)
    return d


@pytest.fixture(scope="session")
def tokenizer_dir(data_dir, tmp_path_factory):
    from utils.tokenizer import train_tokenizer
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(str(data_dir / "train.parquet"), str(out), vocab_size=128, model_max_length=32)
    return str(out)


def tiny_flags(tmp_path, data_dir, tokenizer_dir, **overrides):
    """Flags for a fast tiny run writing everything under tmp_path."""
    flags = dict(train_file=str(data_dir / "train.parquet"), validation_file=str(data_dir / "valid.parquet"),
                 tokenizer_dir=tokenizer_dir, output_dir=str(tmp_path / "out"),
                 train_state_dir=str(tmp_path / "out" / "state"), model_size="tiny", max_seq_len=32,
                 batch_size_per_gpu=8, gradient_accumulation_steps=1, learn_rate=1e-3, warmup_steps=5,
                 epochs=1, logging_steps=1, save_steps=1000, dataloader_buffer_size=64, max_eval_rows=8,
                 log_with="none", seed=7)
    flags.update(overrides)
    return flags


def free_port() -> int:
    """A TCP port free now: each two-process launch gets its own rendezvous, so two launched by
    the two test processes at once never join each other's run (all would otherwise use 29500)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd, timeout=300, text=True):
    """Run a multi-process launch (accelerate launch ...) to its end, like subprocess.run with
    captured output. A launch still running at `timeout` is a hang: every process of it dumps
    its threads' Python stacks (faulthandler, on SIGABRT) into the output the test then fails
    with, so a deadlock seen once on CI says where it was."""
    import signal

    import psutil
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1", "PYTHONUNBUFFERED": "1"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.send_signal(signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, cmd[:8]))} ... hung for {timeout} s; its stacks:\n"
                             f"{out[-6000:]}\n{err[-12000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def as_args(flags):
    return [f"--{k}={v}" for k, v in flags.items()]


def run_cli(*args, check=True, timeout=600, env=None):
    """Run an entry script as a user would; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def as_dpo_file(path, out):
    """The prompt/response file at `path` as DPO pairs: chosen = response, rejected = another
    text of the same length class (the response reversed, or with 零 appended); other columns kept."""
    table = pq.read_table(path)
    responses = table.column("response").to_pylist()
    rejected = [None if r is None else (r[::-1] if r[::-1] != r else r + "零") for r in responses]
    columns = {"prompt": table.column("prompt"), "chosen": table.column("response"),
               "rejected": pa.array(rejected, pa.string())}
    columns.update({c: table.column(c) for c in table.column_names if c not in ("prompt", "response")})
    pq.write_table(pa.table(columns), out, row_group_size=pq.ParquetFile(path).metadata.row_group(0).num_rows)
    return str(out)


def as_messages_file(path, out, remember_every=3):
    """The prompt/response file at `path` as conversations (a `messages` column): each row the user
    turn and the assistant turn; every `remember_every`-th row (0: none) first asks to remember
    its number (a second assistant turn, 好的。); a row with an empty prompt or response an empty
    turn (malformed, skipped). Other columns kept. Returns the path and, per row, its assistant turns."""
    table = pq.read_table(path)
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    conversations, turns = [], []
    for i, (p, r) in enumerate(zip(table.column("prompt").to_pylist(), table.column("response").to_pylist())):
        earlier = [{"role": "user", "content": f"记住{i}。"}, {"role": "assistant", "content": "好的。"}] \
            if remember_every and i % remember_every == 0 else []
        conversations.append(earlier + [{"role": "user", "content": p}, {"role": "assistant", "content": r}])
        turns.append(0 if not (p and p.strip() and r and r.strip()) else 1 + bool(earlier))
    columns = {"messages": pa.array(conversations, pa.list_(message))}
    columns.update({c: table.column(c) for c in table.column_names if c not in ("prompt", "response")})
    pq.write_table(pa.table(columns), out, row_group_size=pq.ParquetFile(path).metadata.row_group(0).num_rows)
    return str(out), turns


@pytest.fixture(scope="session")
def base_model(data_dir, tokenizer_dir, tmp_path_factory):
    """A tiny model trained a few steps: what alignment starts from."""
    out = tmp_path_factory.mktemp("base")
    flags = tiny_flags(out, data_dir, tokenizer_dir, max_steps=6, learn_rate=3e-3, validation_file="")
    run_cli("train.py", "train", *as_args(flags))
    return os.path.join(flags["output_dir"], "final")


# Training modes the shared behaviours (resume, multi-process coverage, accumulation) are tested
# in: flags, and the data they need: DPO pairs ("pairs"), conversations ("messages"), or the
# prompt/response rows (False).
MODES = {"seq2seq": ({}, False), "dpo": ({"objective": "dpo"}, "pairs"),
         "messages": ({}, "messages"),
         "lora": ({"trainable": "lora", "lora_dropout": 0.0}, False),
         "lora+kl": ({"trainable": "lora", "lora_dropout": 0.0, "kl_beta": 0.1}, False),
         # The barely trained base model often earns every completion of a batch the same reward:
         # these tests are about resume and coverage, not about the no-signal stop.
         "grpo": ({"objective": "grpo", "grpo_group_size": 2, "grpo_max_new_tokens": 4, "reward": "lcs_f1",
                   "grpo_max_zero_signal_steps": 0}, False)}


def mode_flags(mode, base_model):
    flags, data = MODES[mode]
    return ({**flags, "init_from": base_model} if mode not in ("seq2seq", "messages") else {}), data


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(capsys, *argv):
    """`python train.py ARGV` in this process (no interpreter start-up): exit status and output."""
    import train as commands
    from accelerate.state import AcceleratorState, GradientState
    from utils.cli import run_cli as run
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    capsys.readouterr()
    try:
        run(commands.COMMANDS, "train.py", list(argv))
        code = 0
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return Result(code, out.out, out.err)


def train(flags, hooks=()):
    """One in-process run of `train` with these flags (a fresh Accelerate state), extended by
    `hooks` (see model.trainer.Hooks); the trainer."""
    from accelerate.state import AcceleratorState, GradientState

    from config import load_config
    from model.trainer import ChatTrainer
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    trainer = ChatTrainer(load_config(**flags), hooks=hooks)
    trainer.train()
    return trainer


class StopAt:
    """A hook that sends the run a stop, as SIGTERM from a scheduler would: during optimizer step
    `step` (the run saves its state after that step and exits), or while the final evaluation runs
    (`in_final_saves`)."""

    def __init__(self, step=None, in_final_saves=False):
        self.step, self.in_final_saves = step, in_final_saves

    def on_step_end(self, trainer):
        if self.step is not None and trainer.progress.step == self.step - 1:
            trainer.request_stop()

    def on_evaluate(self, trainer):
        if self.in_final_saves and trainer.progress.step == trainer.cfg.max_steps:
            trainer.request_stop()


def saved_before_templates(model_dir, dest) -> str:
    """A copy of `model_dir` at `dest` as a model saved before chat templates existed (its
    tokenizer has none)."""
    import json
    import shutil
    shutil.copytree(model_dir, dest)
    config_file = os.path.join(dest, "tokenizer_config.json")
    config = json.load(open(config_file))
    config.pop("chat_template", None)
    json.dump(config, open(config_file, "w"))
    for name in os.listdir(dest):
        if name.startswith("chat_template"):
            os.remove(os.path.join(dest, name))
    return str(dest)
