"""Plain-text logging to the console and output_dir/train.log, kept clear of the progress bar."""
import logging
import os
import resource
import sys

import psutil
import torch
from tqdm.auto import tqdm


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


def get_logger(output_dir: str | None = None, main_process: bool = True) -> logging.Logger:
    """The chatlm logger: INFO on the main process (console and train.log), warnings elsewhere."""
    quiet_libraries()
    logger = logging.getLogger("chatlm")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = _TqdmHandler()
    console.setFormatter(fmt)
    logger.addHandler(console)
    if output_dir and main_process:
        os.makedirs(output_dir, exist_ok=True)
        file = logging.FileHandler(os.path.join(output_dir, "train.log"), encoding="utf-8")
        file.setFormatter(fmt)
        logger.addHandler(file)
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
