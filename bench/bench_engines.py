"""Memory and step time per engine: DDP, FSDP2 full and FSDP2 grad_op, side by side in one run.

    python bench/bench_engines.py                         # CPU: 2 processes over gloo, small preset
    python bench/bench_engines.py --table                 # the memory table of the README (no training)
    python bench/bench_engines.py --model_size=large --processes=8 --mixed_precision=bf16   # GPUs: one command

Each engine trains the same steps through the real trainer (`torchrun` starts this file's worker
on every process, which runs `ChatTrainer` with a hook that reads the process's memory and
clock). Printed per engine: each process's peak resident memory (RSS) up to the last training
step (before the final save gathers the whole state onto the main process) and its RSS at that
step, on GPUs its peak allocated GPU memory, and the median optimizer-step time after `warmup`
steps (the slowest process's). Every process builds the whole model before it is sharded, so the
peak RSS holds the whole weights once at least. Rows are synthetic,
shaped like the sample data (bench/make_synthetic_parquet.py), tokenized with a vocabulary of
`vocab_size`.

`--table` prints, for the small, base and large presets, the bytes each process holds for
weights, gradients and optimizer state (activations not counted) under each engine, with AdamW
and with Adafactor: DDP holds all of them; FSDP2 full holds 1/N of each plus the block being
gathered; grad_op holds 1/N of gradients and optimizer state and the whole weights during a step
(ZeRO-2). These are counts from the presets' parameters, not measurements.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import fire

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

ENGINES = {"ddp": "", "fsdp2 full": "full", "fsdp2 grad_op": "grad_op"}


class Probe:
    """Hooks: the clock at each step's end, and this process's peak memory at the last step."""

    def __init__(self, last_step: int):
        self.last_step, self.ends, self.peak = last_step, [], None

    def on_step_end(self, trainer):
        import torch
        self.ends.append(time.perf_counter())
        if trainer.progress.step == self.last_step:
            import psutil
            self.peak = {"rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
                         "rss_now_gb": psutil.Process().memory_info().rss / 1e9,
                         "gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


def worker(flags, warmup: int):
    """One process of a launch: train, then print this process's figures as one JSON line."""
    from config import load_config
    from model.trainer import ChatTrainer
    settings = flags if isinstance(flags, dict) else json.loads(flags)  # fire parses the JSON itself
    probe = Probe(settings["max_steps"])
    trainer = ChatTrainer(load_config(**settings), hooks=[probe])
    trainer.train()
    steps = [b - a for a, b in zip(probe.ends[warmup:], probe.ends[warmup + 1:])]
    print("RESULT " + json.dumps({"rank": trainer.accelerator.process_index, **probe.peak,
                                  "step_seconds": statistics.median(steps)}), flush=True)


def data(rows: int, vocab_size: int, max_seq_len: int, data_dir: str) -> tuple[str, str]:
    os.makedirs(data_dir, exist_ok=True)
    train_file = os.path.join(data_dir, f"rows_{rows}.parquet")
    if not os.path.isfile(train_file):
        from make_synthetic_parquet import main as make_rows
        make_rows(rows=rows, output=train_file)
    tokenizer_dir = os.path.join(data_dir, f"tokenizer_{vocab_size}")
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        from utils.tokenizer import train_tokenizer
        train_tokenizer(train_file, tokenizer_dir, vocab_size, model_max_length=max_seq_len)
    return train_file, tokenizer_dir


def measure(engine: str, processes: int, settings: dict, warmup: int) -> list[dict]:
    """Launch `processes` workers under `engine`; each one's figures."""
    with tempfile.TemporaryDirectory() as out:
        flags = {**settings, "fsdp": ENGINES[engine], "output_dir": out, "train_state_dir": f"{out}/state"}
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if not _cuda():
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // processes))
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                               "--master_port", str(_free_port()), __file__, "worker", "--flags", json.dumps(flags),
                               "--warmup", str(warmup)], cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{engine} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return sorted(results, key=lambda r: r["rank"])


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def table(vocab_size: int = 29298, processes: str = "2,8"):
    """Weights + gradients + optimizer state per process (GB), from the presets' parameter counts."""
    import torch

    from config import T5ModelConfig
    from model.chat_model import TextToTextModel, get_t5_config
    counts = [int(n) for n in str(processes).split(",")]
    print(f"GB per process for weights, gradients and optimizer state (fp32; activations not counted), "
          f"vocabulary {vocab_size:,}; N processes")
    header = ["preset", "parameters", "optimizer"] + [f"{e} N={n}" for n in counts for e in ("DDP", "full", "grad_op")]
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + " |")
    for name in ("small", "base", "large"):
        with torch.device("meta"):
            model = TextToTextModel(get_t5_config(T5ModelConfig.preset(name), vocab_size))
        params = list(model.parameters())
        p = sum(x.numel() for x in params)
        # The largest unit FSDP2 gathers at once: the root (shared embedding and head, final norms).
        blocks = [m for m in model.modules() if type(m).__name__ == "T5Block"]
        root = p - sum(x.numel() for b in blocks for x in b.parameters())
        block = max(sum(x.numel() for x in b.parameters()) for b in blocks)
        adafactor = sum(sum(x.shape[-2:]) if x.ndim >= 2 else x.numel() for x in params)
        for optimizer, state in (("AdamW", 8 * p), ("Adafactor", 4 * adafactor)):
            cells = []
            for n in counts:
                ddp = 4 * p + 4 * p + state
                full = (4 * p + 4 * p + state) / n + 4 * (root + 2 * block)  # + root and two blocks gathered
                grad_op = 4 * p + (4 * p + 4 * p + state) / n  # whole weights during a step, 1/N of the rest
                cells += [f"{ddp / 1e9:.2f}", "-" if optimizer == "Adafactor" else f"{full / 1e9:.2f}",
                          "-" if optimizer == "Adafactor" else f"{grad_op / 1e9:.2f}"]
            print(f"| {name} | {p / 1e6:.0f}M | {optimizer} | " + " | ".join(cells) + " |")
    print("FSDP2 runs AdamW only (Adafactor's factored statistics need whole matrices): '-'.")


def main(model_size: str = "small", processes: int = 2, steps: int = 8, warmup: int = 2, batch_size: int = 8,
         max_seq_len: int = 128, mixed_precision: str = "no", rows: int = 4000, vocab_size: int = 8000,
         data_dir: str = "/tmp/chatlm_bench_engines", engines: str = ",".join(ENGINES), table_only: bool = False):
    if table_only:
        return table()
    train_file, tokenizer_dir = data(rows, vocab_size, max_seq_len, data_dir)
    settings = dict(train_file=train_file, validation_file="", tokenizer_dir=tokenizer_dir, model_size=model_size,
                    max_seq_len=max_seq_len, batch_size_per_gpu=batch_size, gradient_accumulation_steps=1,
                    max_steps=warmup + steps + 1, learn_rate=1e-4, warmup_steps=10, logging_steps=10**6,
                    save_steps=10**6, log_with="none", mixed_precision=mixed_precision, epochs=1000)
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"{device}; {processes} processes; {model_size} preset, batch {batch_size} per process, max_seq_len "
          f"{max_seq_len}, precision {mixed_precision}, {steps} timed steps after {warmup}")
    print("| engine | peak RSS per process (GB) | RSS at the last step (GB) | peak GPU memory per process (GB) "
          "| s per step |")
    print("| --- | --- | --- | --- | ---: |")
    for engine in engines.split(","):
        results = measure(engine, processes, settings, warmup)
        rss = " / ".join(f"{r['rss_gb']:.2f}" for r in results)
        now = " / ".join(f"{r['rss_now_gb']:.2f}" for r in results)
        gpu = " / ".join(f"{r['gpu_gb']:.2f}" for r in results) if results[0]["gpu_gb"] is not None else "-"
        step = max(r["step_seconds"] for r in results)
        print(f"| {engine} | {rss} | {now} | {gpu} | {step:.3f} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        fire.Fire(worker, command=sys.argv[2:])
    elif "--table" in sys.argv:
        table()
    else:
        fire.Fire(main)
