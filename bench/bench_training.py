"""Training throughput: our length-grouped stream against the original trainer's random batches.

    python bench/bench_training.py                       # tiny model, real sample data, CPU
    python bench/bench_training.py --model_size=small --mixed_precision=bf16 --steps=200   # on a GPU

Both loops train the same model with the same optimizer, batch size and data; only the batches
differ. "original" mimics charent/ChatLM-mini-Chinese: rows in random order, each batch padded
to its longest prompt and longest response. "chatlm" takes batches from model.dataset.TrainStream
(windows of similar lengths). Printed: non-pad target tokens/s (the original project's figure),
non-pad tokens/s (prompt and response), and the padded share of the computed tokens; then
the non-pad tokens/s that `train.py train` itself logs on the same model, data and batch size.
"""
import os
import re
import subprocess
import sys
import tempfile
import time

import fire
import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from config import T5ModelConfig  # noqa: E402
from model.chat_model import TextToTextModel, get_t5_config  # noqa: E402
from model.dataset import TrainStream, collate, encode, non_empty  # noqa: E402
from utils.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "chatlm_sample",
                      "my_train_dataset_3k.parquet")


def random_batches(path, tokenizer, batch_size, max_seq_len, seed):
    table = pq.read_table(path, columns=["prompt", "response"])
    prompts, responses = table.column("prompt").to_pylist(), table.column("response").to_pylist()
    keep = non_empty(prompts, responses)
    src = encode(tokenizer, [p for p, k in zip(prompts, keep) if k], max_seq_len)
    tgt = encode(tokenizer, [r for r, k in zip(responses, keep) if k], max_seq_len)
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(src))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            yield collate([src[j] for j in idx], [tgt[j] for j in idx])
        epoch += 1


def grouped_batches(path, tokenizer, batch_size, max_seq_len, seed, buffer_size):
    stream, epoch = TrainStream([path], tokenizer, batch_size, max_seq_len, buffer_size, seed), 0
    while True:
        stream.set_epoch(epoch)
        for batch in stream:
            yield {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        epoch += 1


def measure(batches, model_size, vocab, steps, warmup, device, dtype, seed):
    torch.manual_seed(seed)
    model = TextToTextModel(get_t5_config(T5ModelConfig.preset(model_size), vocab)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    counts = np.zeros(3)  # non-pad target tokens, non-pad tokens, computed (padded) tokens
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started, counts[:] = time.perf_counter(), 0
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        target = int((batch["labels"] >= 0).sum())
        counts += [target, target + int(batch["attention_mask"].sum()),
                   batch["labels"].numel() + batch["input_ids"].numel()]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return counts / seconds, 1 - counts[1] / counts[2]


def main(train_file: str = SAMPLE, model_size: str = "tiny", batch_size: int = 16, steps: int = 60,
         warmup: int = 5, max_seq_len: int = 256, buffer_size: int = 10000, vocab_size: int = 8000,
         mixed_precision: str = "no", tokenizer_dir: str = "/tmp/chatlm_bench_tokenizer", seed: int = 0,
         trainer_steps: int = 100):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        train_tokenizer(train_file, tokenizer_dir, vocab_size)
    tokenizer = load_tokenizer(tokenizer_dir)
    print(f"model {model_size}, batch {batch_size}, {steps} timed steps, device {device}, "
          f"precision {mixed_precision}, data {os.path.basename(train_file)}")
    results = {}
    for name, batches in [
            ("original (random batches)", random_batches(train_file, tokenizer, batch_size, max_seq_len, seed)),
            ("chatlm (length-grouped)", grouped_batches(train_file, tokenizer, batch_size, max_seq_len, seed,
                                                        buffer_size))]:
        results[name] = measure(batches, model_size, len(tokenizer), steps, warmup, device, dtype, seed)
    print(f"{'':28} {'target tok/s':>13} {'non-pad tok/s':>14} {'padded tok/s':>13} {'pad share':>10}")
    for name, (rates, pad) in results.items():
        print(f"{name:28} {rates[0]:13,.0f} {rates[1]:14,.0f} {rates[2]:13,.0f} {pad:10.1%}")
    (base, _), (ours, _) = results.values()
    print(f"speed-up in non-pad target tokens/s: {ours[0] / base[0]:.2f}x; in non-pad tokens/s: {ours[1] / base[1]:.2f}x")
    if trainer_steps:
        print(f"the trainer itself (train.py train, same model, data and batch, {trainer_steps} steps): "
              f"{trainer_tokens_per_s(train_file, model_size, batch_size, trainer_steps, tokenizer_dir, mixed_precision):,.0f} "
              "non-pad tok/s (its log's median)")


def trainer_tokens_per_s(train_file, model_size, batch_size, steps, tokenizer_dir, mixed_precision) -> float:
    """Median of the non-pad tokens/s that `train.py train` logs, first log line left out."""
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run(
            [sys.executable, "train.py", "train", f"--train_file={train_file}", f"--model_size={model_size}",
             f"--batch_size_per_gpu={batch_size}", "--gradient_accumulation_steps=1", f"--max_steps={steps}",
             "--logging_steps=10", f"--tokenizer_dir={tokenizer_dir}", f"--output_dir={out}",
             f"--train_state_dir={out}/state", "--validation_file=", "--log_with=none",
             f"--mixed_precision={mixed_precision}"],
            cwd=ROOT, capture_output=True, text=True, check=True)
    rates = [float(m.replace(",", "")) for m in re.findall(r"tokens/s ([\d,]+)", proc.stdout)][1:]
    return float(np.median(rates))


if __name__ == "__main__":
    fire.Fire(main)
