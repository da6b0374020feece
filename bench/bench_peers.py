"""chatlm against HF's Seq2SeqTrainer, and the floor no loader can beat, on one CPU.

    python bench/bench_peers.py                    # tiny preset, real sample data, batch 16, fp32
    python bench/bench_peers.py --steps=400 --max_tokens_per_batch=0

Three runs of the same tiny model (same tokenizer, seed, AdamW, lr, batch 16 rows, fp32) on the
real sample data (../shared/data/chatlm_sample/my_train_dataset_3k.parquet), each in its own
process so none inherits another's threads or allocator:

- chatlm: `ChatTrainer` itself (the real loop: streaming, length-grouped windows, accumulation 1);
- hf: transformers' `Seq2SeqTrainer` with `train_sampling_strategy="group_by_length"` (its best
  setting; `group_by_length=True` before transformers 5) and `DataCollatorForSeq2Seq`, the
  rows tokenized ahead (which only helps it);
- floor: the same model's forward, backward and optimizer step on batches with no padding at
  all: the rows sorted by length and each batch's rows cut to its shortest, built in memory
  before the clock starts. No loader can be faster per computed token.

Printed per run: non-pad tokens per second (prompt and response tokens, [EOS] included), as the
median over windows of 10 steps after `warmup` steps, and the ratios. Needs transformers'
Trainer only (no `datasets`); HF is a bench-only peer, not a dependency of chatlm.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import fire
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SAMPLE = os.path.join(ROOT, "..", "shared", "data", "chatlm_sample", "my_train_dataset_3k.parquet")
WINDOW = 10  # steps per rate sample


def window_rates(times: list[float], tokens: list[int], warmup: int) -> float:
    """Median of tokens/s over windows of WINDOW steps; times[i] is when step i ended."""
    rates = []
    for start in range(warmup, len(times) - WINDOW, WINDOW):
        rates.append(sum(tokens[start + 1:start + WINDOW + 1]) / (times[start + WINDOW] - times[start]))
    return float(np.median(rates))


def rows(train_file, tokenizer, max_seq_len):
    import pyarrow.parquet as pq

    from model.dataset import encode, non_empty
    table = pq.read_table(train_file, columns=["prompt", "response"])
    prompts, responses = table.column("prompt").to_pylist(), table.column("response").to_pylist()
    keep = non_empty(prompts, responses)
    src = encode(tokenizer, [p for p, k in zip(prompts, keep) if k], max_seq_len)
    tgt = encode(tokenizer, [r for r, k in zip(responses, keep) if k], max_seq_len)
    return [src[i].tolist() for i in range(len(src))], [tgt[i].tolist() for i in range(len(tgt))]


def run_chatlm(args: dict) -> float:
    from config import load_config
    from model.trainer import ChatTrainer
    from utils.logging import read_metrics
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(train_file=args["train_file"], validation_file="", tokenizer_dir=args["tokenizer_dir"],
                          model_size=args["model_size"], max_seq_len=args["max_seq_len"],
                          batch_size_per_gpu=args["batch_size"], gradient_accumulation_steps=1,
                          max_steps=args["steps"], logging_steps=WINDOW, learn_rate=args["lr"], warmup_steps=0,
                          mixed_precision="no", log_with="none", output_dir=out, train_state_dir=f"{out}/state",
                          seed=args["seed"], save_steps=10**9, epochs=100,
                          max_tokens_per_batch=args["max_tokens_per_batch"],
                          pad_to_multiple_of=args["pad_to_multiple_of"])
        ChatTrainer(cfg).train()
        records = [r for r in read_metrics(out) if "train/tokens_per_s" in r]
    return float(np.median([r["train/tokens_per_s"] for r in records if r["step"] > args["warmup"]]))


def run_hf(args: dict) -> float:
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    from config import T5ModelConfig
    from model.chat_model import TextToTextModel, get_t5_config
    from utils.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(args["tokenizer_dir"])
    src, tgt = rows(args["train_file"], tokenizer, args["max_seq_len"])
    dataset = [{"input_ids": s, "labels": t} for s, t in zip(src, tgt)]
    torch.manual_seed(args["seed"])
    model = TextToTextModel(get_t5_config(T5ModelConfig.preset(args["model_size"]), len(tokenizer)))
    collator = DataCollatorForSeq2Seq(tokenizer, model=None, padding=True)
    tokens, times = [], []

    def collate(features):
        batch = collator(features)
        tokens.append(int(batch["attention_mask"].sum()) + int((batch["labels"] >= 0).sum()))
        return batch

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        training_args = Seq2SeqTrainingArguments(
            output_dir=out, per_device_train_batch_size=args["batch_size"], max_steps=args["steps"],
            learning_rate=args["lr"], lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
            weight_decay=0.01, train_sampling_strategy="group_by_length", report_to="none", save_strategy="no",
            logging_strategy="no", dataloader_num_workers=0, seed=args["seed"], use_cpu=True,
            disable_tqdm=True, remove_unused_columns=False)
        trainer = Seq2SeqTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate,
                                 callbacks=[Clock()])
        trainer.train()
    return window_rates(times, tokens, args["warmup"])


def run_floor(args: dict) -> float:
    from config import T5ModelConfig
    from model.chat_model import TextToTextModel, get_t5_config
    from utils.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(args["tokenizer_dir"])
    src, tgt = rows(args["train_file"], tokenizer, args["max_seq_len"])
    bs = args["batch_size"]
    order = sorted(range(len(src)), key=lambda i: (len(tgt[i]), len(src[i])))
    batches = []
    for start in range(0, len(order) - bs + 1, bs):
        idx = order[start:start + bs]
        lp, lt = min(len(src[i]) for i in idx), min(len(tgt[i]) for i in idx)
        ids = torch.tensor([src[i][:lp - 1] + [tokenizer.eos_token_id] for i in idx])
        labels = torch.tensor([tgt[i][:lt - 1] + [tokenizer.eos_token_id] for i in idx])
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    rng = np.random.default_rng(args["seed"])
    batches = [batches[i] for i in rng.permutation(len(batches))]
    torch.manual_seed(args["seed"])
    model = TextToTextModel(get_t5_config(T5ModelConfig.preset(args["model_size"]), len(tokenizer))).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args["lr"], weight_decay=0.01)
    tokens, times = [], []
    for step in range(args["steps"]):
        batch = batches[step % len(batches)]
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens.append(batch["input_ids"].numel() + batch["labels"].numel())
        times.append(time.perf_counter())
    return window_rates(times, tokens, args["warmup"])


RUNS = {"chatlm": run_chatlm, "hf": run_hf, "floor": run_floor}


def main(train_file: str = SAMPLE, model_size: str = "tiny", batch_size: int = 16, steps: int = 200,
         warmup: int = 20, max_seq_len: int = 256, vocab_size: int = 8000, lr: float = 1e-4, seed: int = 0,
         tokenizer_dir: str = "/tmp/chatlm_bench_tokenizer", max_tokens_per_batch: int = 0,
         pad_to_multiple_of: int = 1, only: str = ""):
    """Print non-pad tokens/s of chatlm, HF's Seq2SeqTrainer and the floor, and their ratios."""
    args = dict(train_file=train_file, model_size=model_size, batch_size=batch_size, steps=steps, warmup=warmup,
                max_seq_len=max_seq_len, lr=lr, seed=seed, tokenizer_dir=tokenizer_dir,
                max_tokens_per_batch=max_tokens_per_batch, pad_to_multiple_of=pad_to_multiple_of)
    if only:
        print(json.dumps({only: RUNS[only](args)}))
        return
    if not os.path.isfile(train_file):
        sys.exit(f"{train_file} not found: the real sample data is in ../shared/data/chatlm_sample/")
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        from utils.tokenizer import train_tokenizer
        train_tokenizer(train_file, tokenizer_dir, vocab_size)
    print(f"model {model_size}, batch {batch_size}, {steps} steps ({warmup} not timed), fp32, "
          f"{torch.get_num_threads()} torch threads, data {os.path.basename(train_file)}")
    results = {}
    for name in RUNS:
        flags = [f"--{k}={v}" for k, v in args.items()] + [f"--only={name}"]
        proc = subprocess.run([sys.executable, __file__, *flags], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])[name]
        print(f"{name:8} {results[name]:10,.0f} non-pad tokens/s")
    print(f"chatlm / hf: {results['chatlm'] / results['hf']:.2f}x; chatlm / floor: "
          f"{results['chatlm'] / results['floor']:.2f}x")


if __name__ == "__main__":
    fire.Fire(main)
