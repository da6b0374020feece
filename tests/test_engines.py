"""Engines: FSDP2 (`--fsdp=full`, `--fsdp=grad_op`) on the one loop, next to DDP, over two CPU
processes joined by gloo, launched as a user would (accelerate launch with either shipped config,
or torchrun). A train state is one format under every engine: it resumes bit-exactly under the
engine that saved it, moves between FSDP2 and DDP with its weights and optimizer state exact,
and loads into one process. (Each launch costs seconds of imports: the cases share launches.)"""
import json
import os
import pickle
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

import model.checkpoint as ckpt
from conftest import ROOT, as_args, cli, free_port, launch, tiny_flags, train
from test_trainer import logged_by_step, mode_data, read_trace


def command(flags, engine):
    """A two-process launch of `train.py train` under `engine`: ddp (the DDP config), full (the
    Accelerate FSDP2 config, which the trainer reads as --fsdp=full), grad_op (the DDP config with
    --fsdp=grad_op) or torchrun:MODE (torchrun with --fsdp=MODE)."""
    port = str(free_port())
    if engine.startswith("torchrun:"):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                "train.py", "train", *as_args({**flags, "fsdp": engine.split(":")[1]})]
    config = "fsdp2.yaml" if engine == "full" else "ddp.yaml"
    extra = {"fsdp": engine} if engine == "grad_op" else {}
    return [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", port, "--config_file",
            os.path.join(ROOT, "configs", "accelerate", config), "train.py", "train", *as_args({**flags, **extra})]


def run(flags, engine):
    proc = launch(command(flags, engine))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def same_state(a: str, b: str) -> None:
    """Two train states hold bit-equal weights and optimizer states."""
    wa, wb = load_file(os.path.join(a, ckpt.MODEL_FILE)), load_file(os.path.join(b, ckpt.MODEL_FILE))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    oa, ob = (torch.load(os.path.join(p, ckpt.OPTIMIZER_FILE), weights_only=True) for p in (a, b))
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i, state in oa["state"].items():
        for k, v in state.items():
            assert torch.equal(v, ob["state"][i][k]), (i, k)


def train_straight_and_resumed(tmp_path, data_dir, tokenizer_dir, engine, common) -> tuple[dict, str]:
    """One run under `engine` that saves a train state at step 4 on its way to step 8, and one that
    resumes from that state: the same last train state, final weights, batches and logged
    numbers, bit for bit. Returns the first run's flags and output. (Stopping by SIGTERM is the
    same under every engine: the processes agree on it through Run; tests/test_trainer.py.)"""
    common = {**common, "save_steps": 4, "keep_latest_n_ckp": 2}
    straight = tiny_flags(tmp_path / "a", data_dir, tokenizer_dir, **common)
    out = run(straight, engine)
    assert f"engine fsdp2 {engine.split(':')[-1]}" in out and "parameters held by this process" in out
    flags = tiny_flags(tmp_path / "b", data_dir, tokenizer_dir, **common, is_keep_training=True)
    middle = ckpt.state_path(straight["train_state_dir"], 4)
    shutil.copytree(middle, ckpt.state_path(flags["train_state_dir"], 4))
    resumed = run(flags, engine)
    assert "resumed from" in resumed and "step 5/" in resumed and "step 4/" not in resumed
    last = ckpt.state_path(straight["train_state_dir"], common["max_steps"])
    same_state(last, ckpt.state_path(flags["train_state_dir"], common["max_steps"]))
    a, b = (load_file(os.path.join(d["output_dir"], "final", "model.safetensors")) for d in (straight, flags))
    assert all(torch.equal(a[k], b[k]) for k in a)
    after = read_trace(flags["output_dir"])  # the batches after the state: those the first run took after step 4
    assert after and read_trace(straight["output_dir"])[-len(after):] == after
    names = ("train/loss", "train/reward", "train/completion_length") if "reward" in common else ("train/loss",)
    logged = logged_by_step(straight["output_dir"], names)
    assert logged_by_step(flags["output_dir"], names) == {k: v for k, v in logged.items() if k > 4}
    from transformers import AutoModelForSeq2SeqLM
    for saved in ("best", "final"):  # whole models, LoRA merged, gathered from the shards
        AutoModelForSeq2SeqLM.from_pretrained(os.path.join(straight["output_dir"], saved))
    return straight, out


def check_trains_as_ddp(tmp_path, data_dir, tokenizer_dir, common, sharded: dict, sharded_out: str) -> dict:
    """The same steps under DDP: losses within 1e-5 (the reductions add in another order), the same
    GRPO samples (rewards and lengths at every step), the same greedy answers in every evaluation
    and test report. Returns the DDP run's flags."""
    ddp = tiny_flags(tmp_path / "ddp", data_dir, tokenizer_dir, **common)
    ddp_out = run(ddp, "ddp")
    # The shipped DDP config: two processes, each reading its own rows; a model other tools load.
    assert "2 process(es)" in ddp_out and "engine ddp" in ddp_out
    rows = [{i for line in open(os.path.join(ddp["output_dir"], f"samples.rank{r}.jsonl"), encoding="utf-8")
             for i in json.loads(line)["rows"]} for r in range(2)]
    assert rows[0] and rows[1] and not rows[0] & rows[1]
    from transformers import AutoModelForSeq2SeqLM
    AutoModelForSeq2SeqLM.from_pretrained(os.path.join(ddp["output_dir"], "final"))
    names = ("train/loss", "train/reward", "train/completion_length") if "reward" in common else ("train/loss",)
    logged, ddp_logged = (logged_by_step(d["output_dir"], names) for d in (sharded, ddp))
    assert logged.keys() == ddp_logged.keys() and len(logged) == common["max_steps"]
    for step, values in logged.items():
        assert values[0] == pytest.approx(ddp_logged[step][0], rel=1e-5, abs=1e-6), step
        assert values[1:] == ddp_logged[step][1:], step

    def answers(log):
        return [line.split(" ", 2)[2] for line in log.splitlines() if " -> " in line or "eval at" in line]
    assert answers(sharded_out) == answers(ddp_out) and len(answers(ddp_out)) >= 2
    return ddp


def resume_flags(mode, base_model, data_dir, tmp_path, trainable, precision, **extra):
    common = {**dict(max_steps=8, gradient_accumulation_steps=2, trace_samples=True, mixed_precision=precision,
                     eval_steps=4, **mode_data(mode, base_model, data_dir, tmp_path)), **extra}
    if trainable != "all":
        common.update(trainable=trainable, lora_dropout=0.0)
    return common


# Between them: both engines, both precisions, each of what trains and each objective; the
# fp32 ones also against DDP. The first case (LoRA, full) also moves states between engines.
@pytest.mark.parametrize("mode,trainable,engine,precision", [("dpo", "decoder", "torchrun:grad_op", "bf16"),
                                                             ("grpo", "all", "grad_op", "no")])
def test_fsdp2_resumes_bit_exactly(tmp_path, data_dir, tokenizer_dir, base_model, mode, trainable, engine, precision):
    extra = dict(gradient_accumulation_steps=1, test_file=str(data_dir / "valid.parquet")) if mode == "grpo" else {}
    common = resume_flags(mode, base_model, data_dir, tmp_path, trainable, precision, **extra)
    straight, out = train_straight_and_resumed(tmp_path, data_dir, tokenizer_dir, engine, common)
    if precision == "no":
        check_trains_as_ddp(tmp_path, data_dir, tokenizer_dir, common, straight, out)


def test_fsdp2_lora_resumes_bit_exactly_and_states_move_between_engines(tmp_path, data_dir, tokenizer_dir, base_model,
                                                                         capsys):
    """LoRA with kl_beta through the chunked head (the reference's head gathered whole), under the
    Accelerate FSDP2 config: a bit-exact resume, then its train state moved FSDP2 -> DDP -> FSDP2
    and into one process with weights and optimizer state exact (each resume at the saved step
    saves again at once, and the files agree). (DDP's own run beside FSDP2's: the GRPO case.)"""
    common = resume_flags("lora+kl", base_model, data_dir, tmp_path, "lora", "no", loss_chunk_tokens=7)
    straight, out = train_straight_and_resumed(tmp_path, data_dir, tokenizer_dir, "full", common)
    fsdp_state = ckpt.state_path(straight["train_state_dir"], common["max_steps"])
    moves = []
    for engine in ("ddp", "full"):  # a state FSDP2 saved into DDP, and the one DDP saved again into FSDP2
        previous = moves[-1] if moves else fsdp_state
        there = tiny_flags(tmp_path / f"to_{engine}", data_dir, tokenizer_dir, **common, is_keep_training=True)
        shutil.copytree(previous, os.path.join(there["train_state_dir"], os.path.basename(previous)))
        out = run(there, engine)
        assert "resumed from" in out and f"engine {'fsdp2 full' if engine == 'full' else 'ddp'}" in out
        state = ckpt.state_path(there["train_state_dir"], common["max_steps"])
        same_state(previous, state)
        moves.append(state)

    # The FSDP2-saved state's weights and optimizer state, into one process.
    single = train(tiny_flags(tmp_path / "one", data_dir, tokenizer_dir, **{**common, "max_steps": 1}))
    saved = load_file(os.path.join(fsdp_state, ckpt.MODEL_FILE))
    reference = torch.load(os.path.join(fsdp_state, ckpt.OPTIMIZER_FILE), weights_only=True)
    ckpt.load_model_weights(single.policy, saved, fsdp_state)
    ckpt.load_optimizer(single.policy, single.optimizer, reference, fsdp_state)
    weights = single.policy.model_state()
    assert all(torch.equal(weights[k], v) for k, v in saved.items())
    optimizer = single.policy.optimizer_state(single.optimizer)
    assert optimizer["param_groups"] == reference["param_groups"]
    assert all(torch.equal(optimizer["state"][i][k], v) for i, s in reference["state"].items() for k, v in s.items())
    # A resume on another number of processes is one line (the data position is per process).
    again = tiny_flags(tmp_path / "again", data_dir, tokenizer_dir, **{**common, "max_steps": 10},
                       is_keep_training=True)
    shutil.copytree(fsdp_state, os.path.join(again["train_state_dir"], os.path.basename(fsdp_state)))
    proc = cli(capsys, "train", *as_args(again))
    assert proc.returncode == 2 and "the same number of processes" in proc.stderr and proc.stderr.count("\n") == 1

    # A planted pickle anywhere in an FSDP2 state never runs: in the optimizer file (with the
    # manifest rewritten to match) it is one error line; torch.distributed.checkpoint's pickled
    # `.metadata` is never read.
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    planted = tiny_flags(tmp_path / "planted", data_dir, tokenizer_dir, **{**common, "max_steps": 10},
                         is_keep_training=True)
    state = os.path.join(planted["train_state_dir"], os.path.basename(fsdp_state))
    shutil.copytree(fsdp_state, state)
    with open(os.path.join(state, ".metadata"), "wb") as f:
        f.write(pickle.dumps(Payload()))
    optimizer_file = os.path.join(state, ckpt.OPTIMIZER_FILE)
    content = torch.load(optimizer_file, weights_only=True)
    content["state"][0]["exp_avg"] = Payload()
    torch.save(content, optimizer_file)
    os.remove(os.path.join(state, ckpt.MANIFEST))
    ckpt.write_manifest(state)
    proc = launch(command(planted, "full"))
    assert proc.returncode != 0 and not marker.exists()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "refusing to load" in errors[0], proc.stderr[-3000:]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr


def test_engine_mistakes_are_one_line(tmp_path, data_dir, tokenizer_dir, capsys):
    # DeepSpeed and FSDP version 1 launches: tests/test_reliability.py.
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, max_steps=1)
    cases = [({"fsdp": "full", "mixed_precision": "fp16"}, "no sharded grad scaler"),
             ({"fsdp": "grad_op", "optimizer": "adafactor"}, "--optimizer=adamw"),
             ({"fsdp": "full", "torch_compile": True}, "not supported yet"),
             ({"fsdp": "zero3"}, "is not one of")]
    for change, message in cases:
        proc = cli(capsys, "train", *as_args({**flags, **change}))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and message in proc.stderr, \
            proc.stderr
        assert not os.path.exists(flags["output_dir"])


def test_fsdp2_reduces_gradients_only_at_the_last_micro_batch(tmp_path, data_dir, tokenizer_dir):
    """Accumulating 3 micro-batches under FSDP2, gradients reach the sharded parameters (the
    reduce-scatter) only at the last of each step: after the other backwards no trainable
    parameter holds a gradient, after the last every one does. (Were gradients synced at every
    micro-batch, they would be there after the first.) A hook sees it, in a torchrun launch of
    the loop itself (tests/launched_sync_probe.py). The losses equal DDP's within 1e-5: the
    cross-entropy through the chunked head, the head training (its gradient made in forward)."""
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, max_steps=2, gradient_accumulation_steps=3, fsdp="full",
                       validation_file="", loss_chunk_tokens=7)
    probe = tmp_path / "probe"
    proc = launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), os.path.join(ROOT, "tests", "launched_sync_probe.py"), json.dumps(flags),
                   str(probe)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in range(2):
        seen = [json.loads(line) for line in open(f"{probe}.rank{rank}", encoding="utf-8")]
        assert [s["last"] for s in seen] == [False, False, True] * 2
        assert all(s["grads"] == (s["params"] if s["last"] else 0) and s["params"] > 0 for s in seen), seen
    ddp = {**flags, "fsdp": "", "output_dir": str(tmp_path / "ddp"), "train_state_dir": str(tmp_path / "ddp" / "s")}
    run(ddp, "ddp")
    logged, ddp_logged = (logged_by_step(f["output_dir"], ("train/loss",)) for f in (flags, ddp))
    assert logged.keys() == ddp_logged.keys() == {1, 2}
    assert all(logged[k][0] == pytest.approx(ddp_logged[k][0], rel=1e-5) for k in logged), (logged, ddp_logged)
