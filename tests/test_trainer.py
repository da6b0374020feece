import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from config import TrainConfig, load_config
from conftest import (MODES, ROOT, as_args, as_dpo_file, as_messages_file, cli, free_port, launch, mode_flags, run_cli,
                      tiny_flags, write_rows)
from model.evaluation import evaluate
from model.policy import get_lr_lambda, get_optimizer
from model.run import Run
from model.trainer import ChatTrainer


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; forget the previous one's settings."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield


def run_in_process(tmp_path, data_dir, tokenizer_dir, **overrides) -> ChatTrainer:
    trainer = ChatTrainer(load_config(**tiny_flags(tmp_path, data_dir, tokenizer_dir, **overrides)))
    trainer.train()
    return trainer


def logged(trainer_or_dir, key):
    """Per-step values of train/`key` from output_dir/metrics.jsonl."""
    from utils.logging import read_metrics
    out = trainer_or_dir if isinstance(trainer_or_dir, str) else trainer_or_dir.cfg.output_dir
    return [(r["step"], r[f"train/{key}"]) for r in read_metrics(out) if f"train/{key}" in r]


def test_finetune_freezes_embedding_and_encoder(tmp_path, data_dir, tokenizer_dir):
    base = run_in_process(tmp_path / "base", data_dir, tokenizer_dir, max_steps=2)
    checkpoint = os.path.join(base.cfg.output_dir, "final")
    before = load_file(os.path.join(checkpoint, "model.safetensors"))
    ft = run_in_process(tmp_path / "ft", data_dir, tokenizer_dir, is_finetune=True, finetune_from_ckp_file=checkpoint,
                        max_steps=4, learn_rate=1e-2)
    model = ft.accelerator.unwrap_model(ft.model)
    after = {k: v.detach() for k, v in model.state_dict().items()}
    frozen = [k for k in after if k.startswith(("shared.", "encoder."))]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen if k in before)
    assert torch.equal(after["shared.weight"], before["shared.weight"])
    decoder = [k for k in after if k.startswith("decoder.") and "embed_tokens" not in k]
    assert all(not torch.equal(after[k], before[k]) for k in decoder if k.endswith(".weight") and "layer_norm" not in k)
    in_optimizer = {id(p) for g in ft.optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_optimizer == trainable
    assert not any(p.requires_grad for p in model.encoder.parameters()) and not model.shared.weight.requires_grad
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed = run_in_process(tmp_path / "ft", data_dir, tokenizer_dir, is_finetune=True, is_keep_training=True,
                             finetune_from_ckp_file=checkpoint, max_steps=6, learn_rate=1e-2)
    assert resumed.progress.step == 6
    model = resumed.accelerator.unwrap_model(resumed.model)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in frozen if k in before)


def test_lr_each_step_equals_the_schedule(tmp_path, data_dir, tokenizer_dir):
    for optimizer in ("adamw", "adafactor"):
        trainer = run_in_process(tmp_path / optimizer, data_dir, tokenizer_dir, max_steps=12, warmup_steps=4,
                                 learn_rate=0.01, div_factor=10, optimizer=optimizer)
        expected = get_lr_lambda(12, 4, 10)
        lrs = logged(trainer, "lr")
        assert [s for s, _ in lrs] == list(range(1, 13))
        for step, lr in lrs:
            assert lr == pytest.approx(0.01 * expected(step - 1), rel=1e-3)
        assert lrs[0][1] == pytest.approx(0.001, rel=1e-3) and lrs[4][1] == pytest.approx(0.01, rel=1e-3)
        applied = trainer.optimizer.param_groups[0]["lr"]  # the lr the last step used
        assert applied == pytest.approx(0.01 * expected(11))


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_the_learning_rate_is_really_applied(optimizer):
    """The same gradient moves the weights twice as far with twice the lr (Adafactor with
    relative_step=True, as in the original, ignores lr and fails this)."""
    moves = []
    for lr in (1e-3, 2e-3):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        start = model.weight.detach().clone()
        opt = get_optimizer(list(model.parameters()), TrainConfig(optimizer=optimizer, learn_rate=lr, weight_decay=0.0))
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        moves.append((model.weight.detach() - start).abs().sum().item())
    assert moves[1] == pytest.approx(2 * moves[0], rel=1e-4)


# GRPO is left out: its completions are sampled per micro-batch, so 4 x 2 prompts draw other
# samples than 8 prompts at once (its loss is the loop's like any other; see test_grpo.py).
@pytest.mark.parametrize("mode", [m for m in MODES if m != "grpo"])
def test_accumulation_scales_the_loss_exactly_once(tmp_path, tokenizer_dir, base_model, mode):
    # Rows of equal length: 4 micro-batches of 2 rows and 1 batch of the same 8 rows give the
    # same mean loss, so gradients and updates must match.
    n = [1234, 5678, 9012, 3456, 7890, 2345, 6789, 1357] * 2
    path = write_rows(tmp_path / "eq.parquet", [f"{x}是多少？" for x in n], [str(x)[::-1] for x in n])
    extra, data = mode_flags(mode, base_model)
    if data == "pairs":
        path = as_dpo_file(path, tmp_path / "eq_pairs.parquet")
    elif data == "messages":  # one question a conversation: the same rows
        path = as_messages_file(path, tmp_path / "eq_messages.parquet", remember_every=0)[0]
    # Adafactor's update is continuous in the gradient (Adam's first steps are nearly its sign, which
    # turns rounding noise in near-zero gradients into full-size differences); the grad norm,
    # logged before clipping, catches a loss scaled twice.
    common = dict(train_file=path, validation_file="", max_steps=2, dataloader_buffer_size=8, warmup_steps=0,
                  max_grad_norm=1e9, optimizer="adafactor", learn_rate=1e-2, **extra)
    micro = run_in_process(tmp_path / "micro", tmp_path, tokenizer_dir, batch_size_per_gpu=2,
                           gradient_accumulation_steps=4, **common)
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    whole = run_in_process(tmp_path / "whole", tmp_path, tokenizer_dir, batch_size_per_gpu=8,
                           gradient_accumulation_steps=1, **common)
    assert micro.progress.micro_step == 8 and whole.progress.micro_step == 2
    norms = logged(micro, "grad_norm"), logged(whole, "grad_norm")
    assert len(norms[0]) == len(norms[1]) == 2  # one per step: the comparison below is not empty
    for (_, a), (_, b) in zip(*norms, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    wa, wb = micro.accelerator.unwrap_model(micro.model), whole.accelerator.unwrap_model(whole.model)
    for (name, pa), pb in zip(wa.named_parameters(), wb.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5), name
    from accelerate.utils import set_seed

    from config import T5ModelConfig
    from model.chat_model import TextToTextModel, get_t5_config
    if mode in ("seq2seq", "messages"):
        set_seed(micro.cfg.seed)  # the initial weights of both runs
        init = TextToTextModel(get_t5_config(T5ModelConfig.preset("tiny"), len(micro.tokenizer)))
    else:
        init = TextToTextModel.from_pretrained(base_model)
    start = {k: v for k, v in init.state_dict().items()}
    moved = max(float((p.detach() - start[n.replace("base_model.model.", "").replace(".base_layer", "")]).abs().max())
                for n, p in wa.named_parameters() if p.requires_grad and "lora_" not in n) if mode != "lora" \
        and mode != "lora+kl" else max(float(p.abs().max()) for n, p in wa.named_parameters() if "lora_B" in n)
    assert moved > 1e-3  # the updates are not trivial


class FakeSeq2Seq(torch.nn.Module):
    """Generates the reference for the first batch and nonsense for the second."""

    def __init__(self, answers):
        super().__init__()
        self.answers, self.calls = answers, 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, labels):
        return type("Out", (), {"logits": torch.zeros(*labels.shape, 128)})()

    def generate(self, input_ids, **_):
        out = self.answers[self.calls]
        self.calls += 1
        return out


def test_bleu_pools_every_batch(tmp_path, tokenizer_dir):
    from accelerate import Accelerator

    from model.dataset import EvalSet, get_eval_loader
    from utils.metrics import bleu4
    from utils.tokenizer import load_tokenizer
    tok = load_tokenizer(tokenizer_dir)
    refs = ["一千二百三十四", "五千六百七十八", "九千零一十二", "三千四百五十六"]
    path = write_rows(tmp_path / "v.parquet", [f"{i}是多少？" for i in range(4)], refs)
    dataset = EvalSet(path, tok, 32, 10)
    in_order = [dataset.responses[dataset.order[i]] for i in range(4)]
    wrong = ["一千一百一十一", "零"]
    answers = [tok(in_order[:2], padding=True, return_tensors="pt").input_ids,
               tok(wrong, padding=True, return_tensors="pt").input_ids]
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(get_eval_loader(dataset, 2))
    result = evaluate(FakeSeq2Seq(answers), loader, Run(accelerator), tok, 16)
    assert result["hypotheses"] == in_order[:2] + wrong
    pooled = bleu4(in_order, in_order[:2] + wrong)
    assert result["metrics"]["bleu4"] == pytest.approx(pooled)
    assert 0 < pooled < 1 and pooled != pytest.approx(bleu4(in_order[2:], wrong))  # not the last batch alone


def test_saved_model_loads_with_auto_classes(tmp_path, data_dir, tokenizer_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    trainer = run_in_process(tmp_path, data_dir, tokenizer_dir, max_steps=3)
    for name in ("final", "best"):
        path = os.path.join(trainer.cfg.output_dir, name)
        assert os.path.isfile(os.path.join(path, "model.safetensors"))
        assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in os.listdir(path))  # no pickle
        model, tok = AutoModelForSeq2SeqLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        inputs = tok(["把12写成中文数字。"], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=5)
        assert out.shape[0] == 1 and isinstance(tok.decode(out[0], skip_special_tokens=True), str)
    ours = trainer.accelerator.unwrap_model(trainer.model).eval()
    with torch.no_grad():
        labels = torch.tensor([[5, 6, 1]])
        theirs = AutoModelForSeq2SeqLM.from_pretrained(os.path.join(trainer.cfg.output_dir, "final")).eval()
        assert torch.allclose(ours(**inputs, labels=labels).logits, theirs(**inputs, labels=labels).logits, atol=1e-6)


def test_chatbot_answers_in_batches_and_streams(tmp_path, data_dir, tokenizer_dir):
    from model.infer import ChatBot
    trainer = run_in_process(tmp_path, data_dir, tokenizer_dir, max_steps=3)
    bot = ChatBot(os.path.join(trainer.cfg.output_dir, "final"), device="cpu")
    prompts = ["把12写成中文数字。", "三十是多少？", "把7写成中文数字。"]
    greedy = bot.answer(prompts, batch_size=2, max_new_tokens=6)
    assert len(greedy) == 3 and all(isinstance(a, str) for a in greedy)
    assert greedy == [bot.answer(p, max_new_tokens=6)[0] for p in prompts]  # batching changes nothing
    assert "".join(bot.stream(prompts[0], max_new_tokens=6)) == greedy[0]
    for search in ("beam", "sampling"):
        assert len(bot.answer(prompts, search_type=search, max_new_tokens=6)) == 3
    with pytest.raises(ValueError, match="search_type"):
        bot.answer(prompts, search_type="nucleus")


def test_loss_falls(tmp_path, data_dir, tokenizer_dir):
    trainer = run_in_process(tmp_path, data_dir, tokenizer_dir, epochs=3, learn_rate=3e-3, warmup_steps=10)
    losses = [v for _, v in logged(trainer, "loss")]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


# ---- through the command line, as a user runs it --------------------------------------

def train_until_sigterm(flags, after_step, log):
    """Start `train.py train`, send SIGTERM once it logs `after_step`, wait for it to save and exit."""
    proc = subprocess.Popen([sys.executable, "train.py", "train", *as_args(flags)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"step (\d+)/", line)
        if m and int(m.group(1)) >= after_step:
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=300) == 0, "".join(lines[-30:])
    log.write_text("".join(lines))
    return "".join(lines)


def logged_by_step(out_dir, names):
    """{step: [values]} of the training records in metrics.jsonl."""
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: [r[n] for n in names] for r in records if "train/loss" in r}


def read_trace(out_dir):
    with open(os.path.join(out_dir, "samples.rank0.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["rows"] for line in f]


def mode_data(mode, base_model, data_dir, tmp_path, train_file=None):
    """The flags of a mode, with the data (train_file, validation_file) as pairs or conversations
    where it needs them."""
    extra, data = mode_flags(mode, base_model)
    train_file = train_file or str(data_dir / "train.parquet")
    if data == "pairs":
        extra["train_file"] = as_dpo_file(train_file, tmp_path / "train_pairs.parquet")
        extra["validation_file"] = as_dpo_file(data_dir / "valid.parquet", tmp_path / "valid_pairs.parquet")
    elif data == "messages":
        extra["train_file"] = as_messages_file(train_file, tmp_path / "train_messages.parquet")[0]
        extra["validation_file"] = as_messages_file(data_dir / "valid.parquet", tmp_path / "valid_messages.parquet")[0]
    else:
        extra["train_file"] = train_file
    return extra


@pytest.mark.parametrize("mode", ["seq2seq", "dpo", "messages", "lora", "grpo"])
def test_resume_after_sigterm_twice_matches_an_uninterrupted_run(tmp_path, data_dir, tokenizer_dir, base_model, mode):
    # 40 optimizer steps of 2 micro-batches: 80 batches, over two epochs of 50 batches.
    common = dict(max_steps=40, gradient_accumulation_steps=2, epochs=5, trace_samples=True, learn_rate=3e-3,
                  warmup_steps=10, **mode_data(mode, base_model, data_dir, tmp_path))
    if mode == "grpo":  # two updates on each batch of samples: a stop waits for the batch's last
        common.update(gradient_accumulation_steps=1, grpo_iterations=2)
    straight = tiny_flags(tmp_path / "a", data_dir, tokenizer_dir, **common)
    ChatTrainer(load_config(**straight)).train()  # in this process: the same threads, the same bits
    flags = tiny_flags(tmp_path / "b", data_dir, tokenizer_dir, **common)
    out = train_until_sigterm(flags, 10, tmp_path / "b1.log")
    first_stop = int(re.search(r"stopped at step (\d+)", out).group(1))
    assert 10 <= first_stop < 40 and "Traceback" not in out
    out = train_until_sigterm({**flags, "is_keep_training": True}, first_stop + 8, tmp_path / "b2.log")
    second_stop = int(re.search(r"stopped at step (\d+)", out).group(1))
    assert "resumed from" in out and first_stop < second_stop < 40
    out = run_cli("train.py", "train", *as_args({**flags, "is_keep_training": True})).stdout
    assert f"step {second_stop + 1}/" in out  # continues at the next step
    a = load_file(os.path.join(straight["output_dir"], "final", "model.safetensors"))
    b = load_file(os.path.join(flags["output_dir"], "final", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert read_trace(flags["output_dir"]) == read_trace(straight["output_dir"])  # the same samples, in order
    # Every step logged the same numbers (for GRPO: the same completions sampled and rewarded).
    names = ("train/loss", "train/reward", "train/completion_length") if mode == "grpo" else ("train/loss",)
    logged_a, logged_b = (logged_by_step(d["output_dir"], names) for d in (straight, flags))
    assert logged_a.keys() == logged_b.keys() and len(logged_a) == 40
    for step, values in logged_a.items():
        assert values == pytest.approx(logged_b[step], abs=1e-6), step


# Two processes through the shipped DDP config (configs/accelerate/ddp.yaml), each reading its own
# rows and saving a model AutoModelForSeq2SeqLM loads: tests/test_engines.py, beside FSDP2.


def test_quickstart_main_command_on_a_reduced_budget(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("train.py", "train", "--config=data/demo.yaml", "--max_steps=30", f"--output_dir={out}",
                   f"--train_state_dir={out}/state", f"--tokenizer_dir={out}/tokenizer", "--max_eval_rows=32")
    log = proc.stdout
    assert "no tokenizer in" in log and "final model saved" in log
    for task in ("num2zh", "zh2num", "date2zh"):
        assert re.search(rf"exact match +{task}: +[\d.]+% \(\d+/300\)", log), log[-2000:]
    assert log.count(" -> ") >= 3  # sample answers
    assert re.search(r"regression at step 30: \d/4 passed", log)  # the demo's regression prompts
    assert os.path.isfile(out / "summary.json") and os.path.getsize(out / "plots" / "training.png") > 10_000
    answer = run_cli("train.py", "chat", f"--model_dir={out}/final", "--prompt=把12写成中文数字。")
    assert answer.stdout.strip().count("\n") == 0
    report = run_cli("train.py", "evaluate", f"--model_dir={out}/final", "--test_file=data/demo_valid.parquet")
    assert "exact match" in report.stdout


# ---- user mistakes: one line, exit 2, nothing saved before is touched -------------------

def test_user_errors_are_one_line(tmp_path, data_dir, tokenizer_dir, capsys):
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, max_steps=2)
    run_cli("train.py", "train", *as_args(flags))
    state_dir = flags["train_state_dir"]
    before = sorted(os.listdir(state_dir))
    wrong_columns = tmp_path / "wrong.parquet"
    write_rows(wrong_columns, ["a"], ["b"])
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"q": ["a"], "a": ["b"]}), wrong_columns)
    other_tok = tmp_path / "other_tok"
    from utils.tokenizer import train_tokenizer
    train_tokenizer(str(data_dir / "train.parquet"), str(other_tok), vocab_size=200)
    bare = tmp_path / "bare" / "model.safetensors"  # weights without their tokenizer beside them
    bare.parent.mkdir()
    shutil.copy(os.path.join(flags["output_dir"], "final", "model.safetensors"), bare)
    cases = {
        "already holds train states": {},
        "no intact train state in": {"is_keep_training": True, "train_state_dir": str(tmp_path / "none")},
        "not found": {"train_file": str(tmp_path / "missing.parquet"), "overwrite": True},
        "found: q, a": {"train_file": str(wrong_columns), "overwrite": True},
        "finetune_from_ckp_file": {"is_finetune": True, "finetune_from_ckp_file": str(tmp_path / "nope"),
                                   "overwrite": True},
        "trained with another tokenizer": {"is_finetune": True, "overwrite": True, "tokenizer_dir": str(other_tok),
                                           "finetune_from_ckp_file": os.path.join(flags["output_dir"], "final"),
                                           "train_state_dir": str(tmp_path / "s2")},
        "does not fit --model_size=tiny": {"is_finetune": True, "overwrite": True, "tokenizer_dir": str(other_tok),
                                           "finetune_from_ckp_file": str(bare),
                                           "train_state_dir": str(tmp_path / "s3")},
        "resume with the --model_size": {"is_keep_training": True, "model_size": "small"},
        "must be int": {"epochs": "many"},
    }
    for message, change in cases.items():
        proc = cli(capsys, "train", *as_args({**flags, **change}))
        assert proc.returncode == 2, (message, proc.stdout[-2000:], proc.stderr[-2000:])
        assert message in proc.stderr and proc.stderr.strip().count("\n") == 0, (message, proc.stderr)
        assert "Traceback" not in proc.stdout + proc.stderr
        assert sorted(os.listdir(state_dir)) == before
    assert run_cli("train.py", "chat", f"--model_dir={tmp_path}/nothing", "--prompt=hi", check=False).returncode == 2


def test_a_run_without_validation_file_or_tensorboard_works(tmp_path, data_dir, tokenizer_dir):
    trainer = run_in_process(tmp_path, data_dir, tokenizer_dir, max_steps=2, validation_file="", log_with="tensorboard")
    assert os.path.isdir(os.path.join(trainer.cfg.output_dir, "final"))
    assert any("tfevents" in f for _, _, files in os.walk(trainer.cfg.output_dir) for f in files)


# ---- two processes x two workers through accelerate launch ------------------------------

def launch_two(flags):
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "train.py", "train", *as_args(flags)]


def traced_rows(out_dir):
    return [read_rows_of_rank(out_dir, rank) for rank in range(2)]


def read_rows_of_rank(out_dir, rank):
    with open(os.path.join(out_dir, f"samples.rank{rank}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["rows"] for line in f]


@pytest.fixture(scope="module")
def uneven_file(tmp_path_factory):
    """203 rows in row groups of 37, every 17th empty: shards of unequal batch counts."""
    from conftest import demo_rows
    prompts, responses = demo_rows(203, seed=5)
    for i in range(0, 203, 17):
        prompts[i] = None if i % 2 else " "
    path = tmp_path_factory.mktemp("uneven") / "rows.parquet"
    write_rows(path, prompts, responses, row_group_size=37, row_id=list(range(203)))
    return str(path), sorted(set(range(203)) - set(range(0, 203, 17)))


@pytest.mark.parametrize("mode", ["seq2seq", "dpo", "messages", "lora+kl", "grpo"])
def test_two_processes_two_workers_train_on_every_row_once(tmp_path, uneven_file, tokenizer_dir, data_dir, base_model,
                                                           mode):
    path, non_empty_rows = uneven_file
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, num_workers=2, batch_size_per_gpu=4,
                       dataloader_buffer_size=16, trace_samples=True,
                       **{**mode_data(mode, base_model, data_dir, tmp_path, train_file=path), "validation_file": ""})
    proc = launch(launch_two(flags))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = traced_rows(flags["output_dir"])
    seen = [i for rank in ranks for batch in rank for i in batch]
    if mode == "messages":  # a conversation is a row per assistant turn, all with its row number
        turns = as_messages_file(path, tmp_path / "check.parquet")[1]
        non_empty_rows = sorted(i for i, k in enumerate(turns) for _ in range(k))
    assert sorted(seen) == non_empty_rows  # every non-empty row exactly once, none dropped at the end
    assert set(i for b in ranks[0] for i in b).isdisjoint(i for b in ranks[1] for i in b)
    assert len(ranks[0]) != len(ranks[1])  # the shards really were uneven
    assert "empty_rows_skipped 12" in proc.stdout
    from transformers import AutoModelForSeq2SeqLM
    assert AutoModelForSeq2SeqLM.from_pretrained(os.path.join(flags["output_dir"], "final")).config.d_model == 128


def test_two_processes_resume_mid_epoch_continues_with_the_unseen_rows(tmp_path, uneven_file, tokenizer_dir,
                                                                       data_dir):
    import psutil
    path, _ = uneven_file
    common = dict(train_file=path, num_workers=2, batch_size_per_gpu=4, dataloader_buffer_size=16,
                  trace_samples=True, validation_file="", epochs=2)
    straight = tiny_flags(tmp_path / "a", data_dir, tokenizer_dir, **common)
    assert launch(launch_two(straight)).returncode == 0
    flags = tiny_flags(tmp_path / "b", data_dir, tokenizer_dir, **common)
    launcher = subprocess.Popen(launch_two(flags), cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in launcher.stdout:
        lines.append(line)
        if re.search(r"epoch 0 step 8/", line):
            # SIGTERM to rank 0 alone: the processes agree to stop at the same step.
            rank0 = next(p for p in psutil.Process(launcher.pid).children(recursive=True)
                         if "train.py" in " ".join(p.cmdline()) and p.environ().get("RANK") == "0")
            rank0.send_signal(signal.SIGTERM)
            break
    lines += launcher.stdout.readlines()
    assert launcher.wait(timeout=300) == 0, "".join(lines[-40:])
    out = "".join(lines)
    stopped = int(re.search(r"stopped at step (\d+)", out).group(1))
    assert 8 <= stopped < 25  # mid-epoch 0 (about 24 steps an epoch)
    resumed = launch(launch_two({**flags, "is_keep_training": True}))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"step {stopped + 1}/" in resumed.stdout
    # Interrupted + resumed = uninterrupted, batch for batch, on each process.
    assert traced_rows(flags["output_dir"]) == traced_rows(straight["output_dir"])
    a = load_file(os.path.join(straight["output_dir"], "final", "model.safetensors"))
    b = load_file(os.path.join(flags["output_dir"], "final", "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
