"""Train states nobody can hijack or lose, runs that always finish, mistakes caught before any work."""
import hashlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import model.checkpoint as ckpt
from config import load_config
from conftest import ROOT, StopAt, as_args, cli, run_cli, tiny_flags, train, write_rows
from utils.errors import UserError
from utils.logging import read_metrics


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def weights(out_dir, name="final"):
    return load_file(os.path.join(out_dir, name, "model.safetensors"))


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def digest(path):
    """sha256 over every file under `path` (names included)."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            h.update(os.path.relpath(os.path.join(root, name), path).encode())
            with open(os.path.join(root, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


class Payload:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def rewrite_manifest(state):
    os.remove(os.path.join(state, ckpt.MANIFEST))
    ckpt.write_manifest(state)


@pytest.fixture
def one_state(tmp_path, data_dir, tokenizer_dir):
    """A run stopped at step 2 (max_steps=2, so also finished) with one train state."""
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, max_steps=2, save_steps=2, validation_file="")
    train(flags)
    (state,) = ckpt.list_states(flags["train_state_dir"])
    return flags, state


# ---- no code runs from a train state ------------------------------------------------------

@pytest.mark.parametrize("name", [ckpt.MODEL_FILE, ckpt.OPTIMIZER_FILE, ckpt.rng_file(0), ckpt.STATE_JSON,
                                  ckpt.MANIFEST])
@pytest.mark.parametrize("manifest", ["rewritten", "stale"])
def test_a_planted_pickle_payload_never_runs(one_state, tmp_path, name, manifest):
    flags, state = one_state
    marker = tmp_path / "marker"
    path = os.path.join(state, name)
    if name == ckpt.OPTIMIZER_FILE:  # a real torch.save file whose pickle carries the payload
        saved = torch.load(path, weights_only=True)
        saved["state"][0]["exp_avg"] = Payload(marker)
        torch.save(saved, path)
    else:
        with open(path, "wb") as f:
            f.write(pickle.dumps(Payload(marker)))
    if manifest == "rewritten" and name != ckpt.MANIFEST:  # the attacker fixed the checksums too
        rewrite_manifest(state)
    with pytest.raises(UserError) as err:
        train({**flags, "is_keep_training": True, "max_steps": 4})
    assert not marker.exists()
    assert ("refusing" in str(err.value) or "cannot" in str(err.value) or "no intact" in str(err.value)), err.value


def make_legacy_state(trainer, path, marker=None):
    """A state as the previous version wrote it: Accelerate's save_state with pickled custom states."""
    class Pickled:
        def __init__(self, state):
            self.state = state

        def state_dict(self):
            return self.state

        def load_state_dict(self, state):
            self.state = state

    progress = {"epoch": 0, "step": trainer.progress.step, "micro_step": trainer.progress.micro_step,
                "samples": trainer.progress.samples, "tokens": trainer.progress.tokens, "rows_skipped": 0,
                "best_bleu": -1.0, "positions": [{int(k): tuple(v) for k, v in
                                                  trainer.stream.state_dict()["positions"].items()}],
                "next_workers": [0]}
    acc = trainer.accelerator
    acc._custom_objects = []
    acc.register_for_checkpointing(Pickled({"last_epoch": trainer.progress.step}),
                                   Pickled(progress if marker is None else {"payload": Payload(marker)}))
    acc.save_state(path)
    meta = {k: v for k, v in trainer.settings.items() if k in
            ("batch_size_per_gpu", "dataloader_buffer_size", "seed", "max_seq_len", "group_by_length", "num_shards",
             "num_processes", "num_workers", "is_finetune")}
    with open(os.path.join(path, "chatlm_state.json"), "w") as f:
        json.dump({**meta, "step": trainer.progress.step, "vocab_size": len(trainer.tokenizer)}, f)


def test_a_state_in_the_old_pickle_format_needs_an_explicit_opt_in(tmp_path, data_dir, tokenizer_dir):
    straight = tiny_flags(tmp_path / "a", data_dir, tokenizer_dir, max_steps=4, validation_file="")
    expected = weights(train(straight).cfg.output_dir)
    flags = tiny_flags(tmp_path / "b", data_dir, tokenizer_dir, max_steps=4, save_steps=1000, validation_file="")
    trainer = train(flags, hooks=[StopAt(2)])
    assert trainer.progress.step == 2
    shutil.rmtree(flags["train_state_dir"])
    legacy = os.path.join(flags["train_state_dir"], "step_00000002")
    make_legacy_state(trainer, legacy)
    marker = tmp_path / "marker"
    planted = os.path.join(tmp_path, "planted", "step_00000002")
    make_legacy_state(trainer, planted, marker)
    for state_dir in (flags["train_state_dir"], os.path.dirname(planted)):
        with pytest.raises(UserError, match="old format.*--trust_pickled_state=True"):
            train({**flags, "is_keep_training": True, "max_steps": 4, "train_state_dir": state_dir})
    assert not marker.exists()
    resumed = train({**flags, "is_keep_training": True, "max_steps": 4, "trust_pickled_state": True})
    assert resumed.progress.step == 4
    assert max_difference(weights(flags["output_dir"]), expected) < 1e-6  # the same run as never stopped
    newest = ckpt.list_states(flags["train_state_dir"])[-1]
    assert not ckpt.is_legacy(newest) and ckpt.problem(newest) is None  # what it saved is the safe format


# ---- verified states ---------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated weights", "missing optimizer", "garbage state.json"])
def test_a_damaged_newest_state_is_named_and_the_previous_one_used(tmp_path, data_dir, tokenizer_dir, damage):
    common = dict(max_steps=8, save_steps=2, keep_latest_n_ckp=5, validation_file="")
    straight = tiny_flags(tmp_path / "a", data_dir, tokenizer_dir, **common)
    expected = weights(train(straight).cfg.output_dir)
    flags = tiny_flags(tmp_path / "b", data_dir, tokenizer_dir, **common)
    train(flags, hooks=[StopAt(6)])
    newest = ckpt.list_states(flags["train_state_dir"])[-1]
    assert newest.endswith("step_00000006")
    if damage == "truncated weights":
        with open(os.path.join(newest, ckpt.MODEL_FILE), "r+b") as f:
            f.truncate(1000)
    elif damage == "missing optimizer":
        os.remove(os.path.join(newest, ckpt.OPTIMIZER_FILE))
    else:
        with open(os.path.join(newest, ckpt.STATE_JSON), "w") as f:
            f.write("{garbage")
    resumed = train({**flags, "is_keep_training": True, "max_steps": 8})
    log = open(os.path.join(flags["output_dir"], "train.log"), encoding="utf-8").read()
    assert "step_00000006 is damaged" in log and "resumed from" in log and "step_00000004" in log
    assert resumed.progress.step == 8
    assert max_difference(weights(flags["output_dir"]), expected) == 0.0


@pytest.mark.parametrize("leftovers", [(".old", ".tmp"), (".tmp",), (".old",)])
def test_an_interrupted_swap_is_recovered(one_state, leftovers):
    flags, state = one_state
    for suffix in leftovers:
        shutil.copytree(state, state + suffix)
    shutil.rmtree(state)
    resumed = train({**flags, "is_keep_training": True, "max_steps": 3})
    assert resumed.progress.step == 3
    names = sorted(os.listdir(flags["train_state_dir"]))
    assert names[0] == "step_00000002" or "step_00000002" not in names  # recovered, then maybe rotated
    assert not any(n.endswith((".tmp", ".old")) for n in names)


def test_no_intact_state_is_one_error(one_state):
    flags, state = one_state
    with open(os.path.join(state, ckpt.MODEL_FILE), "r+b") as f:
        f.truncate(100)
    proc = run_cli("train.py", "train", *as_args({**flags, "is_keep_training": True}), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no intact train state")
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stdout + proc.stderr


# ---- every run can be completed ----------------------------------------------------------

def test_resuming_a_finished_run_writes_final_and_exits_0(one_state):
    flags, _ = one_state
    shutil.rmtree(os.path.join(flags["output_dir"], "final"))  # as a kill -9 while final/ was written
    proc = run_cli("train.py", "train", *as_args({**flags, "is_keep_training": True}))
    assert os.path.isfile(os.path.join(flags["output_dir"], "final", "model.safetensors"))
    assert "final model saved" in proc.stdout
    # Past the end (max_steps lowered): the same.
    shutil.rmtree(os.path.join(flags["output_dir"], "final"))
    trainer = train({**flags, "is_keep_training": True, "max_steps": 1})
    assert trainer.progress.step == 2 and os.path.isdir(os.path.join(flags["output_dir"], "final"))




@pytest.mark.parametrize("moment", ["last step", "final saves"])
def test_a_run_stopped_at_its_very_end_completes_on_resume(tmp_path, data_dir, tokenizer_dir, moment):
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, max_steps=4, test_file=str(data_dir / "valid.parquet"))
    stopped = train(flags, hooks=[StopAt(4) if moment == "last step" else StopAt(in_final_saves=True)])
    assert stopped.progress.step == 4
    assert not os.path.exists(os.path.join(flags["output_dir"], "final"))
    proc = run_cli("train.py", "train", *as_args({**flags, "is_keep_training": True}))
    assert os.path.isfile(os.path.join(flags["output_dir"], "final", "model.safetensors"))
    assert "exact match" in proc.stdout  # the test report too


def test_sigterm_during_the_final_saves_still_ends_resumable(tmp_path, data_dir, tokenizer_dir):
    """A real SIGTERM while final/ is written: the process exits 0, and a resume completes the run."""
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, max_steps=3, validation_file="")
    code = ("import os, signal, sys\n"
            "from config import load_config; from model.trainer import ChatTrainer\n"
            "class Kill:\n"
            "    def on_save(self, trainer, path):\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "import yaml; flags = {k: v if v == '' else yaml.safe_load(v) for k, v in "
            "(a[2:].split('=', 1) for a in sys.argv[1:])}\n"
            "ChatTrainer(load_config(**flags), hooks=[Kill()]).train()")
    proc = subprocess.run([sys.executable, "-c", code, *as_args(flags)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ckpt.problem(ckpt.list_states(flags["train_state_dir"])[-1]) is None
    run_cli("train.py", "train", *as_args({**flags, "is_keep_training": True}))
    assert os.path.isfile(os.path.join(flags["output_dir"], "final", "model.safetensors"))


# ---- non-finite loss ---------------------------------------------------------------------

def test_a_non_finite_loss_stops_the_run_and_keeps_what_was_good(tmp_path, data_dir, tokenizer_dir):
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, max_steps=12, save_steps=6, eval_steps=6,
                       keep_latest_n_ckp=1, learn_rate=3e-3)
    train(flags)
    best, final = (digest(os.path.join(flags["output_dir"], n)) for n in ("best", "final"))
    good = ckpt.list_states(flags["train_state_dir"])
    assert [os.path.basename(s) for s in good] == ["step_00000012"]
    proc = run_cli("train.py", "train", *as_args({**flags, "is_keep_training": True, "learn_rate": 1e4,
                                                  "max_grad_norm": 0, "max_steps": 60, "save_steps": 1,
                                                  "eval_steps": 1, "warmup_steps": 0}), check=False)
    assert_one_line_error(proc, "the loss or gradient norm was not finite for 3 steps in a row")
    assert "resume from step_00000012" in proc.stderr
    assert digest(os.path.join(flags["output_dir"], "best")) == best  # best/ never took the bad weights
    assert digest(os.path.join(flags["output_dir"], "final")) == final
    assert ckpt.list_states(flags["train_state_dir"]) == good and ckpt.problem(good[0]) is None
    norms = [r["train/grad_norm"] for r in read_metrics(flags["output_dir"]) if "train/grad_norm" in r]
    assert not all(map(math.isfinite, norms))  # it really diverged


# ---- settings on resume, step totals ------------------------------------------------------

def test_learn_rate_and_max_steps_changed_on_resume_take_effect(tmp_path, data_dir, tokenizer_dir):
    from model.policy import get_lr_lambda
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, max_steps=4, warmup_steps=2, learn_rate=1e-3,
                       validation_file="")
    train(flags)
    train({**flags, "is_keep_training": True, "max_steps": 10, "learn_rate": 4e-3})
    lrs = {r["step"]: r["train/lr"] for r in read_metrics(flags["output_dir"]) if "train/lr" in r}
    schedule = get_lr_lambda(10, 2, flags.get("div_factor", 50.0))
    for step in range(5, 11):
        assert lrs[step] == pytest.approx(4e-3 * schedule(step - 1), rel=1e-6)


def test_the_step_total_is_the_steps_a_run_makes(tmp_path, data_dir, tokenizer_dir):
    # 400 rows, windows of 60 rows in batches of 8 (the last batch of each window is short):
    # 53 batches an epoch, not ceil(400 / 8) = 50.
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, epochs=2, dataloader_buffer_size=60,
                       gradient_accumulation_steps=3, validation_file="", logging_steps=1)
    trainer = train(flags)
    assert trainer.total_steps == 53 * 2 // 3 == trainer.progress.step
    assert read_metrics(flags["output_dir"])[-1]["step"] == trainer.total_steps


# ---- mistakes before any work --------------------------------------------------------------

def assert_one_line_error(proc, message):
    assert proc.returncode == 2, (message, proc.stdout[-2000:], proc.stderr[-2000:])
    assert proc.stderr.startswith("error: ") and proc.stderr.strip().count("\n") == 0, (message, proc.stderr)
    assert message in proc.stderr, (message, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr


def test_mistakes_visible_at_start_up_fail_before_anything_is_written(tmp_path, data_dir, tokenizer_dir, capsys):
    from conftest import demo_rows
    from utils.tokenizer import load_tokenizer, train_tokenizer
    empty = write_rows(tmp_path / "empty.parquet", [], [])
    blank = write_rows(tmp_path / "blank.parquet", ["", " ", None], ["a", "b", "c"])
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    trained = tiny_flags(tmp_path / "trained", data_dir, tokenizer_dir, max_steps=1, validation_file="")
    train(trained)
    # Another tokenizer of the same size (so the same padded embedding): only the vocabularies differ.
    other = tmp_path / "other_tok"
    prompts, responses = demo_rows(400)
    train_tokenizer(write_rows(tmp_path / "other.parquet", [p[::-1] for p in prompts], [r[::-1] for r in responses]),
                    str(other), vocab_size=128)
    assert len(load_tokenizer(str(other))) == len(load_tokenizer(tokenizer_dir)) == 128
    final = os.path.join(trained["output_dir"], "final")
    cases = {
        "has no rows": {"train_file": empty},
        "has no usable row": {"train_file": blank},
        "is a file, not a directory": {"train_state_dir": str(a_file)},
        "cannot be created": {"output_dir": str(a_file / "out")},
        "trained with another tokenizer": {"is_finetune": True, "finetune_from_ckp_file": final,
                                           "tokenizer_dir": str(other)},
        "another tokenizer than": {"is_finetune": True, "tokenizer_dir": str(other),
                                   "finetune_from_ckp_file": os.path.join(final, "model.safetensors")},
        "--learn_rate must be": {"learn_rate": "nan"},
        "--loss_chunk_tokens must be -1 (auto), 0 (full logits)": {"loss_chunk_tokens": -5},
        "validation_file": {"validation_file": empty},
    }
    for message, change in cases.items():
        flags = {**tiny_flags(tmp_path / "run", data_dir, tokenizer_dir), **change}
        proc = cli(capsys, "train", *as_args(flags))
        assert_one_line_error(proc, message)
        assert not os.path.exists(tmp_path / "run"), message  # nothing written, not even the log
    resumed = {**trained, "is_keep_training": True, "tokenizer_dir": str(other)}
    assert_one_line_error(cli(capsys, "train", *as_args(resumed)), "another tokenizer")
    yaml = tmp_path / "nan.yaml"
    yaml.write_text("learn_rate: .nan\n")
    assert_one_line_error(cli(capsys, "train", f"--config={yaml}"), "finite number")
    # The same through a real process: one line on stderr, exit status 2.
    assert_one_line_error(run_cli("train.py", "train", *as_args({**tiny_flags(tmp_path / "run", data_dir, tokenizer_dir),
                                                                 "train_file": empty}), check=False), "has no rows")


def test_the_free_space_for_a_state_and_a_model_is_checked_first(tmp_path, data_dir, tokenizer_dir, monkeypatch):
    import utils.files
    monkeypatch.setattr(utils.files.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9, 10**6))
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir)
    with pytest.raises(UserError, match=r"0.00 GB free, but a train state and a model directory need about [\d.]+ GB"):
        train(flags)
    assert not os.path.exists(flags["output_dir"])


@pytest.fixture
def tmpfs(tmp_path):
    """A small filesystem of our own to fill (tests run as root in CI); skipped where mount is refused."""
    mounts = []

    def mount(size_mb):
        path = tmp_path / f"tmpfs{len(mounts)}"
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                              capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()}); needs root")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_disk_during_a_save_is_one_line_and_the_older_state_loads(tmp_path, data_dir, tokenizer_dir, tmpfs):
    disk = tmpfs(40)  # room for two states of the tiny model (17 MB each), not three
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, max_steps=6, save_steps=1, keep_latest_n_ckp=5,
                       validation_file="", train_state_dir=str(disk / "state"))
    proc = run_cli("train.py", "train", *as_args(flags), check=False)
    assert_one_line_error(proc, "no space left on the device")
    names = sorted(os.listdir(disk / "state"))
    assert names == ["step_00000001", "step_00000002"], names  # no .tmp left behind
    shutil.copytree(disk / "state", tmp_path / "copy")
    resumed = train({**flags, "is_keep_training": True, "train_state_dir": str(tmp_path / "copy"), "max_steps": 3})
    assert resumed.progress.step == 3


def test_a_full_disk_while_final_is_written_is_one_line_and_best_stays(tmp_path, data_dir, tokenizer_dir, tmpfs):
    disk = tmpfs(10)  # a model directory is 6 MB: best/ fits, final/ beside it does not
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, max_steps=2, output_dir=str(disk / "out"),
                       train_state_dir=str(tmp_path / "state"))
    proc = run_cli("train.py", "train", *as_args(flags), check=False)
    assert_one_line_error(proc, "no space left on the device")
    assert sorted(os.listdir(disk / "out")) == ["best", "metrics.jsonl", "train.log"]
    from transformers import AutoModelForSeq2SeqLM
    AutoModelForSeq2SeqLM.from_pretrained(str(disk / "out" / "best"))


# ---- every command checks its flags first ---------------------------------------------------

COMMANDS = [("train.py", "train"), ("train.py", "train_tokenizer"), ("train.py", "evaluate"), ("train.py", "chat"),
            ("train_low_mem.py", "train"), ("sample_training_data.py", None)]


@pytest.mark.parametrize("script,command", COMMANDS)
def test_help_lists_the_flags_of_each_command(script, command):
    proc = run_cli(script, *([command] if command else []), "--help")
    flags = {"train": ["--learn_rate", "--is_keep_training", "--trust_pickled_state", "--config"],
             "train_tokenizer": ["--files", "--vocab_size"], "evaluate": ["--model_dir", "--max_rows"],
             "chat": ["--search_type", "--prompt"], None: ["--input", "--num_samples", "--seed"]}[command]
    for flag in flags:
        assert flag in proc.stdout, (flag, proc.stdout)
    assert "default" in proc.stdout and "usage:" in proc.stdout


def test_a_typo_in_a_flag_stops_every_command_before_any_work(tmp_path, data_dir, tokenizer_dir):
    out = tmp_path / "sample.parquet"
    run_cli("sample_training_data.py", "--input", str(data_dir / "train.parquet"), "--output", str(out),
            "--num_samples", "10")
    before = {"sample": digest(tmp_path), "tokenizer": digest(tokenizer_dir)}
    runs = {
        "--seed": ["sample_training_data.py", "--input", str(data_dir / "train.parquet"), "--output", str(out),
                   "--num_samples", "20", "--seedd", "3"],
        "--vocab_size": ["train.py", "train_tokenizer", f"--files={data_dir / 'train.parquet'}",
                         f"--output_dir={tokenizer_dir}", "--vocabsize=64"],
        "--max_rows": ["train.py", "evaluate", "--model_dir=x", f"--test_file={data_dir / 'valid.parquet'}",
                       "--max_row=5"],
        "--search_type": ["train.py", "chat", "--model_dir=x", "--prompt=hi", "--serch_type=beam"],
        "--epochs": ["train.py", "train", f"--output_dir={tmp_path / 'never'}", "--epochz=2"],
        "--learn_rate": ["train_low_mem.py", "train", f"--output_dir={tmp_path / 'never'}", "--lern_rate=1"],
    }
    for closest, args in runs.items():
        proc = run_cli(*args, check=False)
        assert_one_line_error(proc, f"did you mean {closest}?")
        assert "valid flags: " in proc.stderr
    assert {"sample": digest(tmp_path), "tokenizer": digest(tokenizer_dir)} == before
    assert_one_line_error(run_cli("train.py", "trian", check=False), "did you mean train?")
    assert_one_line_error(run_cli("train.py", "evaluate", "--model_dir=x", "--test_file=y", "--max_rows=many",
                                  check=False), "--max_rows must be int")


def test_model_directories_and_choices_are_checked_before_answering(tmp_path, one_state, data_dir, capsys):
    flags, _ = one_state
    final = os.path.join(flags["output_dir"], "final")
    no_weights, no_tokenizer, bad_tokenizer = (tmp_path / n for n in ("no_weights", "no_tokenizer", "bad_tok"))
    for d in (no_weights, no_tokenizer, bad_tokenizer):
        shutil.copytree(final, d)
    os.remove(no_weights / "model.safetensors")
    os.remove(no_tokenizer / "tokenizer.json")
    (bad_tokenizer / "tokenizer.json").write_text("{garbage")
    empty = write_rows(tmp_path / "empty.parquet", [], [])
    cases = [
        (["chat", f"--model_dir={no_weights}", "--prompt=hi"], "has no weights"),
        (["chat", f"--model_dir={no_tokenizer}", "--prompt=hi"], "has no tokenizer"),
        (["chat", f"--model_dir={bad_tokenizer}", "--prompt=hi"], "cannot be loaded"),
        (["chat", f"--model_dir={final}", "--prompt=hi", "--search_type=bogus"], "is not one of"),
        (["evaluate", f"--model_dir={final}", f"--test_file={empty}"], "has no rows"),
        (["evaluate", f"--model_dir={no_weights}", f"--test_file={data_dir / 'valid.parquet'}"], "has no weights"),
        (["train_tokenizer", f"--files={empty}", f"--output_dir={tmp_path / 'tok'}"], "no text to train"),
    ]
    for args, message in cases:
        assert_one_line_error(cli(capsys, *args), message)
    assert not os.path.exists(tmp_path / "tok")


def test_auto_resume_starts_fresh_then_resumes_with_the_same_command(tmp_path, data_dir, tokenizer_dir):
    straight = tiny_flags(tmp_path / "a", data_dir, tokenizer_dir, max_steps=6, save_steps=2, validation_file="")
    expected = weights(train(straight).cfg.output_dir)
    flags = tiny_flags(tmp_path / "b", data_dir, tokenizer_dir, max_steps=6, save_steps=2, validation_file="",
                       is_keep_training="auto")
    os.makedirs(os.path.join(flags["train_state_dir"], "step_00000002.tmp"))  # a save killed at once: no state
    first = train(flags, hooks=[StopAt(3)])
    assert first.resume_from is None and first.progress.step == 3
    again = train(flags)
    assert again.resume_from.endswith("step_00000003") and again.progress.step == 6
    assert max_difference(weights(flags["output_dir"]), expected) == 0.0
    with pytest.raises(UserError, match="must be True, False or auto"):
        load_config(is_keep_training="sometimes")


# ---- mistakes that train nothing, outputs replaced without a word ---------------------------

def test_dpo_rows_whose_answers_are_equal_are_skipped_and_a_file_of_only_those_is_refused(
        tmp_path, data_dir, tokenizer_dir, base_model, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    prompts = [f"把{n}写成中文数字。" for n in range(40)]
    chosen = [str(n) for n in range(40)]
    # every fourth pair carries no preference: the same answer, up to whitespace and full width
    rejected = [(f" {c} " if i % 8 == 0 else c.translate(str.maketrans("0123456789", "０１２３４５６７８９")))
                if i % 4 == 0 else c + "零" for i, c in enumerate(chosen)]
    pq.write_table(pa.table({"prompt": prompts, "chosen": chosen, "rejected": rejected}), tmp_path / "pairs.parquet")
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, objective="dpo", init_from=base_model,
                       train_file=str(tmp_path / "pairs.parquet"), validation_file="", epochs=1)
    trainer = train(flags)
    assert trainer.progress.samples == 30 and trainer.progress.rows_skipped == 10
    with open(os.path.join(flags["output_dir"], "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["data"]["empty_rows_skipped"] == 10
    pq.write_table(pa.table({"prompt": prompts, "chosen": chosen, "rejected": [f" {c}" for c in chosen]}),
                   tmp_path / "same.parquet")
    bad = {**flags, "train_file": str(tmp_path / "same.parquet"), "output_dir": str(tmp_path / "bad"),
           "train_state_dir": str(tmp_path / "bad" / "state")}
    result = cli(capsys, "train", *as_args(bad))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: --train_file") and "chosen equals rejected" in result.stderr
    assert not os.path.exists(tmp_path / "bad")


def test_grpo_stops_when_its_reward_gives_no_signal(tmp_path, data_dir, tokenizer_dir, base_model, capsys):
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, objective="grpo", init_from=base_model, validation_file="",
                       reward="exact_match=0", grpo_group_size=2, grpo_max_new_tokens=3, save_steps=2,
                       grpo_max_zero_signal_steps=3, max_steps=20)
    result = cli(capsys, "train", *as_args(flags))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: every group of the last 3 steps") and result.stderr.count("\n") == 1
    assert "--grpo_group_size" in result.stderr and "--grpo_temperature" in result.stderr
    out = flags["output_dir"]
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["status"] == "no_reward_signal" and summary["steps"] == 3
    assert read_metrics(out)[-1]["train/steps_without_signal"] == 3
    assert [os.path.basename(p) for p in ckpt.list_states(flags["train_state_dir"])] == ["step_00000002"]
    assert ckpt.find_resumable(flags["train_state_dir"], False, print).endswith("step_00000002")  # intact
    # 0 turns the check off: the same run trains to its end.
    off = {**flags, "grpo_max_zero_signal_steps": 0, "max_steps": 4, "output_dir": str(tmp_path / "off"),
           "train_state_dir": str(tmp_path / "off" / "state")}
    assert cli(capsys, "train", *as_args(off)).returncode == 0


def test_commands_that_write_an_output_refuse_to_replace_it(tmp_path, data_dir, base_model, capsys):
    source = str(data_dir / "train.parquet")
    out = tmp_path / "pairs.parquet"
    out.write_bytes(b"hours of pairs")
    result = cli(capsys, "make_dpo_pairs", f"--model_dir={base_model}", f"--input={source}", f"--output={out}",
                 "--max_rows=8")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "already exists; pass --overwrite=True" in result.stderr and out.read_bytes() == b"hours of pairs"
    result = cli(capsys, "make_dpo_pairs", f"--model_dir={base_model}", f"--input={source}", f"--output={out}",
                 "--max_rows=8", "--overwrite=True")
    assert result.returncode == 0 and out.read_bytes()[:4] == b"PAR1"
    sample = tmp_path / "sample.parquet"
    sample.write_bytes(b"a sample")
    for extra, code in (([], 2), (["--overwrite=True"], 0)):
        proc = run_cli("sample_training_data.py", f"--input={source}", f"--output={sample}", "--num_samples=10",
                       "--progress=False", *extra, check=False)
        assert proc.returncode == code, proc.stderr
    assert sample.read_bytes()[:4] == b"PAR1"
    valid = tmp_path / "valid.parquet"
    valid.write_bytes(b"kept")
    proc = run_cli("sample_training_data.py", f"--input={source}", f"--output={tmp_path / 'new.parquet'}",
                   "--num_samples=10", f"--valid_output={valid}", "--valid_samples=5", check=False)
    assert proc.returncode == 2 and "--valid_output" in proc.stderr and valid.read_bytes() == b"kept"
    assert not os.path.exists(tmp_path / "new.parquet")


def test_plot_of_no_metrics_or_an_unknown_metric_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for content in ("", "not json\n{\"half\": \n", "[1, 2]\n{\"no_step\": 1}\n"):
        (run / "metrics.jsonl").write_text(content)
        result = cli(capsys, "plot", f"--output_dir={run}")
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "no usable line" in result.stderr and str(run / "metrics.jsonl") in result.stderr
        assert not os.path.exists(run / "plots")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 2.0}) + "\n"
                                       + json.dumps({"step": 1, "eval/loss": 1.5, "eval/bleu4": 0.1}) + "\n")
    result = cli(capsys, "plot", f"--output_dir={run}", "--metric=exact_match")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "has no eval/exact_match" in result.stderr and "bleu4, loss" in result.stderr
    assert cli(capsys, "plot", f"--output_dir={run}", "--metric=bleu4").returncode == 0


def test_a_shape_flag_the_checkpoint_overrides_is_a_warning(tmp_path, data_dir, tokenizer_dir, base_model):
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, init_from=base_model, validation_file="", max_steps=1)
    flags.pop("model_size")
    quiet = run_cli("train.py", "train", *as_args(flags))
    assert "warning:" not in quiet.stdout + quiet.stderr  # no shape given: the checkpoint's, silently
    loud = run_cli("train.py", "train", *as_args({**flags, "model_size": "small", "overwrite": True}))
    lines = [line for line in (loud.stdout + loud.stderr).splitlines() if "warning: --model_size=small" in line]
    assert len(lines) == 1 and "d_model 768" in lines[0] and "d_model 128" in lines[0], loud.stdout


def test_deepspeed_and_fsdp1_environments_are_refused_on_every_device(tmp_path, data_dir, tokenizer_dir):
    # DeepSpeed (pickled checkpoints) and Accelerate's FSDP version 1 are refused, on a CPU too,
    # naming what to launch instead (an FSDP2 config is read as --fsdp: tests/test_engines.py).
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, max_steps=1)
    for variable in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        proc = run_cli("train.py", "train", *as_args(flags), check=False, env={variable: "true"})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
        assert "configs/accelerate/fsdp2.yaml" in proc.stderr
        assert ("--fsdp=grad_op" if "DEEPSPEED" in variable else "fsdp_version: 2") in proc.stderr
        assert not os.path.exists(flags["output_dir"])
