"""The alignment demos' results: how often a model answers held-out prompts in the new style
(是{answer}。), how often the answer inside is right, and how far it moved from the demo model.

    python bench/bench_style.py score --model_dir=model_save/demo_dpo/best
    python bench/bench_style.py sweep [--kl_betas=0,0.05,0.1,0.2,0.5]

`score` loads the directory with AutoModelForSeq2SeqLM and AutoTokenizer alone, answers the
900 held-out test prompts greedily and prints, per task: style rate (answer starts with 是 and
ends with 。), answer exact match (the text between them equals the plain answer), and the mean
KL(model || demo model) per token over the styled test answers.
`sweep` trains data/demo_style_lora.yaml once per kl_beta (in a child process each) and prints
the same figures as one table. Run the Quickstart's demo first (model_save/demo/best).
"""
import os
import subprocess
import sys
from collections import defaultdict

import fire

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "model_save", "demo", "best")


def score(model_dir: str, base_dir: str = BASE, test_file: str = os.path.join(ROOT, "data", "demo_test.parquet"),
          batch_size: int = 100, quiet: bool = False) -> dict:
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    rows = pq.read_table(test_file).to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    base = AutoModelForSeq2SeqLM.from_pretrained(base_dir).eval()
    counts = defaultdict(lambda: [0, 0, 0, 0])  # styled, styled with the right answer, right in any style, rows
    kl_sum, kl_tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            inputs = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True)
            out = model.generate(**inputs, max_new_tokens=32, do_sample=False, num_beams=1)
            answers = tokenizer.batch_decode(out, skip_special_tokens=True)
            labels = tokenizer([f"是{r['response']}。" for r in chunk], return_tensors="pt", padding=True).input_ids
            labels[labels == tokenizer.pad_token_id] = -100
            logp = model(**inputs, labels=labels).logits.log_softmax(-1)
            logq = base(**inputs, labels=labels).logits.log_softmax(-1)
            mask = labels != -100
            kl_sum += float(((logp.exp() * (logp - logq)).sum(-1) * mask).sum())
            kl_tokens += int(mask.sum())
            for r, a in zip(chunk, answers):
                a = "".join(a.split())
                styled = a.startswith("是") and a.endswith("。")
                plain = a[1 if a.startswith("是") else 0:len(a) - (1 if a.endswith("。") else 0)]
                for key in ("all", r["task"]):
                    counts[key][0] += styled
                    counts[key][1] += styled and a[1:-1] == r["response"]
                    counts[key][2] += plain == r["response"]
                    counts[key][3] += 1
    result = {k: (s / n, right / n, any_style / n) for k, (s, right, any_style, n) in counts.items()}
    result["kl"] = kl_sum / max(1, kl_tokens)
    if not quiet:
        print(f"{model_dir}: mean KL to the demo model {result['kl']:.3f} nats per token")
        for key in ["all"] + sorted(k for k in counts if k != "all"):
            print(f"  {key:>8}: style {result[key][0]:7.2%}  answer exact match {result[key][1]:7.2%}  "
                  f"(answer right in any style {result[key][2]:7.2%})")
    return result


def sweep(kl_betas: str = "0,0.05,0.1,0.2,0.5", config: str = "data/demo_style_lora.yaml", train: bool = True):
    """With --train=False, score the models an earlier sweep left in model_save/demo_style_kl*."""
    values = [float(v) for v in str(kl_betas).replace("(", "").replace(")", "").split(",")]
    table = []
    for beta in values:
        out = os.path.join(ROOT, "model_save", f"demo_style_kl{beta:g}")
        command = [sys.executable, "train.py", "train", f"--config={config}", f"--kl_beta={beta}",
                   f"--output_dir={out}", f"--train_state_dir={out}/train_state", "--test_file="]
        if train:
            proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"kl_beta={beta} failed:\n{proc.stderr[-2000:]}")
        result = score(os.path.join(out, "best"), quiet=True)
        table.append((beta, *result["all"], result["kl"]))
        print(f"kl_beta {beta:g}: style {result['all'][0]:.2%}, answer exact match {result['all'][1]:.2%}, "
              f"right in any style {result['all'][2]:.2%}, mean KL {result['kl']:.3f}", flush=True)
    print("\n| kl_beta | style rate | answer exact match (styled) | answer right, any style | mean KL (nats/token) |"
          "\n| ---: | ---: | ---: | ---: | ---: |")
    for beta, style, right, any_style, kl in table:
        print(f"| {beta:g} | {style:.2%} | {right:.2%} | {any_style:.2%} | {kl:.3f} |")


def score_command(model_dir: str, base_dir: str = BASE, test_file: str = os.path.join(ROOT, "data", "demo_test.parquet")):
    score(model_dir, base_dir, test_file)


if __name__ == "__main__":
    fire.Fire({"score": score_command, "sweep": sweep})
