"""Training speed through the real ChatTrainer, per configuration, and where a step's time goes.

    python bench/bench_gpu.py                                  # GPU: small preset, every configuration
    python bench/bench_gpu.py --model_size=tiny --steps=30     # CPU: the tiny preset
    python bench/bench_gpu.py --configs=b64,b64+compile --peak_tflops=989

Rows shaped like the real data (bench/make_synthetic_parquet.py: the sample data's length
distribution) are trained for `steps` optimizer steps (accumulation 1) by `ChatTrainer` itself,
subclassed only to time its parts. Printed per configuration: non-pad tokens/s (prompt and
response), samples/s, model FLOPs utilisation, peak GPU memory, and the share of a step spent
waiting for data, in forward, backward, the optimizer step (clipping included) and everything
else. On a GPU the parts are timed with CUDA events read once at the end (no synchronisation
per step); on a CPU, where every operation is synchronous, with the clock.

FLOPs of a training step (forward x 3: the backward costs twice the forward), counted on the
non-pad tokens of each row, encoder and decoder apart (d = d_model, a = heads x d_kv, f = d_ff,
V = vocabulary, Le/Ld = encoder/decoder layers, S = prompt tokens, T = response tokens):

    encoder, per token:  2 x Le x (4 d a + 2 d f)        + per row: 2 x Le x 2 S^2 a   (scores, values)
    decoder, per token:  2 x Ld x (8 d a + 2 d f) + 2 d V + per row: 2 x Ld x (2 T^2 a + 2 T S a)

MFU = FLOPs per second / the device's peak (bf16 dense on a GPU: H100/H200 989 TFLOPS, A100 312;
give --peak_tflops elsewhere; on a CPU without it MFU is not printed). Padding is not counted:
a padded token costs time and does no useful work.
"""
import os
import sys
import tempfile
import time

import fire
import pyarrow.parquet as pq
import torch
import torch._dynamo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from config import load_config  # noqa: E402
from model.trainer import ChatTrainer  # noqa: E402

CONFIGS = {  # name: TrainConfig overrides
    "b16": dict(batch_size_per_gpu=16), "b64": dict(batch_size_per_gpu=64), "b128": dict(batch_size_per_gpu=128),
    "budget": dict(batch_size_per_gpu=64, max_tokens_per_batch=16384),
    "b64+eager": dict(batch_size_per_gpu=64, attn_implementation="eager"),  # auto is the default (sdpa on a GPU)
    "b64+compile": dict(batch_size_per_gpu=64, torch_compile=True),
    "b64+eager+compile": dict(batch_size_per_gpu=64, attn_implementation="eager", torch_compile=True),
    "budget+compile": dict(batch_size_per_gpu=64, max_tokens_per_batch=16384, torch_compile=True),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
               "4090": 165.0}
PARTS = ("data", "forward", "backward", "optimizer")


class Timer:
    """Intervals per part, with CUDA events (read at the end) or the clock."""

    def __init__(self, cuda: bool):
        self.cuda, self.events, self.seconds = cuda, {p: [] for p in PARTS}, dict.fromkeys(PARTS, 0.0)

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, part: str, started):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events[part].append((started, end))
        else:
            self.seconds[part] += time.perf_counter() - started

    def totals(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
            return {p: sum(a.elapsed_time(b) for a, b in pairs) / 1000 for p, pairs in self.events.items()}
        return self.seconds


class TimedSteps:
    """Hooks that time the real loop's parts once `warmup` steps are done: waiting for a batch
    (data), the objective's forward (forward), backward, and the optimizer step (optimizer)."""

    def __init__(self, timer: Timer, warmup: int):
        self.timer, self.warmup = timer, warmup
        self.rows, self.timed_from, self.mark = [], None, None

    def timing(self, trainer) -> bool:
        return trainer.progress.step >= self.warmup

    def lap(self, trainer, part):
        if self.mark is not None and part is not None:
            self.timer.stop(part, self.mark)
        self.mark = self.timer.start() if self.timing(trainer) else None

    def on_batch(self, trainer, batch):
        if self.timing(trainer) and self.timed_from is None:
            self.timed_from = (time.perf_counter(), trainer.progress.samples, trainer.progress.tokens)
        self.lap(trainer, "data")
        if self.timing(trainer) and batch is not None:
            lp = batch["attention_mask"].sum(1).tolist()
            lt = (batch["labels"] >= 0).sum(1).tolist()
            self.rows += list(zip(lp, lt))

    def on_loss(self, trainer, batch, loss, values):
        self.lap(trainer, "forward")

    def on_backward(self, trainer):
        self.lap(trainer, "backward")

    def on_update(self, trainer):
        self.lap(trainer, "optimizer")

    def on_step_end(self, trainer):
        self.lap(trainer, None)  # logging and the rest count as "other" until the next batch is waited for


def step_flops(model_config, rows) -> float:
    c = model_config
    d, a, f, V = c.d_model, c.num_heads * c.d_kv, c.d_ff, c.vocab_size
    le, ld = c.num_layers, c.num_decoder_layers
    total = 0.0
    for s, t in rows:
        total += 2 * le * (4 * d * a + 2 * d * f) * s + 2 * le * 2 * s * s * a
        total += (2 * ld * (8 * d * a + 2 * d * f) + 2 * d * V) * t + 2 * ld * (2 * t * t * a + 2 * t * s * a)
    return 3 * total


def run(name: str, overrides: dict, args: dict) -> dict:
    cuda = torch.cuda.is_available()
    timer = Timer(cuda)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(train_file=args["train_file"], validation_file="", tokenizer_dir=args["tokenizer_dir"],
                          model_size=args["model_size"], max_seq_len=args["max_seq_len"],
                          gradient_accumulation_steps=1, max_steps=args["warmup"] + args["steps"],
                          logging_steps=10**9, learn_rate=1e-4, warmup_steps=10, log_with="none",
                          output_dir=out, train_state_dir=f"{out}/state", save_steps=10**9, epochs=1000,
                          mixed_precision=args["mixed_precision"], num_workers=args["num_workers"],
                          **overrides)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        timed = TimedSteps(timer, args["warmup"])
        trainer = ChatTrainer(cfg, hooks=[timed])
        trainer.train()
    if cuda:
        torch.cuda.synchronize()
    t0, samples0, tokens0 = timed.timed_from
    seconds = time.perf_counter() - t0
    parts = timer.totals()
    parts["other"] = max(0.0, seconds - sum(parts.values()))
    tokens = sum(s + t for s, t in timed.rows)
    model_config = trainer.unwrapped().config
    flops = step_flops(model_config, timed.rows) / seconds
    return {"name": name, "tokens_per_s": tokens / seconds, "samples_per_s": len(timed.rows) / seconds,
            "tflops": flops / 1e12, "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "parts": {k: v / seconds for k, v in parts.items()}}


def main(model_size: str = "", steps: int = 0, warmup: int = 5, configs: str = "", max_seq_len: int = 256,
         rows: int = 20000, mixed_precision: str = "auto", num_workers: int = 0, peak_tflops: float = 0.0,
         vocab_size: int = 8000, data_dir: str = "/tmp/chatlm_bench_gpu"):
    """Print the table; defaults: small preset and 100 steps on a GPU, tiny and 30 on a CPU."""
    cuda = torch.cuda.is_available()
    model_size = model_size or ("small" if cuda else "tiny")
    steps = steps or (100 if cuda else 30)
    names = [c for c in configs.split(",") if c] if configs else list(CONFIGS)
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configuration {unknown[0]}; choose from {', '.join(CONFIGS)}")
    os.makedirs(data_dir, exist_ok=True)
    train_file = os.path.join(data_dir, f"rows_{rows}.parquet")
    if not os.path.isfile(train_file):
        from make_synthetic_parquet import main as make_rows
        make_rows(rows=rows, output=train_file)
    tokenizer_dir = os.path.join(data_dir, f"tokenizer_{vocab_size}")
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        from utils.tokenizer import train_tokenizer
        train_tokenizer(train_file, tokenizer_dir, vocab_size, model_max_length=max_seq_len)
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    peak = peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if cuda and k in device), 0.0)
    print(f"{device}; {model_size} preset, {steps} timed steps after {warmup}, precision {mixed_precision}, "
          f"{pq.ParquetFile(train_file).metadata.num_rows:,} synthetic rows shaped like the sample data")
    args = dict(train_file=train_file, tokenizer_dir=tokenizer_dir, model_size=model_size, max_seq_len=max_seq_len,
                steps=steps, warmup=warmup, mixed_precision=mixed_precision, num_workers=num_workers)
    print(f"{'configuration':22} {'tokens/s':>10} {'samples/s':>9} {'TFLOPS':>7} {'MFU':>6} {'peak GB':>7}  "
          + " ".join(f"{p:>9}" for p in (*PARTS, "other")))
    for name in names:
        r = run(name, CONFIGS[name], args)
        mfu = f"{r['tflops'] / peak:6.1%}" if peak else f"{'n/a':>6}"
        memory = f"{r['peak_gb']:7.1f}" if r["peak_gb"] is not None else f"{'-':>7}"
        print(f"{name:22} {r['tokens_per_s']:10,.0f} {r['samples_per_s']:9,.1f} {r['tflops']:7.3f} {mfu} {memory}  "
              + " ".join(f"{r['parts'][p]:9.1%}" for p in (*PARTS, "other")), flush=True)
        if cuda:
            torch.cuda.empty_cache()
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        torch._dynamo.reset()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    fire.Fire(main)
