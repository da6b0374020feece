"""chatlm against HF's Seq2SeqTrainer, and the floor no loader can beat, on one CPU.

    python bench/bench_peers.py                    # tiny preset, real sample data, batch 16, fp32
    python bench/bench_peers.py --steps=400 --max_tokens_per_batch=0
    python bench/bench_peers.py --sections=micro       # the micro model, eager and compiled

Three runs of the same tiny model (same tokenizer, seed, fused AdamW, lr, batch 16 rows, fp32) on the
real sample data (../shared/data/chatlm_sample/my_train_dataset_3k.parquet), taking turns in one
process (below; the memory section runs each in its own process, so none inherits another's
allocator):

- chatlm: `ChatTrainer` itself (the real loop: streaming, length-grouped windows, accumulation 1);
- hf: transformers' `Seq2SeqTrainer` with `train_sampling_strategy="group_by_length"` (its best
  setting; `group_by_length=True` before transformers 5) and `DataCollatorForSeq2Seq`, the
  rows tokenized ahead (which only helps it), training transformers' own
  `T5ForConditionalGeneration` as its users do (the same weights; transformers' default attention,
  sdpa, or `--hf_attn_implementation`), with its default optimizer
  (`adamw_torch_fused` since torch 2.8: before commit b0d6e5a this bench gave it the slower
  per-tensor `adamw_torch`, which flattered chatlm's ratios);
- floor: chatlm's model (which, given labels, builds no key/value cache; chatlm's attention) alone: its forward,
  backward and optimizer step on batches with no padding at all: the rows sorted by length and
  each batch's rows cut to its shortest, built in memory before the clock starts. No loader can
  be faster per computed token.

The machine's speed drifts by tens of percent, within seconds (a micro-model run's own steps went
from 8 to 13 ms and back) as over minutes, so the throughput and micro sections run the three in
lockstep in one process (Baton: chatlm's step, HF's, the floor's, chatlm's, ...): a slow spell
falls on all three alike. Their ratios are medians of ratios over the same turns (step by step
for the micro model's times; windows of WINDOW turns for token rates, as batches differ in
size). `--repeats=R` makes R such rounds, each its own process, and prints the medians and every
round. In separate processes, as before, the micro ratio chatlm / hf moved from 0.75x to 0.96x
between runs an hour apart, and the fp32 throughput ratio from 2.03x (commit 669a83a) to 1.78x
(28f228c).

The update section times the optimizer update alone on the micro and the tiny model's
gradients: scaling and clipping them in passes of their own, then fused AdamW, against fused
AdamW dividing each by the one factor as it reads it (`grad_scale`), as the loop does.

The ops section counts, for each of the three, the ATen operators dispatched and the host reads
of tensor values per optimizer step (OpCount): exact, where the times drift.

`--torch_compile=True` compiles each of the three (chatlm's --torch_compile, HF's
`torch_compile=True`, torch.compile on the floor's model); the micro section runs both ways.

Printed per run: non-pad tokens per second (prompt and response tokens, [EOS] included), as the
median over windows of 10 steps after `warmup` steps, and the ratios. Needs transformers'
Trainer only (no `datasets`); HF is a bench-only peer, not a dependency of chatlm.
"""
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from config import T5ModelConfig  # noqa: E402
SAMPLE = os.path.join(ROOT, "..", "shared", "data", "chatlm_sample", "my_train_dataset_3k.parquet")
WINDOW = 10  # steps per rate sample
OPS_STEPS = (40, 50)  # the optimizer steps whose operators are counted (a log step's among them)
# The micro model: so small that its arithmetic is negligible and a step's time is the loop's own.
MICRO = T5ModelConfig(d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=1, num_decoder_layers=1, dropout_rate=0.0)


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


class OpCount(TorchDispatchMode):
    """The ATen operators a run dispatches (forward, backward, optimizer, and the loop's own:
    collation, metrics, clipping) over optimizer steps OPS_STEPS: each is at least one kernel
    launch on a GPU, where a model this small waits on the host that launches them, so their count
    per step is the GPU's step time the CPU can show without its noise. `_local_scalar_dense` is
    a read of a tensor's value on the host (`.item()`, `bool(t)`, ...): a sync on a GPU."""

    def __init__(self):
        super().__init__()
        self.ops, self.host_reads, self.step, self.on = 0, 0, 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.host_reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))

    def step_begins(self):
        if self.step == OPS_STEPS[0] and not self.on:
            self.__enter__()
            self.on = True

    def step_ends(self):
        self.step += 1
        if self.on and self.step == OPS_STEPS[1]:
            self.__exit__(None, None, None)
            self.on = False

    def figures(self) -> dict:
        steps = OPS_STEPS[1] - OPS_STEPS[0]
        return {"ops_per_step": self.ops / steps, "host_reads_per_step": self.host_reads / steps}


class Baton:
    """Runs that take turns a step at a time, each in its own thread of one process: a run's step
    is timed from when it gets the turn to the end of its step, then it hands the turn on and waits.
    The machine's speed drifts in phases of a second or more (a run's own steps went from 8 to 13 ms
    and back), far shorter than a process's start-up, so runs in separate processes never share a
    phase; runs in lockstep share every one. Only the turn's holder runs (the others wait on an
    event, off the GIL)."""

    def __init__(self, names: list[str]):
        self.names, self.turn = list(names), {n: threading.Event() for n in names}
        self.done, self.began = set(), {}
        self.steps, self.tokens = {n: [] for n in names}, {n: [] for n in names}

    def take(self, name: str):
        self.turn[name].wait()
        self.turn[name].clear()
        self.began[name] = time.perf_counter()

    def step_ended(self, name: str, tokens: int):
        self.steps[name].append(time.perf_counter() - self.began[name])
        self.tokens[name].append(tokens)
        self.pass_on(name)
        self.take(name)

    def pass_on(self, name: str):
        i = self.names.index(name)
        for other in self.names[i + 1:] + self.names[:i + 1]:
            if other not in self.done:
                self.turn[other].set()
                return

    def finish(self, name: str):
        self.done.add(name)
        self.pass_on(name)


class Clock:
    """A ChatTrainer hook: when each optimizer step ended; with `ops`, counts the operators; with
    `baton`, hands the turn on."""

    def __init__(self, ops: OpCount | None = None, baton: Baton | None = None):
        self.times, self.ops, self.baton, self.tokens = [], ops, baton, 0

    def on_batch(self, trainer, batch):
        self.tokens = batch["counts"][0]  # non-pad prompt and target tokens, counted where it was made
        if self.ops:
            self.ops.step_begins()

    def on_step_end(self, trainer):
        self.times.append(time.perf_counter())
        if self.ops:
            self.ops.step_ends()
        if self.baton:
            self.baton.step_ended("chatlm", self.tokens)


def model_dir(args: dict, tokenizer) -> str:
    """A fresh model of the run's shape saved where chatlm's --init_from reads it (the micro and
    the memory runs set their own d_model, layers or vocabulary; HF and the floor build the same)."""
    path = os.path.join(tempfile.mkdtemp(), "model")
    new_model(args, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def new_model(args: dict, tokenizer, stock: bool = False):
    """The run's model, initialised from the seed; `stock`: as transformers' own
    T5ForConditionalGeneration (what a Seq2SeqTrainer user trains), the same weights."""
    from transformers import T5ForConditionalGeneration

    from config import T5ModelConfig
    from model.chat_model import ATTENTION_KERNELS, TextToTextModel, get_t5_config
    torch.manual_seed(args["seed"])
    shape = MICRO if args["model_size"] == "micro" else T5ModelConfig.preset(args["model_size"])
    model = TextToTextModel(get_t5_config(shape, max(len(tokenizer), args["model_vocab"])))
    if stock:  # the same seed initialises the two classes differently: the weights are copied
        weights, model = model.state_dict(), T5ForConditionalGeneration(model.config)
        model.load_state_dict(weights)
    # The blocks' copies of the config too. HF's run gets what transformers gives its users (sdpa).
    model.set_attn_implementation(ATTENTION_KERNELS[args["hf_attn_implementation" if stock else "attn_implementation"]])
    return model


def peak_rss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_chatlm(args: dict, baton: Baton | None = None) -> dict:
    from config import load_config
    from model.trainer import ChatTrainer
    from utils.logging import read_metrics
    from utils.tokenizer import load_tokenizer
    ops = OpCount() if args["count_ops"] else None
    clock = Clock(ops, baton)
    with tempfile.TemporaryDirectory() as out:
        shaped = args["model_size"] == "micro" or args["model_vocab"]
        start = dict(init_from=model_dir(args, load_tokenizer(args["tokenizer_dir"]))) if shaped else \
            dict(model_size=args["model_size"])
        cfg = load_config(train_file=args["train_file"], validation_file="", tokenizer_dir=args["tokenizer_dir"],
                          max_seq_len=args["max_seq_len"], batch_size_per_gpu=args["batch_size"],
                          gradient_accumulation_steps=1, max_steps=args["steps"], logging_steps=WINDOW,
                          learn_rate=args["lr"], warmup_steps=0, mixed_precision=args["precision"], log_with="none",
                          output_dir=out, train_state_dir=f"{out}/state", seed=args["seed"], save_steps=10**9,
                          epochs=100, max_tokens_per_batch=args["max_tokens_per_batch"],
                          pad_to_multiple_of=args["pad_to_multiple_of"], attn_implementation=args["attn_implementation"],
                          loss_chunk_tokens=args["loss_chunk_tokens"], trainable=args["trainable"],
                          torch_compile=args["torch_compile"], **start)
        ChatTrainer(cfg, hooks=[clock]).train()
        records = [r for r in read_metrics(out) if "train/tokens_per_s" in r]
    return {"tokens_per_s": float(np.median([r["train/tokens_per_s"] for r in records if r["step"] > args["warmup"]])),
            "step_ms": step_ms(clock.times, args["warmup"]), "peak_rss_mib": peak_rss_mib(),
            **(ops.figures() if ops else {})}


def step_ms(times: list[float], warmup: int) -> float:
    """Median milliseconds per step over windows of WINDOW steps after `warmup`."""
    windows = [(times[s + WINDOW] - times[s]) / WINDOW for s in range(warmup, len(times) - WINDOW, WINDOW)]
    return 1000 * float(np.median(windows))


def run_hf(args: dict, baton: Baton | None = None) -> dict:
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    from utils.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(args["tokenizer_dir"])
    src, tgt = rows(args["train_file"], tokenizer, args["max_seq_len"])
    dataset = [{"input_ids": s, "labels": t} for s, t in zip(src, tgt)]
    model = new_model(args, tokenizer, stock=True)
    collator = DataCollatorForSeq2Seq(tokenizer, model=None, padding=True)
    tokens, times = [], []
    ops = OpCount() if args["count_ops"] else None

    def collate(features):
        batch = collator(features)
        tokens.append(int(batch["attention_mask"].sum()) + int((batch["labels"] >= 0).sum()))
        return batch

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if ops:
                ops.step_begins()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter())
            if ops:
                ops.step_ends()
            if baton:
                baton.step_ended("hf", tokens[-1])

    with tempfile.TemporaryDirectory() as out:
        training_args = Seq2SeqTrainingArguments(
            output_dir=out, per_device_train_batch_size=args["batch_size"], max_steps=args["steps"],
            learning_rate=args["lr"], lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch_fused",
            weight_decay=0.01, train_sampling_strategy="group_by_length", report_to="none", save_strategy="no",
            logging_strategy="no", dataloader_num_workers=0, seed=args["seed"], use_cpu=True,
            bf16=args["precision"] == "bf16", disable_tqdm=True, remove_unused_columns=False,
            torch_compile=args["torch_compile"])
        trainer = Seq2SeqTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate,
                                 callbacks=[Clock()])
        trainer.train()
    return {"tokens_per_s": window_rates(times, tokens, args["warmup"]), "step_ms": step_ms(times, args["warmup"]),
            "peak_rss_mib": peak_rss_mib(), **(ops.figures() if ops else {})}


def run_floor(args: dict, baton: Baton | None = None) -> dict:
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
    model = new_model(args, tokenizer).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args["lr"], weight_decay=0.01, fused=True)
    forward = torch.compile(model) if args["torch_compile"] else model
    tokens, times = [], []
    ops = OpCount() if args["count_ops"] else None
    for step in range(args["steps"]):
        if ops:
            ops.step_begins()
        batch = batches[step % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args["precision"] == "bf16"):
            loss = forward(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens.append(batch["input_ids"].numel() + batch["labels"].numel())
        times.append(time.perf_counter())
        if ops:
            ops.step_ends()
        if baton:
            baton.step_ended("floor", tokens[-1])
    return {"tokens_per_s": window_rates(times, tokens, args["warmup"]), "step_ms": step_ms(times, args["warmup"]),
            "peak_rss_mib": peak_rss_mib(), **(ops.figures() if ops else {})}


def run_syncs(args: dict) -> dict:
    """Host reads of tensors per optimizer step of each objective (utils/syncs.py), on quiet steps
    (neither log, evaluation nor save) and on log steps; GRPO's sampling steps apart."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from config import load_config
    from model.trainer import ChatTrainer
    from utils.syncs import HostSyncs

    class PerStep:
        def __init__(self, syncs):
            self.syncs, self.steps = syncs, {}

        def on_batch(self, trainer, batch):
            if not self.steps and trainer.progress.step == 0:
                self.syncs.take()

        def on_step_end(self, trainer):
            self.steps[trainer.progress.step] = self.syncs.take()

    out = tempfile.mkdtemp()
    common = dict(validation_file="", tokenizer_dir=args["tokenizer_dir"], model_size="tiny", max_seq_len=64,
                  gradient_accumulation_steps=1,
                  batch_size_per_gpu=8, max_steps=20, logging_steps=WINDOW, learn_rate=1e-3, warmup_steps=0,
                  log_with="none", save_steps=10**9, seed=args["seed"], mixed_precision="no")
    table = pq.read_table(args["train_file"], columns=["prompt", "response"]).slice(0, 800)
    pairs = os.path.join(out, "pairs.parquet")
    responses = table.column("response").to_pylist()
    pq.write_table(pa.table({"prompt": table.column("prompt"), "chosen": responses,
                             "rejected": [r[::-1] + "。" for r in responses]}), pairs)
    small = os.path.join(out, "rows.parquet")
    pq.write_table(table, small)
    base = os.path.join(out, "seq2seq")
    modes = {"seq2seq": dict(train_file=small),
             "kl_beta": dict(train_file=small, init_from=f"{base}/final", kl_beta=0.1),
             "dpo": dict(train_file=pairs, objective="dpo", init_from=f"{base}/final"),
             "grpo": dict(train_file=small, objective="grpo", init_from=f"{base}/final", reward="lcs_f1",
                          grpo_group_size=4, grpo_max_new_tokens=16, grpo_iterations=2,
                          grpo_max_zero_signal_steps=0)}
    figures = {}
    for mode, flags in modes.items():
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        cfg = load_config(**common, **flags, output_dir=os.path.join(out, mode),
                          train_state_dir=os.path.join(out, mode, "state"))
        syncs = HostSyncs()
        counter = PerStep(syncs)
        with syncs:
            ChatTrainer(cfg, hooks=[counter]).train()
        steps = counter.steps
        log = [n for s, n in steps.items() if s % WINDOW == 0]
        quiet = [n for s, n in steps.items() if s % WINDOW and s != len(steps)]
        if mode == "grpo":  # odd steps sample (generate() reads its stopping criteria), even ones update again
            figures["grpo (sampling steps)"] = float(np.mean([n for s, n in steps.items() if s % 2 and s % WINDOW]))
            quiet = [n for s, n in steps.items() if s % 2 == 0 and s % WINDOW and s != len(steps)]
        figures[mode] = float(np.mean(quiet))
        figures[f"{mode} (log steps)"] = float(np.mean(log))
    return figures


def run_update(args: dict) -> dict:
    """The optimizer update of a step on the model's gradients, timed both ways in turn, 2,000
    times each (median ms): the units' scale and the clipping as passes over the gradients, then
    fused AdamW (the loop before model/policy.py's step_divisor, and still with Adafactor or fp16),
    against the loop's now: the one factor as fused AdamW's `grad_scale`."""
    from model.engine import grad_norm
    from model.policy import NonFiniteSteps, step_divisor
    from utils.tokenizer import load_tokenizer
    torch.set_num_threads(1)
    model = new_model(args, load_tokenizer(args["tokenizer_dir"]))
    params = [p for p in model.parameters() if p.requires_grad]
    adam = torch.optim.AdamW(params, lr=args["lr"], weight_decay=0.01, fused=True)
    checks, scale, max_norm = NonFiniteSteps("cpu", 10), 0.01, 1.0

    def passes():
        torch._foreach_mul_([p.grad for p in params], scale)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        adam.found_inf = checks.record(norm, 0).float()
        adam.step()

    def folded():
        norm = grad_norm(params) * scale
        adam.grad_scale = step_divisor(norm, max_norm, scale)
        adam.found_inf = checks.record(norm, 0).float()
        adam.step()
        del adam.grad_scale

    times = {"passes": [], "folded": []}
    for i in range(2100):
        for name, update in (("passes", passes), ("folded", folded))[::-1 if i % 2 else 1]:
            for p in params:
                p.grad = torch.ones_like(p)
            start = time.perf_counter()
            update()
            adam.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - start)
            checks.norms.clear()
            checks.steps.clear()
    return {name: 1000 * float(np.median(ts[100:])) for name, ts in times.items()}


def run_lockstep(args: dict) -> dict:
    """chatlm, HF and the floor a step each in turn (Baton): {name: median ms of its steps after
    warmup, "chatlm / hf" and "floor / hf": the median of the ratios of steps taken one after the
    other; "tokens_per_s" of each and "chatlm / hf tokens" and "chatlm / floor tokens", the
    medians of the ratios of their rates over the same windows of WINDOW turns}. chatlm runs on
    the main thread, where its signal handlers can be installed. `torch_threads` 1 for the micro
    model: its arithmetic is negligible, and at each hand-off a pool of threads would spin or
    sleep (with two, every run's steps took 30-50% longer, and varied more)."""
    if args["torch_threads"]:
        torch.set_num_threads(args["torch_threads"])
    names = ["chatlm", "hf", "floor"]
    baton, errors = Baton(names), []

    def run(name):
        try:
            baton.take(name)
            RUNS[name](args, baton)
        except BaseException as e:  # reported below; the others must still get their turns
            errors.append(f"{name}: {e!r}")
        finally:
            baton.finish(name)

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in names[1:]]
    for t in threads:
        t.start()
    baton.turn["chatlm"].set()
    run("chatlm")
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    steps = {n: np.array(baton.steps[n][args["warmup"]:args["steps"]]) for n in names}
    cut = len(steps["hf"]) // WINDOW * WINDOW
    rates = {n: np.array(baton.tokens[n][args["warmup"]:args["steps"]][:cut]).reshape(-1, WINDOW).sum(1)
             / steps[n][:cut].reshape(-1, WINDOW).sum(1) for n in names}
    return {**{n: 1000 * float(np.median(v)) for n, v in steps.items()},
            **{f"{n} / hf": float(np.median(v / steps["hf"])) for n, v in steps.items() if n != "hf"},
            **{f"{n} tokens_per_s": float(np.median(r)) for n, r in rates.items()},
            "chatlm / hf tokens": float(np.median(rates["chatlm"] / rates["hf"])),
            "chatlm / floor tokens": float(np.median(rates["chatlm"] / rates["floor"]))}


RUNS = {"chatlm": run_chatlm, "hf": run_hf, "floor": run_floor, "syncs": run_syncs, "lockstep": run_lockstep,
        "update": run_update}


def main(train_file: str = SAMPLE, model_size: str = "tiny", batch_size: int = 16, steps: int = 200,
         warmup: int = 20, max_seq_len: int = 256, vocab_size: int = 8000, lr: float = 1e-4, seed: int = 0,
         tokenizer_dir: str = "/tmp/chatlm_bench_tokenizer", max_tokens_per_batch: int = 0,
         pad_to_multiple_of: int = 1, precision: str = "no", attn_implementation: str = "",
         loss_chunk_tokens: int = -1, model_vocab: int = 0, sections: str | list[str] = "throughput,micro,ops,update,memory,syncs",
         trainable: str = "all", torch_compile: bool = False, repeats: int = 1, only: str = "",
         count_ops: bool = False, torch_threads: int = 0, hf_attn_implementation: str = "sdpa"):
    """Print each section's figures, every pair side by side from one invocation."""
    from config import TrainConfig
    args = dict(train_file=train_file, model_size=model_size, batch_size=batch_size, steps=steps, warmup=warmup,
                max_seq_len=max_seq_len, lr=lr, seed=seed, tokenizer_dir=tokenizer_dir,
                max_tokens_per_batch=max_tokens_per_batch, pad_to_multiple_of=pad_to_multiple_of,
                precision=precision, model_vocab=model_vocab,
                attn_implementation=attn_implementation or TrainConfig.attn_implementation,
                loss_chunk_tokens=loss_chunk_tokens, trainable=trainable, torch_compile=torch_compile,
                count_ops=count_ops, torch_threads=torch_threads, hf_attn_implementation=hf_attn_implementation)
    if only:
        print(json.dumps({only: RUNS[only](args)}))
        return
    if not os.path.isfile(train_file):
        sys.exit(f"{train_file} not found: the real sample data is in ../shared/data/chatlm_sample/")
    tokenizer(train_file, tokenizer_dir, vocab_size)
    print(f"{torch.get_num_threads()} torch threads, data {os.path.basename(train_file)}, "
          f"attention {args['attn_implementation']} (HF's {hf_attn_implementation}), "
          f"loss chunks of {args['loss_chunk_tokens']} tokens")
    wanted = sections.split(",") if isinstance(sections, str) else list(sections)  # fire reads a,b as a list
    if "throughput" in wanted:
        for p in ("no", "bf16"):
            print(f"\n== non-pad tokens/s: {model_size}, batch {batch_size}, {steps} steps ({warmup} not timed), "
                  f"{'fp32' if p == 'no' else p}, the three in lockstep, {repeats} round(s)")
            got = lockstep_rounds({**args, "precision": p}, repeats)
            for name in ("chatlm", "hf", "floor"):
                print(f"{name:8} {got[name + ' tokens_per_s']:10,.0f}")
            print(f"chatlm / hf: {got['chatlm / hf tokens']:.2f}x; chatlm / floor: {got['chatlm / floor tokens']:.2f}x "
                  f"(medians of the ratios over the same windows of {WINDOW} turns)")
    micro_tok = tokenizer_dir.rstrip("/") + "_512"
    # Prompts and answers cut to 32 tokens: the step's arithmetic is then a few ms of T5's own
    # small kernels, and what differs between the runs is the loop around them.
    micro = {**args, "model_size": "micro", "tokenizer_dir": micro_tok, "steps": 300, "warmup": 30,
             "max_seq_len": 32, "torch_threads": 1}
    if "micro" in wanted or "ops" in wanted or "update" in wanted:
        tokenizer(train_file, micro_tok, 512)
    if "micro" in wanted:
        step_times = {}
        for compiled in (False, True):
            how = "each run compiled (inductor; chatlm --torch_compile, HF torch_compile=True)" if compiled \
                else "eager"
            print(f"\n== per-step time, micro model (d_model {MICRO.d_model}, 1+1 layers, vocabulary 512, 32 tokens "
                  f"a text), batch {batch_size}, fp32, {how}, the three in lockstep, {repeats} round(s)")
            got = lockstep_rounds({**micro, "torch_compile": compiled}, repeats, tokens=False)
            for name in ("chatlm", "hf", "floor"):
                print(f"{name:8} {got[name]:6.2f} ms/step" + (f"  ({got[name] - got['floor']:+.2f} ms over the floor)"
                                                             if name != "floor" else "  (the model alone, no loader)"))
            print(f"chatlm / hf: {got['chatlm / hf']:.2f}x, floor / hf: {got['floor / hf']:.2f}x (medians of the "
                  f"step-by-step ratios); the loop's own time, chatlm / hf: "
                  f"{(got['chatlm'] - got['floor']) / max(1e-9, got['hf'] - got['floor']):.2f}x")
            step_times[compiled] = got
        print(f"chatlm compiled / hf eager: {step_times[True]['chatlm'] / step_times[False]['hf']:.2f}x "
              "(medians of separate rounds)")
    if "ops" in wanted:
        print(f"\n== ATen operators and host reads per optimizer step (steps {OPS_STEPS[0]} to {OPS_STEPS[1] - 1}, a log "
              "step among them), eager, fp32: deterministic, unlike the times")
        for shape, run in (("micro", micro), (model_size, args)):
            got = {name: launch(name, {**run, "steps": OPS_STEPS[1] + 5, "warmup": 5, "count_ops": True})
                   for name in ("chatlm", "hf", "floor")}
            print(f"{shape}: " + "; ".join(f"{name} {r['ops_per_step']:,.1f} ops, {r['host_reads_per_step']:.1f} reads"
                                           for name, r in got.items())
                  + f"  (chatlm / hf: {got['chatlm']['ops_per_step'] / got['hf']['ops_per_step']:.2f}x ops)")
    if "update" in wanted:
        print("\n== the optimizer update alone (fused AdamW, clipping at 1.0, one torch thread), ms: passes over the "
              "gradients for the units' scale and the clipping, then the step / the one factor as the step's grad_scale")
        for shape, run in (("micro", micro), (model_size, args)):
            got = launch("update", run)
            print(f"{shape}: {got['passes']:.3f} / {got['folded']:.3f} ({got['folded'] / got['passes']:.2f}x)")
    if "memory" in wanted:
        mem = {**args, "batch_size": 32, "max_seq_len": 256, "model_vocab": 29_298, "steps": 30, "warmup": 5}
        print("\n== peak RSS of a run: tiny preset at vocabulary 29,298, batch 32, max_seq_len 256, 30 steps, fp32")
        chunk = args["loss_chunk_tokens"] or -1
        got = {f"chatlm, loss chunks ({chunk})": launch("chatlm", {**mem, "loss_chunk_tokens": chunk}),
               "chatlm, full logits": launch("chatlm", {**mem, "loss_chunk_tokens": 0}), "hf": launch("hf", mem)}
        for name, r in got.items():
            print(f"{name:28} {r['peak_rss_mib']:8,.0f} MiB   ({r['tokens_per_s']:,.0f} tokens/s)")
    if "syncs" in wanted:
        print("\n== host syncs per optimizer step (reads of tensor values, utils/syncs.py)")
        for name, n in launch("syncs", args)["figures"].items():
            print(f"{name:24} {n:.2f}")


def tokenizer(train_file: str, path: str, vocab_size: int) -> None:
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        from utils.tokenizer import train_tokenizer
        train_tokenizer(train_file, path, vocab_size)


def lockstep_rounds(args: dict, repeats: int, tokens: bool = True) -> dict:
    """`repeats` lockstep runs (run_lockstep, each its own process): the median of each figure,
    the token rates' figures or the step times' (`tokens` False); with repeats > 1 every value is
    printed too."""
    rounds = [launch("lockstep", args) for _ in range(repeats)]
    got = {k: float(np.median([r[k] for r in rounds])) for k in rounds[0] if ("tokens" in k) == tokens}
    if repeats > 1:
        print("  each round: " + "; ".join(f"{k} " + ", ".join(f"{r[k]:,.2f}" for r in rounds) for k in got))
    return got


def launch(name: str, args: dict) -> dict:
    """One run in its own process: no run inherits another's threads or allocator."""
    flags = [f"--{k}={v}" for k, v in args.items()] + [f"--only={name}"]
    proc = subprocess.run([sys.executable, __file__, *flags], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])[name]
    return result if name != "syncs" else {"figures": result}


if __name__ == "__main__":
    from utils.cli import run_cli  # a misspelt flag stops it at once, with one line naming the valid ones
    run_cli(main, "bench_peers.py")
