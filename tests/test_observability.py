"""A run you can watch and steer: metrics.jsonl, summary.json and the plot, early stopping,
regression prompts, weighted sources, the validation split, the low-memory profile."""
import json
import os
import re

import numpy as np
import pytest

from config import load_config
from conftest import StopAt, as_args, cli, demo_rows, run_cli, tiny_flags, train, write_rows
from model.dataset import TrainStream, epoch_batches, get_sources, get_train_loader, held_out
from model.regression import Check, load_checks
from utils.errors import UserError
from utils.logging import read_metrics
from utils.tokenizer import load_tokenizer




def summary(out):
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    with Image.open(path) as image:
        assert image.size[0] > 300 and image.size[1] > 300


def read_trace(out_dir):
    with open(os.path.join(out_dir, "samples.rank0.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["rows"] for line in f]


def test_metrics_file_matches_the_console_and_restarts_or_continues(tmp_path, data_dir, tokenizer_dir, capsys):
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, max_steps=6, logging_steps=2, save_steps=2,
                       validation_file="", overwrite=True)
    result = cli(capsys, "train", *as_args(flags))
    assert result.returncode == 0, result.stderr
    printed = {int(m.group(1)): m.group(2) for m in re.finditer(r"step (\d+)/\d+ loss (\S+)", result.stdout)}
    records = read_metrics(flags["output_dir"])
    assert [r["step"] for r in records] == [2, 4, 6] == sorted(printed)
    for r in records:  # one dict feeds both: the console shows the file's number
        assert f"{r['train/loss']:.4f}" == printed[r["step"]] and r["epoch"] == 0 and r["time"] > 0
    # A fresh run (overwrite) starts a new file: not the old records followed by new ones.
    assert cli(capsys, "train", *as_args({**flags, "max_steps": 4})).returncode == 0
    assert [r["step"] for r in read_metrics(flags["output_dir"])] == [2, 4]
    # A resume keeps the records up to its state and drops those of steps it makes again.
    with open(os.path.join(flags["output_dir"], "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 5, "train/loss": 9.0}) + "\n{\"step\": 6, \"train/lo")  # killed mid-line
    assert cli(capsys, "train", *as_args({**flags, "max_steps": 6, "is_keep_training": True})).returncode == 0
    steps = [r["step"] for r in read_metrics(flags["output_dir"])]
    assert steps == [2, 4, 6] and 9.0 not in [r["train/loss"] for r in read_metrics(flags["output_dir"])]


def test_summary_and_plot_after_a_finished_and_a_stopped_run(tmp_path, data_dir, tokenizer_dir, capsys):
    regression = tmp_path / "regression.jsonl"
    regression.write_text('{"prompt": "一千", "expect": "^", "match": "regex"}\n', encoding="utf-8")
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, max_steps=6, eval_steps=3, regression_file=str(regression),
                       test_file=str(data_dir / "valid.parquet"))
    train(flags, hooks=[StopAt(3)])
    stopped = summary(flags["output_dir"])
    assert stopped["status"] == "stopped" and stopped["steps"] == 3 and stopped["settings"]["max_steps"] == 6
    assert_png(os.path.join(flags["output_dir"], "plots", "training.png"))
    trainer = train({**flags, "is_keep_training": True})
    done = summary(flags["output_dir"])
    assert done["status"] == "finished" and done["steps"] == 6 and done["data"]["rows_trained"] == 6 * 8
    assert done["wall_seconds"] > stopped["wall_seconds"]  # both runs' time
    assert done["best"]["metric"] == "bleu4" and done["best"]["step"] in (3, 6)
    assert done["final_vs_best"] in ("same", "best", "final") and done["last_eval"]["step"] == 6
    assert done["median_tokens_per_s"] > 0 and done["peak_rss_gb"] > 0
    assert done["test"]["bleu4"] == pytest.approx(trainer.test_metrics["bleu4"])
    assert done["regression_failed"] == []  # "^" matches any answer
    evals = [r for r in read_metrics(flags["output_dir"]) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and all(r["eval/regression/pass_rate"] == 1.0 for r in evals)
    png = os.path.join(flags["output_dir"], "plots", "training.png")
    os.remove(png)
    # `plot` redraws it at any time, also from a file a running job is writing.
    with open(os.path.join(flags["output_dir"], "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write('{"step": 7, "train/lo')
    result = cli(capsys, "plot", f"--output_dir={flags['output_dir']}")
    assert result.returncode == 0 and "plot written to" in result.stdout
    assert_png(png)
    missing = cli(capsys, "plot", f"--output_dir={tmp_path / 'none'}")
    assert missing.returncode != 0 and "no metrics.jsonl in" in missing.stderr and "Traceback" not in missing.stderr


def test_early_stopping_stops_at_the_right_evaluation_and_survives_a_resume(tmp_path, data_dir, tokenizer_dir):
    # best_metric loss must fall by 100 to count: every evaluation after the first is one without
    # improvement, so with patience 2 and an evaluation every 2 steps the run ends at step 6.
    common = dict(max_steps=20, eval_steps=2, best_metric="loss", early_stopping_patience=2,
                  early_stopping_min_delta=100.0, validation_file="", validation_split=0.1)
    straight = tiny_flags(tmp_path / "a", data_dir, tokenizer_dir, **common)
    trainer = train(straight)
    assert trainer.progress.step == 6 and trainer.progress.early_stopped
    result = summary(straight["output_dir"])
    assert result["status"] == "early_stopped" and result["early_stopping"]["evals_without_improvement"] == 2
    assert_png(os.path.join(straight["output_dir"], "plots", "training.png"))
    assert os.path.isfile(os.path.join(straight["output_dir"], "final", "model.safetensors"))
    # Stopped after the evaluation at step 4 (one without improvement), then resumed: the count
    # was saved, so the run still ends at step 6, not at step 8.
    flags = tiny_flags(tmp_path / "b", data_dir, tokenizer_dir, **common)
    assert train(flags, hooks=[StopAt(5)]).progress.evals_without_improvement == 1
    resumed = train({**flags, "is_keep_training": True})
    assert resumed.progress.step == 6 and summary(flags["output_dir"])["status"] == "early_stopped"
    with pytest.raises(UserError, match="needs an evaluation"):
        load_config(early_stopping_patience=2, validation_file="")


def test_a_regression_prompt_that_starts_failing_is_named(tmp_path, data_dir, tokenizer_dir, monkeypatch):
    import model.evaluation as evaluation_module
    checks_file = tmp_path / "regression.yaml"
    checks_file.write_text("- {name: thousand, prompt: 一千, expect: '1000'}\n"
                           "- {prompt: 二千, expect: '2', match: contains}\n", encoding="utf-8")
    calls = []

    def answers(model, tokenizer, checks, max_new_tokens, device):  # the first passes, then fails
        calls.append(1)
        return [(checks[0], "1000" if len(calls) == 1 else "1001", len(calls) == 1), (checks[1], "20", True)]
    monkeypatch.setattr(evaluation_module, "run_checks", answers)
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, max_steps=4, eval_steps=2, regression_file=str(checks_file))
    train(flags)
    rates = [r["eval/regression/pass_rate"] for r in read_metrics(flags["output_dir"]) if "eval/loss" in r]
    assert rates == [1.0, 0.5]
    with open(os.path.join(flags["output_dir"], "train.log"), encoding="utf-8") as f:
        log = f.read()
    assert re.search(r"regression at step 4: thousand: '一千' -> '1001', expected exact '1000' \(it passed at the "
                     r"previous evaluation\)", log), log[-2000:]
    assert summary(flags["output_dir"])["regression_failed"] == ["thousand"]


def test_regression_checks_and_their_file(tmp_path):
    assert Check("a", "p", " 1000 ").passes("1000") and not Check("a", "p", "1000").passes("10000")
    assert Check("a", "p", "00", "contains").passes("10000") and not Check("a", "p", "x", "contains").passes("y")
    assert Check("a", "p", r"^\d+$", "regex").passes("123") and not Check("a", "p", r"^\d+$", "regex").passes("12a")
    good = tmp_path / "ok.yaml"
    good.write_text("prompts:\n  - {prompt: a, expect: b}\n  - {name: n, prompt: c, expect: d, match: regex}\n")
    assert [c.name for c in load_checks(str(good))] == ["#1", "n"]
    for text, message in (("- {prompt: a}\n", "needs the keys prompt and expect"),
                          ("- {prompt: a, expect: b, match: fuzzy}\n", "is not one of"),
                          ("- {prompt: a, expect: '(', match: regex}\n", "not a valid regular expression"),
                          ("- {prompt: a, expect: b, expected: c}\n", "unknown key 'expected'"),
                          ("[]\n", "holds no entries"), ("- {prompt: a, expect: b\n", "cannot be parsed")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(UserError, match=re.escape(message)):
            load_checks(str(bad))


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    a = write_rows(d / "a.parquet", *demo_rows(400, seed=4), row_group_size=100)
    os.makedirs(d / "chat")
    b = write_rows(d / "chat" / "b.parquet", *demo_rows(300, seed=5), row_group_size=100)
    return a, b


def test_weighted_sources_keep_their_shares_and_a_resume_continues_the_mix(tmp_path, two_sources, data_dir,
                                                                          tokenizer_dir):
    a, b = two_sources
    spec = {a: 0.7, os.path.join(os.path.dirname(b), "*.parquet"): 0.3}
    common = dict(train_file=spec, validation_file="", validation_split=0.1, trace_samples=True, epochs=2,
                  logging_steps=5)
    straight = tiny_flags(tmp_path / "a", data_dir, tokenizer_dir, **common)
    trainer = train(straight)
    trace = read_trace(straight["output_dir"])
    rows = np.concatenate(trace)
    share = float((rows < 400).mean())  # a's rows are 0..399, b's 400..699
    assert abs(share - 0.7) < 0.02, share
    assert summary(straight["output_dir"])["data"]["rows_per_source"] == {"a": int((rows < 400).sum()),
                                                                          "chat": int((rows >= 400).sum())}
    # The held-out rows: never trained on, and exactly what the evaluation reads.
    assert not held_out(rows, 7, 0.1).any() and held_out(np.arange(700), 7, 0.1).sum() > 40
    assert len(trainer.eval_set) == 8  # max_eval_rows of them
    # The steps counted ahead are the steps made (2 epochs of the mix).
    assert trainer.progress.step == trainer.total_steps == len(trace)
    flags = tiny_flags(tmp_path / "b", data_dir, tokenizer_dir, **common)
    train(flags, hooks=[StopAt(20)])
    train({**flags, "is_keep_training": True})
    assert read_trace(flags["output_dir"]) == trace  # the same batches in the same order
    with open(os.path.join(flags["output_dir"], "train.log"), encoding="utf-8") as f:
        assert re.search(r"rows/a \d+ rows/chat \d+", f.read())  # the log shows rows per source


@pytest.mark.parametrize("strategy", ["first_exhausted", "all_exhausted"])
def test_weighted_shards_cover_their_rows_and_resume_anywhere(two_sources, tokenizer_dir, strategy):
    a, b = two_sources
    sources = get_sources({a: 0.7, b: 0.3})
    files = [f for s in sources for f in s.files]
    tok = load_tokenizer(tokenizer_dir)

    def stream(rank, workers=2):
        return TrainStream(files, tok, 8, 32, 64, 3, rank, 2, workers, sources=sources, mix_strategy=strategy,
                           validation_split=0.1)

    seen = []
    for rank in (0, 1):
        s = stream(rank)
        batches = list(get_train_loader(s, 2))
        expected = epoch_batches(s.pieces, sources, range(rank * 2, rank * 2 + 2), 4, 64, 8, 3, 0, strategy, 0.1)
        assert len(batches) == expected  # what the schedule counts ahead
        rows = np.concatenate([x["row_index"].numpy() for x in batches])
        assert not held_out(rows, 3, 0.1).any()
        seen.append(rows)
        # Resume after any batch: the rest is the same.
        cut = len(batches) // 3
        head = stream(rank)
        for x in batches[:cut]:
            head.advance(dict(x))
        resumed = stream(rank)
        resumed.load_state_dict(json.loads(json.dumps(head.state_dict())))
        rest = [x["row_index"].tolist() for x in get_train_loader(resumed, 2)]
        assert rest == [x["row_index"].tolist() for x in batches[cut:]]
    assert not set(seen[0]) & set(seen[1])  # the processes' shards are disjoint
    trained = set(np.concatenate(seen).tolist())
    usable = set(np.flatnonzero(~held_out(np.arange(700), 3, 0.1)).tolist())
    if strategy == "all_exhausted":  # every source runs out at least once: every row is trained on
        assert trained == usable
    else:  # the epoch ends when the first source runs out: a's rows, chat's only in part
        assert trained <= usable and {r for r in usable if r < 400} - trained == set()


def test_a_file_in_two_sources_and_bad_weights_are_errors(two_sources):
    a, b = two_sources
    with pytest.raises(UserError, match="is in two weighted sources"):
        get_sources({a: 0.5, os.path.join(os.path.dirname(a), "*.parquet"): 0.5})
    with pytest.raises(UserError, match="weights must be > 0"):
        load_config(train_file={a: 0.0, b: 1.0})
    with pytest.raises(UserError, match="not both"):
        load_config(validation_split=0.1, validation_file="x.parquet")


def test_the_low_memory_profile_is_a_setting_and_train_low_mem_runs(tmp_path, data_dir, tokenizer_dir):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("profile: low_memory\nbatch_size_per_gpu: 16\ngradient_accumulation_steps: 4\n")
    cfg = load_config(str(yaml_file), gradient_checkpointing=False)
    assert (cfg.batch_size_per_gpu, cfg.gradient_accumulation_steps, cfg.optimizer) == (2, 32, "adafactor")
    assert not cfg.gradient_checkpointing  # a flag wins over the profile
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, max_steps=2, validation_file="", logging_steps=1)
    run_cli("train_low_mem.py", "train", *as_args(flags), env={"OMP_NUM_THREADS": "1"})
    settings = summary(flags["output_dir"])["settings"]
    assert (settings["profile"], settings["batch_size_per_gpu"], settings["gradient_accumulation_steps"],
            settings["optimizer"], settings["gradient_checkpointing"]) == ("low_memory", 2, 4, "adafactor", True)
    assert "memory/peak_rss_gb" in read_metrics(flags["output_dir"])[-1]
