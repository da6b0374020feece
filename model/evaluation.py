"""Evaluation: the objective's metrics plus greedy answers scored against the target column.

Every objective reports its own numbers (seq2seq: loss and perplexity; DPO: loss and the
rewards; GRPO: the reward of its greedy answers) and, where it has a target (`response`, or
`chosen` for DPO), corpus BLEU-4 and exact match of batched greedy answers against it, overall
and per `task` when the file has one. The best model is chosen by one of these, named by
`best_metric`.
"""
import numpy as np
import torch

from model.dataset import EvalSet, get_eval_loader
from utils.files import open_parquet
from utils.metrics import bleu4, exact_match_by_group

# Metrics where lower is better; every other one is better higher.
LOWER_IS_BETTER = ("loss", "perplexity", "kl")


def is_better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric.split("/")[0] in LOWER_IS_BETTER else value > best


@torch.no_grad()
def evaluate(model, loader, accelerator, tokenizer, max_new_tokens: int, reference=None) -> dict:
    """Every row of `loader` (an EvalSet's), on all processes: {"metrics": ..., "hypotheses",
    "references", "rows"}.

    Generated sequences differ in length between processes: they are padded to a common
    length before gathering (the original gathered ragged tensors, which fails with several).
    BLEU pools every row of every batch (the original kept only the last batch's scores).
    """
    dataset: EvalSet = loader.dataset
    objective = dataset.objective
    model.eval()
    generator = accelerator.unwrap_model(model, keep_torch_compile=False)
    sums, predictions, indices = {}, [], []
    for batch in loader:
        index = batch.pop("index")
        rows = objective.eval_rows(model, batch, reference)
        out = generator.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        out = accelerator.pad_across_processes(out, dim=1, pad_index=0)
        rows, out, index = accelerator.gather_for_metrics((rows, out, index))
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


def score_file(model, accelerator, tokenizer, path: str, batch_size: int, max_seq_len: int, logger,
               max_rows: int = 10**9, samples: int = 5, objective=None, reference=None) -> dict:
    """evaluate() over a parquet file, then its report: with a `task` column, exact match per task."""
    open_parquet(path, objective.columns if objective else ("prompt", "response"))
    dataset = EvalSet(path, tokenizer, max_seq_len, max_rows, objective)
    loader = accelerator.prepare(get_eval_loader(dataset, batch_size))
    result = evaluate(model, loader, accelerator, tokenizer, max_seq_len, reference)
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
