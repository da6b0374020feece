"""Plain-text logging to the console and output_dir/train.log, kept clear of the progress bar."""
import json
import logging
import os
import resource
import sys
import time

import psutil
import torch
from tqdm.auto import tqdm

from utils.files import atomic_write


class _TqdmHandler(logging.StreamHandler):
    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stdout)


def quiet_libraries() -> None:
    """Keep library chatter out of the training log."""
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards", "Loading weights"
    # T5 ties its embedding to the output head; Accelerate warns about it on every save.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)


class _Format(logging.Formatter):
    """Time, then the message; a warning's message starts with `warning: ` (an error's is a line
    of its own, `error: ...`, printed by the CLI)."""

    def formatMessage(self, record):
        record.prefix = "warning: " if record.levelno >= logging.WARNING else ""
        return super().formatMessage(record)


class _Held(logging.Handler):
    """Holds records until train.log can be opened (the output dir is checked first)."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def get_logger(output_dir: str | None = None, main_process: bool = True) -> logging.Logger:
    """The chatlm logger: INFO on the main process (console and train.log), warnings elsewhere.

    Without `output_dir` the records are also held, and written to train.log by the next call
    that gives one.
    """
    quiet_libraries()
    logger = logging.getLogger("chatlm")
    held = [r for h in logger.handlers if isinstance(h, _Held) for r in h.records]
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    fmt = _Format("%(asctime)s %(prefix)s%(message)s", "%Y-%m-%d %H:%M:%S")
    console = _TqdmHandler()
    console.setFormatter(fmt)
    logger.addHandler(console)
    if output_dir and main_process:
        os.makedirs(output_dir, exist_ok=True)
        file = logging.FileHandler(os.path.join(output_dir, "train.log"), encoding="utf-8")
        file.setFormatter(fmt)
        for record in held:
            file.handle(record)
        logger.addHandler(file)
    elif main_process:
        logger.addHandler(_Held())
    return logger


def peak_rss_gb() -> float:
    """Peak resident memory of this process, in GB.

    Linux keeps ru_maxrss across exec, so a process started from a large parent would report
    the parent's peak; VmHWM belongs to this process's own address space.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def memory_usage() -> dict:
    """RSS of this process now and at its peak, and GPU memory where there is one, in GB."""
    stats = {"rss_gb": psutil.Process().memory_info().rss / 2**30, "peak_rss_gb": peak_rss_gb()}
    if torch.cuda.is_available():
        stats["gpu_gb"] = torch.cuda.memory_allocated() / 2**30
        stats["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return stats


# How the console line shows a metric: its short name and format. Others: name after the slash, 4 digits.
CONSOLE_FORMAT = {
    "train/loss": ("loss", "{:.4f}"), "train/lr": ("lr", "{:.3e}"), "train/tokens_per_s": ("tokens/s", "{:,.0f}"),
    "train/samples_per_s": (None, None), "train/grad_norm": ("grad_norm", "{:.3f}"),
    "data/empty_rows_skipped": ("empty_rows_skipped", "{}"), "eval/perplexity": ("perplexity", "{:.2f}"),
    "data/histories_truncated": ("histories_truncated", "{}"),
}


class MetricsLog:
    """One dict per log step feeds the console line, the trackers (TensorBoard) and
    `output_dir/metrics.jsonl` (one JSON object per line: step, epoch, time, every metric)."""

    def __init__(self, output_dir: str | None, logger: logging.Logger, accelerator=None):
        self.path = os.path.join(output_dir, "metrics.jsonl") if output_dir else None
        self.logger, self.accelerator = logger, accelerator

    def start(self, resumed_step: int | None) -> None:
        """A new run starts a new file; a resumed one keeps the records up to the step it resumes
        from (those after it were logged by steps the resume makes again)."""
        if not self.path or not os.path.isfile(self.path):
            return
        if resumed_step is None:
            os.remove(self.path)
            return
        with open(self.path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= resumed_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by a kill
        if len(kept) != len(lines):
            with atomic_write(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)

    def log(self, metrics: dict, step: int, epoch: int, total_steps: int | None = None, prefix: str | None = None,
            meta: dict | None = None):
        """`meta`: more fields for metrics.jsonl only (not numbers for the trackers or the console)."""
        head = prefix or f"epoch {epoch} step {step}/{total_steps}"
        self.logger.info(" ".join([head] + [format_metric(k, v) for k, v in metrics.items() if
                                            CONSOLE_FORMAT.get(k, ("",))[0] is not None]))
        if self.accelerator is not None:
            self.accelerator.log(metrics, step=step)
        if self.path:
            record = {"step": step, "epoch": epoch, "time": round(time.time(), 3), **metrics, **(meta or {})}
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def format_metric(key: str, value) -> str:
    name, fmt = CONSOLE_FORMAT.get(key, (key.split("/", 1)[-1], "{:.4f}" if isinstance(value, float) else "{}"))
    return f"{name} {fmt.format(value)}"


def read_metrics(output_dir: str) -> list[dict]:
    """The records of output_dir/metrics.jsonl, in order."""
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
