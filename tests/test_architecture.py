"""The shape the code keeps: a new objective is one class and a registry line; the settings page
matches config.py; the loop is read in one sitting and is extended by hooks, never subclassed."""
import ast
import glob
import json
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

from conftest import ROOT, as_args, cli, tiny_flags
from model.objectives import (LABEL_PAD, OBJECTIVES, cross_entropy_metrics, cross_entropy_rows, non_empty,
                              prompt_response_batch, row_tokens)
from utils.errors import UserError
from utils.logging import read_metrics


class LabelSmoothed:
    """A fourth objective, defined here: cross-entropy with label smoothing (Szegedy et al. 2016)."""
    name = "smoothed"
    columns = ("prompt", "response")
    target = "response"
    text_columns = ()
    updates_per_batch = 1
    pad_multiple = 1
    unit_scale = 32
    needs_reference = False
    dropout_free = False
    no_usable_row = None
    metric_names = ("loss", "nll")
    default_best_metric = "exact_match"
    eval_metric_names = ("loss", "perplexity", "bleu4", "exact_match")

    def __init__(self, smoothing: float):
        self.smoothing = smoothing

    @classmethod
    def from_config(cls, cfg):
        return cls(0.1)

    @staticmethod
    def check_settings(cfg):
        if cfg.kl_beta:
            raise UserError("--objective=smoothed takes no --kl_beta")

    @staticmethod
    def dropout_free_for(cfg):
        return False

    def set_tokenizer(self, tokenizer):
        pass

    def usable_rows(self, texts: dict) -> np.ndarray:
        return non_empty(*(texts[c] for c in self.columns))

    def collate(self, rows: dict) -> dict:
        return prompt_response_batch(rows, self.pad_multiple)

    def count_tokens(self, rows: dict) -> int:
        return row_tokens(rows)

    def loss_units(self, rows: dict) -> int:
        return row_tokens(rows, "response")

    def loss(self, model, batch, reference, update=0):
        out = model(**batch)
        loss = F.cross_entropy(out.logits.float().transpose(1, 2), batch["labels"], ignore_index=LABEL_PAD,
                               label_smoothing=self.smoothing)
        return loss, {"loss": loss.detach(), "nll": out.loss.detach()}

    def take_signal(self):
        return None

    @torch.no_grad()
    def eval_rows(self, model, batch, reference):
        return cross_entropy_rows(model, batch)[0]

    def eval_metrics(self, sums):
        return cross_entropy_metrics(sums)

    def answer_metrics(self, prompts, answers, columns):
        return {}


def test_a_new_objective_is_one_class_and_a_registry_line(tmp_path, data_dir, tokenizer_dir, capsys, monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "smoothed", LabelSmoothed)
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, objective="smoothed", max_steps=12, eval_steps=6,
                       learn_rate=3e-3)
    result = cli(capsys, "train", *as_args(flags))
    assert result.returncode == 0, result.stderr
    records = read_metrics(flags["output_dir"])
    steps = [r for r in records if "train/nll" in r]
    assert len(steps) == 12 and steps[-1]["train/loss"] < steps[0]["train/loss"]
    assert all(r["train/loss"] != r["train/nll"] for r in steps)  # its own loss, beside the plain NLL
    assert [r["step"] for r in records if "eval/exact_match" in r] == [6, 12]
    with open(os.path.join(flags["output_dir"], "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["best"]["metric"] == "exact_match"  # its own default best metric
    assert os.path.isfile(os.path.join(flags["output_dir"], "final", "model.safetensors"))
    # Its settings rule runs at start-up, through the same config code.
    bad = cli(capsys, "train", *as_args({**flags, "kl_beta": 0.1, "output_dir": str(tmp_path / "bad")}))
    assert bad.returncode == 2 and "takes no --kl_beta" in bad.stderr


def test_the_settings_page_lists_every_field_and_is_up_to_date():
    import dataclasses

    from config import TrainConfig
    from utils.settings_doc import PAGE, render
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()
    documented = set(re.findall(r"^\| `(\w+)` \|", page, re.M))
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in documented]
    assert not missing, f"docs/settings.md lacks {missing}: run python -m utils.settings_doc"
    assert page == render(), "docs/settings.md is out of date: run python -m utils.settings_doc"


def test_nothing_subclasses_the_trainer_or_patches_its_methods():
    files = glob.glob(os.path.join(ROOT, "tests", "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py"))
    offenders = []
    for path in files:
        text = open(path, encoding="utf-8").read()
        subclassed = re.search(r"class \w+\([^)]*ChatTrainer", text)
        if subclassed or re.search(r"ChatTrainer\.\w+ *=|setattr\(ChatTrainer", text):
            offenders.append(os.path.relpath(path, ROOT))
    offenders = [p for p in offenders if not p.endswith("test_architecture.py")]
    assert not offenders, offenders


def test_the_loop_reads_in_one_sitting():
    tree = ast.parse(open(os.path.join(ROOT, "model", "trainer.py"), encoding="utf-8").read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ChatTrainer")
    methods = [n for n in cls.body if isinstance(n, ast.FunctionDef)]
    assert cls.end_lineno - cls.lineno + 1 <= 400
    longest = max(methods, key=lambda m: m.end_lineno - m.lineno)
    assert longest.end_lineno - longest.lineno + 1 <= 60, longest.name

    def assigned(fn):
        """Attributes of the trainer itself (self.X = ...) that `fn` assigns."""
        names = set()
        for node in ast.walk(fn):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                            names.add(t.attr)
        return names
    init = next(m for m in methods if m.name == "__init__")
    declared = assigned(init)
    assert len(declared) <= 20, sorted(declared)
    for method in methods:
        assert assigned(method) <= declared, (method.name, assigned(method) - declared)
