"""Evaluation: the objective's metrics plus greedy answers scored against the target column.

Every objective reports its own numbers (seq2seq: loss and perplexity; DPO: loss and the
rewards; GRPO: the reward of its greedy answers) and, where it has a target (`response`, or
`chosen` for DPO), corpus BLEU-4 and exact match of batched greedy answers against it, overall
and per `task` when the file has one. The best model is chosen by one of these, named by
`best_metric`.

`Evaluator` is a run's evaluation: the validation rows and the regression prompts at every
evaluation, best/ by `best_metric`, early stopping, the test report at the end and summary.json.
"""
import dataclasses
import json
import math
import os
import time

import numpy as np
import torch

from model.dataset import EvalSet, get_eval_loader
from model.regression import run_checks
from utils.errors import UserError
from utils.files import atomic_write
from utils.logging import memory_usage, read_metrics
from utils.metrics import bleu4, exact_match_by_group
from utils.plots import plot_training

# Metrics where lower is better; every other one is better higher.
LOWER_IS_BETTER = ("loss", "perplexity", "kl")


def is_better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric.split("/")[0] in LOWER_IS_BETTER else value > best


@torch.no_grad()
def evaluate(model, loader, run, tokenizer, max_new_tokens: int, reference=None) -> dict:
    """Every row of `loader` (an EvalSet's), on all processes: {"metrics": ..., "hypotheses",
    "references", "rows"}.

    Generated sequences differ in length between processes: they are padded to a common
    length before gathering (the original gathered ragged tensors, which fails with several).
    BLEU pools every row of every batch (the original kept only the last batch's scores).
    """
    dataset: EvalSet = loader.dataset
    objective = dataset.objective
    model.eval()
    generator = run.accelerator.unwrap_model(model, keep_torch_compile=False)
    sums, predictions, indices = {}, [], []
    for batch in loader:
        index = batch.pop("index")
        rows = objective.eval_rows(model, batch, reference)
        out = generator.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        rows, out, index = run.gather_rows(rows, out, index)
        for key, value in rows.items():
            sums.setdefault(key, []).append(value.float().cpu())
        predictions.append(out.cpu())
        indices.append(index.cpu())
    metrics = objective.eval_metrics({k: torch.cat(v) for k, v in sums.items()})
    hyps = [h for p in predictions for h in tokenizer.batch_decode(p, skip_special_tokens=True)]
    rows = [i for ix in indices for i in ix.tolist()]
    columns = {c: [values[i] for i in rows] for c, values in {**dataset.texts, **dataset.extra}.items()}
    metrics.update(objective.answer_metrics(columns.pop(objective.columns[0]), hyps, columns))
    refs = [dataset.responses[i] for i in rows] if dataset.responses is not None else None
    if refs is not None:
        groups = [dataset.extra["task"][i] for i in rows] if "task" in dataset.extra else None
        metrics["bleu4"] = bleu4(refs, hyps)
        for name, (right, total) in exact_match_by_group(refs, hyps, groups).items():
            metrics["exact_match" if name == "all" else f"exact_match/{name}"] = right / max(1, total)
    return {"metrics": metrics, "hypotheses": hyps, "references": refs, "rows": rows}


def score_file(model, run, tokenizer, path: str, batch_size: int, max_seq_len: int, logger,
               max_rows: int = 10**9, samples: int = 5, objective=None, reference=None,
               last_turn_only: bool = False) -> dict:
    """evaluate() over a parquet file, then its report: with a `task` column, exact match per task."""
    dataset = EvalSet(path, tokenizer, max_seq_len, max_rows, objective, last_turn_only=last_turn_only)
    loader = run.accelerator.prepare(get_eval_loader(dataset, batch_size))
    result = evaluate(model, loader, run, tokenizer, max_seq_len, reference)
    print_report(result, dataset, samples, logger)
    return result


def print_report(result: dict, dataset: EvalSet, samples: int, logger):
    rows, metrics, refs = result["rows"], result["metrics"], result["references"]
    shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.startswith("exact_match"))
    logger.info(f"test: {len(rows)} rows, {shown}")
    if refs is not None:
        groups = [dataset.extra["task"][i] for i in rows] if "task" in dataset.extra else None
        scores = exact_match_by_group(refs, result["hypotheses"], groups)
        for name, (right, total) in sorted(scores.items(), key=lambda kv: kv[0] != "all"):
            logger.info(f"exact match {name:>10}: {right / total:7.2%} ({right}/{total})")
    for k in sorted(np.random.default_rng(0).choice(len(rows), size=min(samples, len(rows)), replace=False)):
        expected = f"  (expected {refs[k]})" if refs is not None else ""
        logger.info(f"  {dataset.prompts[rows[k]]} -> {result['hypotheses'][k]}{expected}")


def get_eval_set(cfg, plan, tokenizer, logger) -> EvalSet | None:
    """The validation rows: validation_file's, or those validation_split holds out of the training data."""
    if cfg.validation_file:
        return EvalSet(cfg.validation_file, tokenizer, cfg.max_seq_len, cfg.max_eval_rows, plan.objective,
                       last_turn_only=cfg.last_turn_only)
    if not cfg.validation_split:
        return None
    eval_set = EvalSet(plan.train_files, tokenizer, cfg.max_seq_len, cfg.max_eval_rows, plan.objective,
                       split=(cfg.seed, cfg.validation_split), last_turn_only=cfg.last_turn_only)
    if not len(eval_set):
        raise UserError(f"--validation_split={cfg.validation_split} holds out no usable row of the training "
                        "data; raise it or give --validation_file")
    logger.info(f"validation: {len(eval_set)} rows held out of the training data "
                f"(--validation_split={cfg.validation_split})")
    return eval_set


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process (one per shape it did not reuse a graph for)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


class Evaluator:
    """A run's evaluation (see the module docstring). `maybe_evaluate` is a collective: every
    process evaluates its share of the rows and the regression prompts together."""

    def __init__(self, cfg, run, plan, tokenizer, policy, metrics, logger):
        self.cfg, self.run, self.plan, self.tokenizer, self.policy = cfg, run, plan, tokenizer, policy
        self.metrics, self.logger = metrics, logger
        self.eval_set = get_eval_set(cfg, plan, tokenizer, logger)
        self.loader = None  # the prepared loader of eval_set (set_loader)
        self.test_metrics = None

    def unprepared_loader(self):
        return get_eval_loader(self.eval_set, self.cfg.batch_size_per_gpu) if self.eval_set else None

    def maybe_evaluate(self, end_of_epoch: bool = False) -> float:
        """Evaluate on the validation rows and the regression prompts; the best model by
        `best_metric` goes to best/, and early stopping counts evaluations without improvement.
        Returns the seconds it took (not training throughput)."""
        if self.loader is None and not self.plan.checks:
            return 0.0
        cfg, progress, policy = self.cfg, self.run.progress, self.policy
        progress.last_eval_step = progress.step
        started = time.perf_counter()
        where = f"end of epoch {progress.epoch - 1}" if end_of_epoch else f"step {progress.step}"
        scores, meta, rows = {}, {"best_metric": cfg.best}, 0
        if self.loader is not None:
            result = evaluate(policy.model, self.loader, self.run, self.tokenizer, cfg.max_seq_len, policy.reference)
            scores, rows = result["metrics"], len(result["hypotheses"])
        if self.plan.checks:
            passed = self.check_regressions(where)
            scores["regression/pass_rate"] = len(passed) / len(self.plan.checks)
            meta["regression"] = {c.name: c.name in passed for c in self.plan.checks}
        self.metrics.log({f"eval/{k}": v for k, v in scores.items()}, progress.step, progress.epoch,
                         self.plan.total_steps, prefix=f"eval at {where} ({rows} rows):", meta=meta)
        self.maybe_save_best(scores, where)
        policy.model.train()
        return time.perf_counter() - started

    def maybe_save_best(self, scores: dict, where: str) -> None:
        cfg, progress = self.cfg, self.run.progress
        score = scores.get(cfg.best)
        if self.loader is None:  # regression prompts only
            return
        if score is None:
            self.logger.warning(f"eval at {where}: no {cfg.best} to choose best/ by (is there a task column?)")
        elif not math.isfinite(scores.get("loss", 0.0)) or not math.isfinite(score):
            self.logger.warning(f"eval at {where}: the validation loss is not finite; best/ is left as it is")
        else:
            self.count_for_early_stopping(score, where)
            if progress.step > 0 and is_better(cfg.best, score, progress.best_score):
                progress.best_score, progress.best_step, progress.best_metric = score, progress.step, cfg.best
                self.policy.save_together(self.run, os.path.join(cfg.output_dir, "best"), self.tokenizer)
                self.logger.info(f"new best {cfg.best} {score:.4f}: model saved to "
                                 f"{os.path.join(cfg.output_dir, 'best')}")

    def count_for_early_stopping(self, score: float, where: str) -> None:
        """An evaluation without an improvement of at least early_stopping_min_delta over the best
        so far counts; early_stopping_patience of them in a row end the run (the count is saved
        with the train state, so it survives a resume)."""
        cfg, progress = self.cfg, self.run.progress
        if not cfg.early_stopping_patience:
            return
        best = progress.best_score
        gain = None if best is None else (best - score if cfg.best.split("/")[0] in LOWER_IS_BETTER else score - best)
        if gain is None or (gain > 0 and gain >= cfg.early_stopping_min_delta):
            progress.evals_without_improvement = 0
            return
        progress.evals_without_improvement += 1
        self.logger.info(f"eval at {where}: no improvement of {cfg.best} by {cfg.early_stopping_min_delta} "
                         f"({progress.evals_without_improvement} of --early_stopping_patience="
                         f"{cfg.early_stopping_patience})")
        if progress.evals_without_improvement >= cfg.early_stopping_patience:
            progress.early_stopped = True
            self.logger.info(f"early stopping at step {progress.step}: best {cfg.best} {best:.4f} at step "
                             f"{progress.best_step}")

    def check_regressions(self, where: str) -> set[str]:
        """Answer every regression prompt greedily; log the failures, and warn about each prompt
        that passed at the previous evaluation and fails now. Returns the names that passed."""
        model = self.policy.unwrapped()
        model.eval()
        checks, progress = self.plan.checks, self.run.progress
        results = run_checks(model, self.tokenizer, checks, self.cfg.max_seq_len, self.run.accelerator.device)
        passed = {c.name for c, _, ok in results if ok}
        before = set(progress.regression_passed or [])
        if self.run.is_main:
            self.logger.info(f"regression at {where}: {len(passed)}/{len(results)} passed")
            for check, answer, ok in results:
                if ok:
                    continue
                line = f"{check.name}: {check.prompt!r} -> {answer!r}, expected {check.match} {check.expect!r}"
                if check.name in before:
                    self.logger.warning(f"regression at {where}: {line} (it passed at the previous evaluation)")
                else:
                    self.logger.info(f"  fails {line}")
        progress.regression_passed = sorted(passed)
        return passed

    def report(self, path: str) -> None:
        """Collective: score the trained model on a held-out file (metrics, exact match per task,
        sample answers); the metrics go to summary.json."""
        policy = self.policy
        self.test_metrics = score_file(policy.model, self.run, self.tokenizer, path, self.cfg.batch_size_per_gpu * 4,
                                       self.cfg.max_seq_len, self.logger, objective=self.plan.objective,
                                       reference=policy.reference, last_turn_only=self.cfg.last_turn_only)["metrics"]

    def write_summary(self, status: str) -> None:
        """output_dir/summary.json and plots/training.png at the end of a run (main process)."""
        cfg, progress, plan = self.cfg, self.run.progress, self.plan
        progress.wall_seconds = self.run.wall_seconds()
        records = read_metrics(cfg.output_dir) if os.path.isfile(os.path.join(cfg.output_dir, "metrics.jsonl")) \
            else []
        speeds = [r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r]
        evals = [r for r in records if any(k.startswith("eval/") for k in r)]
        last = {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else None
        final_score = last.get(cfg.best) if last and evals[-1]["step"] == progress.step else None
        memory = memory_usage()
        summary = {
            "status": status, "steps": progress.step, "total_steps": plan.total_steps, "epoch": progress.epoch,
            "wall_seconds": round(progress.wall_seconds, 1),
            "data": {"rows_trained": progress.samples, "empty_rows_skipped": progress.rows_skipped,
                     "histories_truncated": progress.histories_truncated,
                     "tokens": progress.tokens, "validation_rows": len(self.eval_set) if self.eval_set else 0,
                     "rows_per_source": dict(zip((s.label for s in plan.sources), progress.rows_per_source))
                     if progress.rows_per_source else None},
            "median_tokens_per_s": float(np.median(speeds)) if speeds else None,
            "compiled_graphs": compiled_graphs() if cfg.torch_compile else None,
            "peak_rss_gb": round(memory["peak_rss_gb"], 3),
            "peak_gpu_gb": round(memory["peak_gpu_gb"], 3) if "peak_gpu_gb" in memory else None,
            "best": {"metric": cfg.best, "score": progress.best_score, "step": progress.best_step},
            # final/ is the last step's model: which of it and best/ scored better on the validation rows
            "final_vs_best": None if final_score is None or progress.best_score is None else
            "same" if progress.best_step == progress.step or final_score == progress.best_score else
            "final" if is_better(cfg.best, final_score, progress.best_score) else "best",
            "early_stopping": {"patience": cfg.early_stopping_patience, "min_delta": cfg.early_stopping_min_delta,
                               "evals_without_improvement": progress.evals_without_improvement,
                               "stopped_early": progress.early_stopped},
            "last_eval": {"step": evals[-1]["step"], **last} if last else None,
            "regression_failed": sorted(c.name for c in plan.checks if c.name not in
                                        set(progress.regression_passed or [])) if plan.checks else None,
            "test": self.test_metrics,
            "settings": {k: v for k, v in dataclasses.asdict(cfg).items()},
        }
        path = os.path.join(cfg.output_dir, "summary.json")
        with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, ensure_ascii=False)
        if records:
            plot = plot_training(cfg.output_dir, cfg.best)
            self.logger.info(f"summary: {path}, plot: {plot}")
