"""Run bookkeeping: where training stands, the run's sums and clocks, and every call that all
processes make together.

The rule: a method of `Run` that says "collective" must be called by every process, at the same
point of the run, with the same arguments' shapes, or DDP and the gloo groups hang. Nothing
outside this module calls torch.distributed or Accelerate's gather, reduce, broadcast or
wait_for_everyone; a caller that needs one asks `Run`. The one other place is the engine
(model/engine.py): a sharded model gathers its weights in every forward, as DDP all-reduces in
backward, and the engine's methods that gather or scatter the whole state say "Collective" too. Work only the main process does (writing
best/, summary.json) goes through `Run.on_main`, which every process calls: the main process
runs it and every process gets its result or its error.
"""
import dataclasses
import gc
import signal
import time
import typing

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object

from utils.cli import coerce
from utils.errors import QuietUserError, UserError


@dataclasses.dataclass
class TrainingProgress:
    """Where training stands; saved with every train state (as JSON) and restored on resume."""
    epoch: int = 0
    step: int = 0  # optimizer steps
    micro_step: int = 0  # batches consumed
    samples: int = 0
    tokens: int = 0  # non-pad tokens, prompts and responses, all processes
    rows_skipped: int = 0  # empty prompt/response rows dropped by the data stream
    histories_truncated: int = 0  # conversation histories whose oldest turns were dropped to fit max_seq_len
    skipped_updates: int = 0  # optimizer steps not applied: their gradient norm was not finite
    best_score: float | None = None  # best_metric of best/
    best_metric: str | None = None  # the metric best_score is of (None in states saved before it was kept)
    best_step: int = -1
    last_eval_step: int = -1
    rows_per_source: list[int] | None = None  # rows trained on from each weighted source
    evals_without_improvement: int = 0  # early stopping's count
    early_stopped: bool = False
    steps_without_signal: int = 0  # GRPO: optimizer steps in a row whose groups all had equal rewards
    regression_passed: list[str] | None = None  # regression prompts that passed at the last evaluation
    wall_seconds: float = 0.0  # time spent in train(), over every run of it

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, tp in typing.get_type_hints(TrainingProgress).items():
            if key in state:
                setattr(self, key, coerce(key, state[key], tp))


class StopRequest:
    """Ctrl+C or SIGTERM: finish the optimizer step (or the save under way), save, exit. No questions."""

    def __init__(self, logger):
        self.signum, self.logger = None, logger
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, _frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C stops at once; saved states stay intact
        self.signum = signum
        self.logger.warning(f"{signal.Signals(signum).name}: saving the train state after this step, then exiting")

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Meters:
    """The run's sums since the last log line, in one place.

    Each process adds its batches' counts and the objective's metrics here; `Run.flush` sums every
    process's share in one collective (metrics stay on the device, so the loop never waits for
    them). The metric names are fixed by the objective, so every process sends the same vector.
    """

    def __init__(self, device, names: tuple, sources: int = 1):
        self.device, self.names, self.sources = device, tuple(names), sources
        self.reset()

    def reset(self):
        self.local_values = torch.zeros(len(self.names), device=self.device)
        # batches with a loss, tokens, rows, empty rows skipped, histories truncated, then rows of each source
        self.local = np.zeros(5 + self.sources, dtype=np.float64)
        self.values = np.zeros(len(self.names))  # after flushes, all processes
        # tokens, rows, empty rows skipped, histories truncated, rows per source; all processes
        self.counts = np.zeros(4 + self.sources)
        self.batches = 0.0
        self.started = time.perf_counter()

    def add_batch(self, tokens: int, rows: int, skipped: int, source: int = 0, truncated: int = 0):
        self.local[1:5] += (tokens, rows, skipped, truncated)
        self.local[5 + source] += rows

    def add(self, values: dict):
        self.local_values += torch.stack([values[n].float() for n in self.names])
        self.local[0] += 1

    def means(self) -> dict:
        """Each metric's mean over the batches since the last reset."""
        return {k: float(v) / max(1.0, self.batches) for k, v in zip(self.names, self.values)}


class Run:
    """One training run's processes, progress and clocks (see the module docstring for the rule)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.progress = TrainingProgress()
        # Stop flags travel on a CPU group, so the check never waits on the GPU queue.
        self.flag_group = torch.distributed.new_group(backend="gloo") if accelerator.num_processes > 1 else None
        self.started = self.wall_before = None  # perf_counter at train(); wall seconds of earlier runs

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def start_clock(self) -> None:
        self.started, self.wall_before = time.perf_counter(), self.progress.wall_seconds

    def wall_seconds(self) -> float:
        """Seconds in train() over this run and every run it resumed from."""
        return self.wall_before + time.perf_counter() - self.started

    # ---- collectives ---------------------------------------------------------------------
    def agree(self, *flags) -> list[int]:
        """Collective: each flag (or count) summed over all processes."""
        if self.flag_group is None:
            return [int(f) for f in flags]
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        torch.distributed.all_reduce(t, group=self.flag_group)
        return t.tolist()

    def on_main(self, fn, *args):
        """Collective: run `fn` on the main process only and hand its result, or its UserError,
        to every process."""
        if self.accelerator.num_processes == 1:
            return fn(*args)
        box = [None, None]
        if self.is_main:
            try:
                box[0] = fn(*args)
            except UserError as err:
                box[1] = str(err)
        box = broadcast_object_list(box)
        if box[1] is not None:
            raise (UserError if self.is_main else QuietUserError)(box[1])
        return box[0]

    def fail_together(self, error: BaseException | None, message, cleanup=None, where: str | None = None) -> None:
        """Collective: if `error` happened on any process, every process raises one line,
        `message(reason)`, after the main process ran `cleanup`; `where`: the path it concerns."""
        from utils.files import describe_error
        if not self.agree(error is not None)[0]:
            return
        reason = describe_error(error, where) if error is not None else "it failed on another process"
        if self.is_main and cleanup is not None:
            cleanup()
        raise (UserError if error is not None or self.is_main else QuietUserError)(message(reason))

    def raise_together(self, error: UserError | None) -> None:
        """Collective: if any process has a UserError, every process raises: the main process the
        first one in process order (its one line), the others quietly."""
        if self.accelerator.num_processes == 1:
            if error is not None:
                raise error
            return
        if not self.agree(error is not None)[0]:
            return
        message = next(m for m in self.gather(None if error is None else str(error)) if m is not None)
        raise (UserError if self.is_main else QuietUserError)(message)

    def gather(self, obj) -> list:
        """Collective: every process's `obj`, in process order (JSON-like values)."""
        return gather_object([obj])

    def wait(self) -> None:
        """Collective: a barrier."""
        self.accelerator.wait_for_everyone()

    def close(self) -> None:
        """Collective: the run's last call. A barrier waits (without the GIL) until every earlier
        collective's work is done and released: gloo's threads free a broadcast's tensors under
        the GIL, and a process group torn down meanwhile, with the GIL held, would wait on them
        for ever."""
        if self.accelerator.num_processes > 1:
            torch.distributed.barrier()
            torch.distributed.barrier(group=self.flag_group)
            # gloo runs its collectives on two threads: the last collective's tensors may still be
            # freed by one of them (which needs the GIL) after the barrier returned on the other.
            # Freeing what Python holds and sleeping lets it finish before Accelerate destroys the
            # groups, which waits for those threads with the GIL held.
            gc.collect()
            time.sleep(0.2)

    def main_first(self):
        """Collective: a context in which the main process runs first, the others after it."""
        return self.accelerator.main_process_first()

    def gather_rows(self, rows: dict, sequences: torch.Tensor, index: torch.Tensor):
        """Collective: an evaluation batch's per-row sums, generated sequences (padded to one
        length across processes) and row indices from every process, without the duplicates
        an uneven last batch adds."""
        acc = self.accelerator
        sequences = acc.pad_across_processes(sequences, dim=1, pad_index=0)
        return acc.gather_for_metrics((rows, sequences, index))

    def flush(self, meters: Meters) -> None:
        """Collective: add every process's meters to the totals and to progress."""
        dtype = torch.float32 if meters.device.type == "mps" else torch.float64  # counts stay exact in float64
        local = torch.cat([meters.local_values.to(dtype), torch.tensor(meters.local, device=meters.device,
                                                                        dtype=dtype)])
        summed = self.accelerator.reduce(local, reduction="sum").cpu().numpy()
        n = len(meters.names)
        meters.values += summed[:n]
        meters.batches += summed[n]
        meters.counts += summed[n + 1:]
        meters.local_values.zero_()
        meters.local[:] = 0
        tokens, rows, skipped, truncated, *per_source = summed[n + 1:]
        progress = self.progress
        progress.tokens += int(tokens)
        progress.samples += int(rows)
        progress.rows_skipped += int(skipped)
        progress.histories_truncated += int(truncated)
        if len(per_source) > 1:
            old = progress.rows_per_source or [0] * len(per_source)
            progress.rows_per_source = [a + int(b) for a, b in zip(old, per_source)]


def resolve_mixed_precision(value: str) -> str:
    if value != "auto":
        return value
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def get_accelerator(cfg):
    """Accelerate for the run's devices, precision, accumulation, compilation and trackers."""
    import os

    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, TorchDynamoPlugin
    accelerator = Accelerator(
        # Several processes on a machine without a GPU (`accelerate launch --multi_gpu` or
        # torchrun there): Accelerate needs cpu=True to join them over gloo instead of
        # running each as a separate single-process job.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False),
        log_with=None if cfg.log_with == "none" else cfg.log_with,
        # prepare() compiles the model; the padded lengths are rounded (pad_to_multiple_of) so
        # a run compiles a handful of shapes.
        dynamo_plugin=TorchDynamoPlugin(backend=cfg.torch_compile_backend.upper()) if cfg.torch_compile else None,
        project_dir=cfg.output_dir)
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what stays fp32 under bf16 autocast, or all without it
        torch.backends.cudnn.allow_tf32 = True
    return accelerator
