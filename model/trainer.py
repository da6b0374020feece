"""ChatTrainer: pre-training, finetuning and exact resume on HuggingFace Accelerate.

Order of a run: accelerator -> pre-flight checks -> tokenizer -> data -> model -> optimizer
-> resume -> loop -> finish (last evaluation, train state, final/, test report).
The loop is forward, backward, step, then maybe_log / maybe_evaluate / maybe_save.
"""
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
import typing

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (GradientAccumulationPlugin, TorchDynamoPlugin, broadcast_object_list, gather_object,
                               set_seed)
from safetensors import SafetensorError
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import T5Config
from transformers.optimization import Adafactor

import model.checkpoint as ckpt
from config import T5ModelConfig, TrainConfig
from model.chat_model import TextToTextModel, disable_dropout, get_generation_config, get_t5_config
from model.dataset import (EvalSet, TrainStream, describe, epoch_batches, get_eval_loader, get_pieces, get_sources,
                           get_train_loader, has_usable_row, prefetch, text_columns)
from model.evaluation import LOWER_IS_BETTER, evaluate, is_better, score_file
from model.objectives import Reference, Seq2Seq, get_objective
from model.regression import load_checks, run_checks
from utils.cli import coerce
from utils.errors import QuietUserError, UserError
from utils.files import atomic_dir, atomic_write, check_data_file, describe_error, free_bytes, probe_writable
from utils.logging import MetricsLog, get_logger, memory_usage, read_metrics
from utils.plots import plot_training
from utils.tokenizer import load_tokenizer, train_tokenizer

# Settings that decide which rows form which batch: a resume must keep them.
DATA_ORDER_KEYS = ("batch_size_per_gpu", "dataloader_buffer_size", "seed", "max_seq_len", "group_by_length",
                   "num_shards", "validation_split", "mix_strategy", "weights")
# What a state saved before a key existed had, in effect.
DATA_ORDER_DEFAULTS = {"validation_split": 0.0, "mix_strategy": "first_exhausted", "weights": None}
MODEL_SHAPE_KEYS = ("d_model", "d_ff", "num_heads", "d_kv", "num_layers", "num_decoder_layers", "vocab_size")


@dataclasses.dataclass
class TrainingProgress:
    """Where training stands; saved with every train state (as JSON) and restored on resume."""
    epoch: int = 0
    step: int = 0  # optimizer steps
    micro_step: int = 0  # batches consumed
    samples: int = 0
    tokens: int = 0  # non-pad tokens, prompts and responses, all processes
    rows_skipped: int = 0  # empty prompt/response rows dropped by the data stream
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


def get_lr_lambda(total_steps: int, warmup_steps: int, div_factor: float):
    """Multiplier of learn_rate at optimizer step s (0-based), as in the original OneCycle:
    linear warmup from 1/div_factor to 1 over warmup_steps, then a cosine back down to
    1/div_factor at total_steps, held there beyond."""
    low = 1.0 / div_factor
    warmup = min(warmup_steps, total_steps // 2)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return low + (1.0 - low) * step / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return lr_lambda


def get_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or Adafactor with a fixed, really applied learning rate.

    Only trainable parameters go in: a finetune's frozen encoder holds no optimizer state.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adafactor":
        # relative_step=False: the original left it True, which ignores lr altogether.
        return Adafactor(params, lr=cfg.learn_rate, relative_step=False, scale_parameter=False,
                         warmup_init=False)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # layer norms
    # fused: one kernel for all parameters on CUDA instead of a loop of small ones
    fused = bool(params) and all(p.device.type == "cuda" for p in params) or None
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learn_rate, fused=fused)


def optimizer_state_bytes(model: torch.nn.Module, optimizer: str) -> int:
    """Bytes of optimizer state for the trainable parameters (fp32): AdamW keeps two copies,
    Adafactor a row and a column vector per matrix."""
    total = 0
    for p in model.parameters():
        if p.requires_grad:
            total += 8 * p.numel() if optimizer == "adamw" else 4 * (sum(p.shape[-2:]) if p.ndim >= 2 else p.numel())
    return total


def resolve_mixed_precision(value: str) -> str:
    if value != "auto":
        return value
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


@functools.lru_cache(maxsize=4)
def weights_hash(path: str) -> str | None:
    """sha256 of the weights a run starts from (None for a new model)."""
    if not path:
        return None
    file = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    return ckpt.sha256(file) if os.path.isfile(file) else None


def vocab_hash(tokenizer) -> str:
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]


def freeze_for_finetune(model: TextToTextModel) -> None:
    """Freeze the shared embedding (tied to the output head) and the whole encoder."""
    model.shared.requires_grad_(False)
    model.encoder.requires_grad_(False)


def check_finetune_source(path: str, tokenizer, tokenizer_dir: str, flag: str = "--init_from") -> str | None:
    """The checkpoint exists, holds weights, and was trained with this tokenizer's vocabulary.

    Returns a warning when there is no tokenizer beside a .safetensors file to compare with."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{path} holds no saved model (config.json missing); "
                            f"point {flag} at a directory written by `train`")
        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            raise UserError(f"{path} has no model.safetensors; point {flag} at a directory "
                            "written by `train` (best/ or final/)")
        source_dir = path
    elif os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise UserError(f"{path} is not a .safetensors file or a model directory; "
                            "give the directory a previous `train` saved (e.g. model_save/best)")
        source_dir = os.path.dirname(path) or "."
    else:
        raise UserError(f"{flag}={path} not found; give a model directory written by `train`")
    has_tokenizer = os.path.isfile(os.path.join(source_dir, "tokenizer.json"))
    if tokenizer is None:
        raise UserError(f"no tokenizer in {tokenizer_dir}: a finetune needs the tokenizer its checkpoint was "
                        f"trained with; pass --tokenizer_dir={source_dir if has_tokenizer else 'DIR'}")
    if not has_tokenizer:
        return (f"no tokenizer next to {path}: it cannot be checked that it was trained with the one in "
                f"{tokenizer_dir} (a model directory written by `train` holds its tokenizer)")
    if load_tokenizer(source_dir).get_vocab() != tokenizer.get_vocab():
        raise UserError(f"{path} was trained with another tokenizer than {tokenizer_dir} (the vocabularies "
                        f"differ); pass --tokenizer_dir={source_dir}")
    return None


def load_start_model(path: str, cfg: TrainConfig, tokenizer) -> TextToTextModel:
    """The model to start from: a saved model directory, or a .safetensors state dict for the
    model_size preset."""
    vocab_size = len(tokenizer)
    if os.path.isdir(path):
        try:
            model = TextToTextModel.from_pretrained(path)
        except (OSError, ValueError, SafetensorError) as err:
            raise UserError(f"cannot load the model in {path} ({describe_error(err)}); "
                            "point --init_from at a directory written by `train`") from None
    else:
        model = TextToTextModel(get_t5_config(T5ModelConfig.preset(cfg.preset), vocab_size))
        try:
            missing, unexpected = model.load_state_dict(load_file(path), strict=False)
        except RuntimeError as err:
            raise UserError(f"{path} does not fit --model_size={cfg.preset} with this tokenizer "
                            f"({str(err).splitlines()[1].strip()}); pick the model_size it was trained with") from None
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read {path} ({describe_error(err)}); give an intact .safetensors file") from None
        missing = [k for k in missing if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                                                   "lm_head.weight")]
        if missing or unexpected:
            raise UserError(f"{path} does not fit --model_size={cfg.preset}: "
                            f"{len(missing)} missing and {len(unexpected)} unexpected tensors")
    if model.config.vocab_size < vocab_size:
        raise UserError(f"checkpoint {path} has {model.config.vocab_size} embeddings but the tokenizer has "
                        f"{vocab_size} tokens; use the tokenizer it was trained with (--tokenizer_dir)")
    return model


def lora_targets(model: torch.nn.Module, names: list[str]) -> list[str]:
    """`lora_target_modules` as names of this model's linear layers. `wi` also means the gated
    feed-forward's `wi_0` and `wi_1` (T5 v1.1, FLAN-T5); a name matching no linear layer is an
    error naming those there are, instead of fewer layers adapted than asked."""
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    targets = []
    for name in names:
        if name in linear:
            targets.append(name)
        elif name == "wi" and {"wi_0", "wi_1"} <= set(linear):
            targets += ["wi_0", "wi_1"]
        else:
            raise UserError(f"--lora_target_modules: {name!r} matches no linear layer of this model; "
                            f"its linear layers are {', '.join(linear)}")
    return list(dict.fromkeys(targets))


def check_settings(state: str, saved: dict, now: dict) -> None:
    """The settings of this run that a resume from `state` cannot change, checked against it."""
    if "model" in now and saved.get("model") != now["model"]:
        raise UserError(f"{state} holds a model of shape {saved.get('model')}, this run builds {now['model']}; "
                        "resume with the --model_size (or --init_from) it was trained with")
    if "vocab" in now and saved.get("vocab") != now["vocab"]:
        raise UserError(f"{state} was trained with another tokenizer than this run's (the vocabularies differ); "
                        "resume with the --tokenizer_dir it was trained with")
    if "init_from" in now and (saved.get("init_from") or {}).get("sha256") != now["init_from"]["sha256"]:
        raise UserError(f"{state} started from {(saved.get('init_from') or {}).get('path') or 'a new model'}, "
                        f"this run from {now['init_from']['path'] or 'a new model'} (other weights); resume with "
                        "the --init_from it started from")
    for key in ("objective", "trainable", "lora", "optimizer"):
        if key in now and saved.get(key) != now[key]:
            raise UserError(f"{state} was saved with --{key}={saved.get(key)}, this run has {now[key]}; "
                            f"resume with --{key}={saved.get(key)}")
    for key in DATA_ORDER_KEYS:
        was = saved.get(key, DATA_ORDER_DEFAULTS.get(key))
        if was != now[key]:
            hint = ("the same number of processes x --num_workers "
                    f"({saved.get('num_processes')} x {saved.get('num_workers')})") if key == "num_shards" \
                else "the same --train_file weights" if key == "weights" else f"--{key}={was}"
            raise UserError(f"{state} was saved with {key}={was}, this run has {now[key]}; "
                            f"an exact resume needs {hint}")
    if "rows_per_row_group" in now and saved.get("rows_per_row_group") != now["rows_per_row_group"]:
        raise UserError(f"the training data differs from the data {state} was trained on (rows per row "
                        "group changed); resume with the same --train_file, or start a new run")


def check_engine_environment() -> None:
    """Engines a launch asks for through the environment that this trainer does not run: refused
    on every device type before Accelerate starts (on a CPU it would silently train DeepSpeed or
    FSDP runs as DDP, or end in an ImportError)."""
    from accelerate.utils import parse_flag_from_env
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        raise UserError("DeepSpeed is not supported: its checkpoints load with pickle (torch.load with "
                        "weights_only=False), which a chatlm train state never does; launch with DDP "
                        "(accelerate launch --config_file configs/accelerate/ddp.yaml)")
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        raise UserError("FSDP is not supported yet: a train state holds the main process's weights and optimizer "
                        "state, which under sharding are only its shard; launch with DDP "
                        "(accelerate launch --config_file configs/accelerate/ddp.yaml)")


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process (one per shape it did not reuse a graph for)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


class NonFiniteLoss(UserError):
    """The loss or the gradient norm stayed non-finite for max_bad_steps steps."""


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

    Each process adds its batches' counts and the objective's metrics here; `flush` sums every
    process's share in one collective (metrics stay on the device, so the loop never waits for
    them). The metric names are fixed by the objective, so every process sends the same vector.
    """

    def __init__(self, device, names: tuple, sources: int = 1):
        self.device, self.names, self.sources = device, tuple(names), sources
        self.reset()

    def reset(self):
        self.local_values = torch.zeros(len(self.names), device=self.device)
        # batches with a loss, tokens, rows, empty rows skipped, then rows of each source
        self.local = np.zeros(4 + self.sources, dtype=np.float64)
        self.values = np.zeros(len(self.names))  # after flushes, all processes
        self.counts = np.zeros(3 + self.sources)  # tokens, rows, empty rows skipped, rows per source; all processes
        self.batches = 0.0
        self.started = time.perf_counter()

    def add_batch(self, tokens: int, rows: int, skipped: int, source: int = 0):
        self.local[1:4] += (tokens, rows, skipped)
        self.local[4 + source] += rows

    def add(self, values: dict):
        self.local_values += torch.stack([values[n].float() for n in self.names])
        self.local[0] += 1

    def flush(self, accelerator) -> np.ndarray:
        """Sum the local shares over all processes; returns (tokens, rows, skipped, rows per source)
        just flushed."""
        dtype = torch.float32 if self.device.type == "mps" else torch.float64  # counts stay exact in float64
        local = torch.cat([self.local_values.to(dtype), torch.tensor(self.local, device=self.device, dtype=dtype)])
        summed = accelerator.reduce(local, reduction="sum").cpu().numpy()
        n = len(self.names)
        self.values += summed[:n]
        self.batches += summed[n]
        self.counts += summed[n + 1:]
        self.local_values.zero_()
        self.local[:] = 0
        return summed[n + 1:]

    def means(self) -> dict:
        """Each metric's mean over the batches since the last reset."""
        return {k: float(v) / max(1.0, self.batches) for k, v in zip(self.names, self.values)}


class Hooks:
    """What tests, benchmarks and users extend a run with, instead of subclassing the loop. Each
    method is called with the trainer; these defaults do nothing. Pass objects with any of them
    as `ChatTrainer(cfg, hooks=[...])`; the loop calls each one's, in order.

    - `on_loss(trainer, batch, loss, values)`: after an objective's loss of a micro-batch, before
      its backward (`batch` on the device, `values` the objective's metrics, on the device too).
    - `on_step_end(trainer)`: after each optimizer step, its log line and any evaluation.
    """

    def on_loss(self, trainer, batch: dict, loss: torch.Tensor, values: dict) -> None:
        pass

    def on_step_end(self, trainer) -> None:
        pass


class ChatTrainer:
    def __init__(self, cfg: TrainConfig, hooks=()):
        self.cfg = cfg
        self.hooks = list(hooks)

    def call_hooks(self, name: str, *args) -> None:
        for hook in self.hooks:
            method = getattr(hook, name, None)
            if method is not None:
                method(self, *args)

    def request_stop(self) -> None:
        """Stop after this optimizer step (and its train state), as SIGTERM would."""
        self.stop.signum = signal.SIGTERM

    def unwrapped(self):
        """The model being trained without its DDP and compile wrappers (its parameters are the
        same tensors): what is saved and loaded, under plain parameter names."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    # ---- build -------------------------------------------------------------------------
    def build(self):
        cfg = self.cfg
        check_engine_environment()
        self.accelerator = Accelerator(
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
        acc = self.accelerator
        if acc.distributed_type.value in ("FSDP", "DEEPSPEED"):
            raise UserError(f"{acc.distributed_type.value} is not supported yet: a train state holds the main "
                            "process's weights and optimizer state, which under sharding are only its shard; "
                            "launch with DDP (accelerate launch --config_file configs/accelerate/ddp.yaml)")
        if acc.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # what stays fp32 under bf16 autocast, or all without it
            torch.backends.cudnn.allow_tf32 = True
        if acc.num_processes > 1:
            # Stop flags travel on a CPU group so the check never waits on the GPU queue.
            self.flag_group = torch.distributed.new_group(backend="gloo")
        self.logger = get_logger(None, acc.is_main_process)  # no file until the output dir is checked
        self.resume_from = self.preflight()
        self.logger = get_logger(cfg.output_dir, acc.is_main_process)
        self.metrics = MetricsLog(cfg.output_dir if acc.is_main_process else None, self.logger, acc)
        if cfg.num_workers:
            # Each worker process tokenizes already; the tokenizer's own thread pool would only
            # compete with training (and it warns after every fork).
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if acc.device.type == "cpu" and cfg.num_workers:
            # DataLoader workers tokenize on the same cores: leave them one each, or the compute
            # threads spin-wait on preempted peers and a step can take many times longer.
            torch.set_num_threads(max(1, torch.get_num_threads() - cfg.num_workers))
        set_seed(cfg.seed)
        if acc.mixed_precision == "fp16":
            self.logger.warning("fp16 overflows in T5's feed-forward layers; prefer --mixed_precision=bf16")
        self.tokenizer = self.get_tokenizer()
        self.objective.tokenizer = self.tokenizer  # an objective that samples decodes with it
        self.model, self.reference = self.get_model()
        self.stream = self.get_stream()
        if cfg.max_tokens_per_batch:
            self.total_steps = self.estimate_budget_steps()
        self.loader = get_train_loader(self.stream, cfg.num_workers, pin_memory=acc.device.type == "cuda")
        eos = [self.tokenizer.eos_token_id]
        self.idle_batch = self.objective.collate({c: [eos] for c in self.objective.columns})
        self.eval_set = self.get_eval_set()
        self.settings = self.state_settings(self.model.config, self.tokenizer, self.stream.pieces)
        self.schedule = get_lr_lambda(self.total_steps, cfg.warmup_steps, cfg.div_factor)
        self.optimizer = get_optimizer(self.model, cfg)
        eval_loader = get_eval_loader(self.eval_set, cfg.batch_size_per_gpu) if self.eval_set else None
        # The training loader is not prepared: each process already reads its own shard, and
        # Accelerate would otherwise read every batch on one process and send slices around.
        # There is no scheduler object: the lr is a function of the step, set before each update,
        # so a resume with another learn_rate or max_steps follows the new schedule at once.
        self.model, self.optimizer, self.eval_loader = acc.prepare(self.model, self.optimizer, eval_loader)
        if self.reference is not None and self.reference.model is not None:
            # The frozen copy runs under the policy's precision (autocast), or at identical
            # weights their log-ratio would not be 0; evaluation_mode: no DDP wrapper (as TRL).
            self.reference.model = acc.prepare_model(self.reference.model, evaluation_mode=True)
        self.progress = TrainingProgress()
        self.meters = Meters(acc.device, self.objective.metric_names, len(self.sources))
        self.bad_steps, self.unconfirmed = 0, []
        # The fixed scale of a micro-batch's weight (see run_epoch): about one micro-batch's units.
        self.unit_scale = float(cfg.batch_size_per_gpu * (32 if isinstance(self.objective, Seq2Seq)
                                                          and self.objective.name == "seq2seq" else 1))
        self.step_units = 0
        self.maybe_resume()
        if acc.is_main_process:
            self.metrics.start(self.progress.step if self.resume_from is not None else None)
        if cfg.log_with != "none":
            acc.init_trackers("chatlm", config={k: str(v) if isinstance(v, list) else v
                                                for k, v in dataclasses.asdict(cfg).items()})

    def preflight(self) -> str | None:
        """Everything that can be checked before any work, so a mistake costs seconds, not hours.

        Input files readable with usable rows and enough for a step; output, state and tokenizer
        directories writable; room for a train state and a model; the tokenizer loads and fits a
        finetune checkpoint; the state to resume from is intact and fits this run. Returns that
        state (None for a fresh run).
        """
        cfg = self.cfg
        self.sources = get_sources(cfg.train_file)
        self.train_files = [f for src in self.sources for f in src.files]
        self.objective = get_objective(cfg)
        for path in self.train_files:
            self.check_rows(path, "train_file")
        text_columns(self.objective, self.train_files)  # what the rewards read is there
        for what in ("validation_file", "test_file"):
            if getattr(cfg, what):
                self.check_rows(getattr(cfg, what), what)
                text_columns(self.objective, [getattr(cfg, what)])  # evaluation's rewards read them too
        self.checks = load_checks(cfg.regression_file) if cfg.regression_file else []
        pieces = get_pieces(self.train_files, self.sources)
        # With a token budget the rows per batch depend on the lengths: until the tokenizer can
        # tell (build), count with one row a batch, which only checks there is a step's worth.
        self.total_steps = self.count_total_steps(pieces, 1 if cfg.max_tokens_per_batch else None)
        has_tokenizer = os.path.isfile(os.path.join(cfg.tokenizer_dir, "tokenizer.json"))
        tokenizer = load_tokenizer(cfg.tokenizer_dir) if has_tokenizer else None
        if cfg.start_from:
            flag = "--init_from" if cfg.init_from else "--finetune_from_ckp_file"
            warning = check_finetune_source(cfg.start_from, tokenizer, cfg.tokenizer_dir, flag)
            if warning:
                self.logger.warning(warning)
            if cfg.model_size and os.path.isdir(cfg.start_from):
                self.warn_overridden_shape()
        if cfg.is_keep_training is True and tokenizer is None:
            raise UserError(f"no tokenizer in {cfg.tokenizer_dir}: a resume needs the tokenizer its state was "
                            "trained with; pass --tokenizer_dir")
        with torch.device("meta"):  # the shape and size of the model, without its memory
            model = self.new_model(len(tokenizer) if tokenizer is not None else cfg.vocab_size)
        settings = self.state_settings(model.config, tokenizer, pieces) if tokenizer is not None else None
        return self.on_main(self.preflight_writes, model, settings)

    def warn_overridden_shape(self) -> None:
        """A model_size given with a checkpoint of another shape: the checkpoint's shape trains,
        and the user is told the flag they typed was not used."""
        cfg = self.cfg

        def shape(c) -> str:
            return (f"d_model {c.d_model}, d_ff {c.d_ff}, {c.num_heads} heads of {c.d_kv}, "
                    f"{c.num_layers}+{c.num_decoder_layers} layers, {c.feed_forward_proj}")
        preset, saved = T5ModelConfig.preset(cfg.model_size), T5Config.from_pretrained(cfg.start_from)
        if shape(preset) != shape(saved):
            self.logger.warning(f"--model_size={cfg.model_size} ({shape(preset)}) is not the shape of {cfg.start_from} "
                                f"({shape(saved)}): training goes on in the checkpoint's shape; drop --model_size")

    def check_rows(self, path: str, what: str) -> None:
        """The file has the objective's columns and a row it trains on (not only empty rows, nor
        DPO pairs whose answers are equal)."""
        check_data_file(path, self.objective.columns, what=what)
        if self.objective.no_usable_row and not has_usable_row(path, self.objective):
            raise UserError(f"--{what} {path} has no usable row: {self.objective.no_usable_row}")

    def preflight_writes(self, model, settings: dict | None) -> str | None:
        cfg = self.cfg
        probe_writable(cfg.output_dir, "output_dir")
        probe_writable(cfg.train_state_dir, "train_state_dir")
        if not os.path.isfile(os.path.join(cfg.tokenizer_dir, "tokenizer.json")):
            probe_writable(cfg.tokenizer_dir, "tokenizer_dir")
        self.check_free_space(model)
        path = None
        if cfg.is_keep_training:
            path = ckpt.find_resumable(cfg.train_state_dir, cfg.trust_pickled_state, self.logger.warning)
            if path is None and cfg.is_keep_training == "auto":
                self.logger.info(f"no train state in {cfg.train_state_dir}: starting a new run (--is_keep_training=auto)")
            elif path is None:
                raise UserError(f"no intact train state in {cfg.train_state_dir} to resume from; run without "
                                "--is_keep_training (or with --is_keep_training=auto) or point --train_state_dir at one")
            elif settings is None:
                raise UserError(f"no tokenizer in {cfg.tokenizer_dir}: a resume needs the tokenizer its state was "
                                "trained with; pass --tokenizer_dir")
        if path is not None:
            if ckpt.is_legacy(path):
                saved = ckpt.load_json(os.path.join(path, "chatlm_state.json"))
                saved["trainable"] = "decoder" if saved.get("is_finetune") else "all"
                keys = DATA_ORDER_KEYS + ("trainable",)
                check_settings(path, {k: saved.get(k, DATA_ORDER_DEFAULTS.get(k)) for k in keys},
                               {k: settings[k] for k in keys})
            else:
                saved = ckpt.load_json(os.path.join(path, ckpt.STATE_JSON))
                check_settings(path, saved.get("settings") or {}, settings)
            return path
        states = ckpt.list_states(cfg.train_state_dir)
        if states and not cfg.overwrite:
            raise UserError(f"{cfg.train_state_dir} already holds train states (latest "
                            f"{os.path.basename(states[-1])}); resume with --is_keep_training=True, "
                            "pass --overwrite=True to start over, or choose another --train_state_dir")
        return None

    def on_main(self, fn, *args):
        """Run `fn` on the main process only and hand its result, or its UserError, to every process."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return fn(*args)
        box = [None, None]
        if acc.is_main_process:
            try:
                box[0] = fn(*args)
            except UserError as err:
                box[1] = str(err)
        box = broadcast_object_list(box)
        if box[1] is not None:
            raise (UserError if acc.is_main_process else QuietUserError)(box[1])
        return box[0]

    def check_free_space(self, model):
        """Room for one more train state and one model directory, from the parameter count."""
        cfg = self.cfg
        weights = 4 * sum(p.numel() for p in model.parameters())
        needs = {"train_state_dir": weights + optimizer_state_bytes(model, cfg.optimizer) + (1 << 20),
                 "output_dir": weights + (1 << 20)}
        by_device = {}
        for what, need in needs.items():
            device, free = free_bytes(getattr(cfg, what))
            entry = by_device.setdefault(device, [0, free, []])
            entry[0] += need
            entry[2].append(what)
        for need, free, whats in by_device.values():
            if free < need:
                where = " and ".join(f"--{w}={getattr(cfg, w)}" for w in whats)
                raise UserError(f"{where}: {free / 1e9:.2f} GB free, but a train state and a model directory "
                                f"need about {need / 1e9:.2f} GB; free some space or save elsewhere")

    def get_tokenizer(self):
        cfg, acc = self.cfg, self.accelerator
        with acc.main_process_first():
            if acc.is_main_process and not os.path.isfile(os.path.join(cfg.tokenizer_dir, "tokenizer.json")):
                self.logger.info(f"no tokenizer in {cfg.tokenizer_dir}: training one "
                                 f"(vocab_size={cfg.vocab_size}) on {', '.join(self.train_files)}")
                train_tokenizer(self.train_files, cfg.tokenizer_dir, cfg.vocab_size,
                                model_max_length=cfg.max_seq_len, seed=cfg.seed)
            return load_tokenizer(cfg.tokenizer_dir)

    def new_model(self, vocab_size: int):
        """The model before any weights are loaded (the checkpoint's shape when starting from
        one), with what trains set: decoder freezes the rest, lora wraps it in peft adapters."""
        cfg = self.cfg
        if os.path.isdir(cfg.start_from):
            config = T5Config.from_pretrained(cfg.start_from)
        else:
            config = get_t5_config(T5ModelConfig.preset(cfg.preset), vocab_size)
        return self.set_trainable(TextToTextModel(config))

    def set_trainable(self, model: TextToTextModel):
        cfg = self.cfg
        if cfg.trains == "decoder":
            freeze_for_finetune(model)
        elif cfg.trains == "lora":
            model = get_peft_model(model, LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="SEQ_2_SEQ_LM",
                target_modules=lora_targets(model, cfg.lora_target_modules)))
        return model

    def get_model(self):
        """The policy to train, and the reference its objective keeps it close to (or None).

        The reference is the adapters-disabled policy under LoRA, else a frozen copy of the
        starting model: in eval mode, without gradients, out of the optimizer and of prepare().
        """
        cfg, acc = self.cfg, self.accelerator
        if cfg.start_from:  # on resume too: the checkpoint gives the shape, the state the weights
            model = load_start_model(cfg.start_from, cfg, self.tokenizer)
            self.logger.info(f"starting from {cfg.start_from}")
        else:
            model = TextToTextModel(get_t5_config(T5ModelConfig.preset(cfg.preset), len(self.tokenizer)))
        model.generation_config = get_generation_config(cfg.max_seq_len)
        if cfg.attn_implementation != "eager":
            model.set_attn_implementation(cfg.attn_implementation)
        frozen = None
        if self.objective.needs_reference and cfg.trains != "lora":
            frozen = copy.deepcopy(model).eval().requires_grad_(False).to(acc.device)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
            if cfg.trains == "lora":
                model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        model = self.set_trainable(model)
        if cfg.dropout_off:
            # Against a reference, or sampled in eval mode and scored in train mode, dropout is
            # noise in the very difference being trained (TRL's disable_dropout, on by default).
            switched = disable_dropout(model)
            if switched:
                self.logger.info(f"dropout off in {switched} modules (--disable_dropout={cfg.disable_dropout})")
        reference = None
        if self.objective.needs_reference:
            reference = Reference(model=frozen) if frozen is not None else \
                Reference(policy=self.unwrapped)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        shape = model.config
        self.logger.info(f"model: d_model {shape.d_model}, {shape.num_layers}+{shape.num_decoder_layers} layers, "
                         f"{total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable ({cfg.trains}), "
                         f"objective {self.objective.name}" + (", with a reference" if reference else ""))
        return model, reference

    def get_eval_set(self) -> EvalSet | None:
        cfg = self.cfg
        if cfg.validation_file:
            return EvalSet(cfg.validation_file, self.tokenizer, cfg.max_seq_len, cfg.max_eval_rows, self.objective)
        if cfg.validation_split:
            eval_set = EvalSet(self.train_files, self.tokenizer, cfg.max_seq_len, cfg.max_eval_rows, self.objective,
                               split=(cfg.seed, cfg.validation_split))
            if not len(eval_set):
                raise UserError(f"--validation_split={cfg.validation_split} holds out no usable row of the training "
                                "data; raise it or give --validation_file")
            self.logger.info(f"validation: {len(eval_set)} rows held out of the training data "
                             f"(--validation_split={cfg.validation_split})")
            return eval_set
        return None

    def get_stream(self) -> TrainStream:
        cfg, acc = self.cfg, self.accelerator
        keep_in_memory = cfg.keep_in_memory and acc.num_processes == 1
        if cfg.keep_in_memory and not keep_in_memory:
            self.logger.info("several processes: streaming the training data instead of holding it in memory")
        self.logger.info(f"training data: {describe(self.train_files)}, "
                         f"{'in memory' if keep_in_memory else 'streamed'}")
        if len(self.sources) > 1:
            self.logger.info("weighted sources (" + cfg.mix_strategy + "): " + "; ".join(
                f"{src.label} = {src.weight:g} x {describe(list(src.files))}" for src in self.sources))
        return TrainStream(self.train_files, self.tokenizer, cfg.batch_size_per_gpu, cfg.max_seq_len,
                           cfg.dataloader_buffer_size, cfg.seed, acc.process_index, acc.num_processes,
                           cfg.num_workers, keep_in_memory, cfg.group_by_length, self.objective,
                           self.sources, cfg.mix_strategy, cfg.validation_split, cfg.max_tokens_per_batch)

    def estimate_budget_steps(self) -> int:
        """Optimizer steps with token-budget batches: the rows a batch holds in the first two
        windows of this process's first shard, applied to every shard's rows. An estimate (the run
        ends when the data does; the schedule holds its floor beyond)."""
        cfg, stream = self.cfg, self.stream
        rows = batches = 0
        shard = stream.rank * stream.workers
        for batch, (window, _) in stream.one_pass(shard, [cfg.seed, 0], None, 0, 0):
            if window >= 2:
                break
            rows, batches = rows + len(batch["row_index"]), batches + 1
        per_batch = max(1, round(rows / max(1, batches)))
        steps = self.count_total_steps(stream.pieces, per_batch)
        self.logger.info(f"token budget {cfg.max_tokens_per_batch}: about {per_batch} rows a batch in the first "
                         f"windows, so about {steps} optimizer steps")
        return steps

    def count_total_steps(self, pieces, rows_per_batch: int | None = None) -> int:
        """Optimizer steps of the whole run, for the schedule and the progress bar.

        Every process steps until the one with the most batches is done; accumulation runs on
        across epoch ends. Exact when no row is empty (empty rows can only make it shorter).
        """
        cfg, processes, workers = self.cfg, self.accelerator.num_processes, max(1, self.cfg.num_workers)

        def per_epoch(epoch):
            return max(epoch_batches(pieces, self.sources, range(rank * workers, (rank + 1) * workers),
                                     processes * workers, cfg.dataloader_buffer_size,
                                     rows_per_batch or cfg.batch_size_per_gpu,
                                     cfg.seed, epoch, cfg.mix_strategy, cfg.validation_split)
                       for rank in range(processes))

        # Every epoch has as many batches, unless the validation split moves rows between windows.
        batches = sum(map(per_epoch, range(cfg.epochs))) if cfg.validation_split else per_epoch(0) * cfg.epochs
        total = batches // cfg.gradient_accumulation_steps * self.objective.updates_per_batch
        if total == 0:
            raise UserError(f"the training data gives {batches} batches in all, fewer than one "
                            f"optimizer step of {cfg.gradient_accumulation_steps}; lower "
                            "--gradient_accumulation_steps or --batch_size_per_gpu, or give more rows")
        return min(total, cfg.max_steps) if cfg.max_steps else total

    # ---- train states ------------------------------------------------------------------
    def state_settings(self, model_config, tokenizer, pieces) -> dict:
        """What a resumed run must share with the run that saved the state."""
        cfg, processes = self.cfg, self.accelerator.num_processes
        lora = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "target_modules": sorted(cfg.lora_target_modules)} \
            if cfg.trains == "lora" else None
        return {"model": {k: getattr(model_config, k) for k in MODEL_SHAPE_KEYS}, "vocab": vocab_hash(tokenizer),
                "objective": cfg.objective, "trainable": cfg.trains, "lora": lora, "optimizer": cfg.optimizer,
                "init_from": {"path": cfg.start_from, "sha256": weights_hash(cfg.start_from)},
                **{k: getattr(cfg, k) for k in DATA_ORDER_KEYS if k not in ("num_shards", "weights")},
                "weights": {src.label: src.weight for src in self.sources} if len(self.sources) > 1 else None,
                "num_shards": processes * max(1, cfg.num_workers),
                "rows_per_row_group": [p.num_rows for p in pieces],
                "num_processes": processes, "num_workers": cfg.num_workers}

    def maybe_resume(self):
        path = self.resume_from
        if path is None:
            return
        if ckpt.is_legacy(path):
            self.load_legacy_state(path)
        else:
            self.load_state(path)
        self.logger.info(f"resumed from {path}: epoch {self.progress.epoch}, step {self.progress.step}, "
                         f"{self.progress.micro_step} batches done")
        progress = self.progress
        if progress.best_metric not in (None, self.cfg.best) and progress.best_score is not None:
            self.logger.warning(f"best/ was chosen by {progress.best_metric}, this run chooses by {self.cfg.best}: "
                                "the next evaluation sets a new best/")
            progress.best_score, progress.best_step, progress.evals_without_improvement = None, -1, 0

    def load_state(self, path: str):
        acc = self.accelerator
        saved = ckpt.load_json(os.path.join(path, ckpt.STATE_JSON))
        try:
            data = saved["data"]
            if len(data) != acc.num_processes:
                raise UserError(f"{path} was saved by {len(data)} processes, this run has {acc.num_processes}; "
                                "resume with the same number of processes")
            self.progress.load_state_dict(saved["progress"])
            self.stream.load_state_dict(data[acc.process_index])
            if acc.scaler is not None and saved.get("scaler"):
                acc.scaler.load_state_dict({k: v for k, v in saved["scaler"].items()
                                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            if isinstance(err, UserError):
                raise
            raise UserError(f"{path}/{ckpt.STATE_JSON} is not a chatlm train state ({err!r}); resume from "
                            "another state or start over") from None
        ckpt.load_model_weights(self.unwrapped(), os.path.join(path, ckpt.MODEL_FILE))
        ckpt.load_optimizer(self.optimizer, os.path.join(path, ckpt.OPTIMIZER_FILE), acc.device)
        ckpt.load_rng(os.path.join(path, ckpt.rng_file(acc.process_index)))
        self.apply_optimizer_settings()
        threads = saved.get("torch_threads")
        if acc.device.type == "cpu" and threads and threads != torch.get_num_threads():
            self.logger.warning(f"{path} was saved with {threads} torch threads, this run has "
                                f"{torch.get_num_threads()}: on a CPU the resumed run then differs from an "
                                f"uninterrupted one in the last bits (OMP_NUM_THREADS={threads} avoids that)")

    def load_legacy_state(self, path: str):
        """A state of the old format, through Accelerate's pickle loader: only with trust_pickled_state."""
        acc = self.accelerator
        self.logger.warning(f"loading {path} in the old pickle format (--trust_pickled_state=True)")
        class Receiver:  # takes what Accelerate unpickles for each registered object
            state = None

            def state_dict(self):
                return {}

            def load_state_dict(self, state):
                self.state = state

        scheduler, progress = Receiver(), Receiver()
        acc.register_for_checkpointing(scheduler, progress)
        try:
            acc.load_state(path)
        except Exception as err:  # noqa: BLE001 (Accelerate raises whatever its loaders raise)
            raise UserError(f"cannot load the old train state {path} ({describe_error(err)})") from None
        old = dict(progress.state)
        old["best_score"] = old.pop("best_bleu", None)
        positions, workers = old.pop("positions", []), old.pop("next_workers", [])
        self.progress.load_state_dict(old)
        rank = acc.process_index
        self.stream.load_state_dict({"epoch": self.progress.epoch,
                                     "positions": positions[rank] if positions else {},
                                     "next_worker": workers[rank] if workers else 0})
        self.apply_optimizer_settings()

    def apply_optimizer_settings(self):
        """Settings that may change on resume win over the ones saved in the optimizer state."""
        if self.cfg.optimizer == "adamw":
            self.optimizer.param_groups[0]["weight_decay"] = self.cfg.weight_decay

    def save_state(self):
        """Save everything a resume needs to train_state_dir/step_N (see model/checkpoint.py).

        All processes call it together. A failure on any of them (a full disk, a lost mount)
        is one error line; the partial directory is removed and earlier states stay intact.
        """
        acc, cfg, progress = self.accelerator, self.cfg, self.progress
        self.flush_counts()
        progress.wall_seconds = self.wall_before + time.perf_counter() - self.started
        data = gather_object([self.stream.state_dict()])
        final = ckpt.state_path(cfg.train_state_dir, progress.step)
        tmp = final + ".tmp"
        try:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
            error = None
        except OSError as err:
            error = err
        self.fail_together(error, final, tmp)
        try:
            if acc.is_main_process:
                ckpt.save_model_weights(self.unwrapped(), os.path.join(tmp, ckpt.MODEL_FILE))
                ckpt.save_optimizer(self.optimizer, os.path.join(tmp, ckpt.OPTIMIZER_FILE))
                ckpt.save_json({"format": ckpt.FORMAT, "step": progress.step, "progress": progress.state_dict(),
                                "data": data, "settings": self.settings,
                                # fp16's loss scale: numbers only
                                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                                "torch_threads": torch.get_num_threads()}, os.path.join(tmp, ckpt.STATE_JSON))
            ckpt.save_rng(os.path.join(tmp, ckpt.rng_file(acc.process_index)))
            error = None
        except Exception as err:  # noqa: BLE001 (OSError, torch's RuntimeError, SafetensorError)
            error = err
        self.fail_together(error, final, tmp)
        try:
            if acc.is_main_process:
                ckpt.write_manifest(tmp)
                ckpt.swap_in(tmp, final)
            error = None
        except Exception as err:  # noqa: BLE001
            error = err
        self.fail_together(error, final, tmp)
        self.unconfirmed.append(final)
        self.logger.info(f"saved train state {final}")

    def fail_together(self, error: BaseException | None, final: str, tmp: str):
        """If a save failed on any process, every process stops with the same line."""
        failed = self.agree(error is not None)[0]
        if not failed:
            return
        reason = describe_error(error, tmp) if error is not None else "it failed on another process"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        message = (f"could not save the train state {final}: {reason}; free some space or fix the path, "
                   "then resume with --is_keep_training=True (the earlier states are intact)")
        raise (UserError if error is not None or self.accelerator.is_main_process else QuietUserError)(message)

    def rotate_states(self):
        """Keep the newest keep_latest_n_ckp states. Runs once a later step was finite, so a state
        whose weights diverge is never what is left."""
        self.unconfirmed = []
        if self.accelerator.is_main_process:
            for old in ckpt.list_states(self.cfg.train_state_dir)[:-self.cfg.keep_latest_n_ckp]:
                shutil.rmtree(old, ignore_errors=True)

    def save_model(self, path: str):
        """A directory that AutoModelForSeq2SeqLM and AutoTokenizer load with nothing else."""
        acc = self.accelerator
        acc.wait_for_everyone()
        self.on_main(self._save_model, path)

    def _save_model(self, path: str):
        model = self.unwrapped()
        with atomic_dir(path) as tmp:
            if isinstance(model, PeftModel):
                # The merged model for every tool, and the adapter in peft's format beside it. The
                # merge runs on a copy: merging in place and back would change the weights' bits.
                model.save_pretrained(os.path.join(tmp, "adapter"))
                copy.deepcopy(model).merge_and_unload().save_pretrained(tmp, safe_serialization=True)
            else:
                model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)

    # ---- training ----------------------------------------------------------------------
    def train(self) -> TrainingProgress:
        self.build()
        cfg, acc, progress = self.cfg, self.accelerator, self.progress
        if cfg.overwrite and self.resume_from is None and acc.is_main_process:
            for old in ckpt.list_all(cfg.train_state_dir):
                shutil.rmtree(old, ignore_errors=True)
        self.stop = StopRequest(self.logger)
        # The bar is for a terminal; in a scheduler's log file the log lines say the same.
        self.bar = tqdm(total=self.total_steps, initial=min(progress.step, self.total_steps),
                        disable=not (acc.is_main_process and sys.stderr.isatty()), desc="train", unit="step",
                        dynamic_ncols=True, mininterval=1.0)
        self.logger.info(f"training: {self.total_steps} optimizer steps, {acc.num_processes} process(es), "
                         f"device {acc.device}, mixed precision {acc.mixed_precision}")
        self.meters.reset()
        self.grad_norm, self.last_lr = None, cfg.learn_rate * self.schedule(progress.step)
        self.started, self.wall_before, self.test_metrics = time.perf_counter(), progress.wall_seconds, None
        try:
            done = self.run_epochs()
            if done:
                done = self.finish()
            else:
                self.save_state()
        finally:
            self.bar.close()
            self.stop.restore()
        self.on_main(self.write_summary, "early_stopped" if done and progress.early_stopped else
                     "finished" if done else "stopped")
        if cfg.torch_compile:
            self.logger.info(f"torch.compile ({cfg.torch_compile_backend}): {compiled_graphs()} graphs compiled, "
                             f"padded lengths rounded up to multiples of {cfg.pad_multiple}")
        if not done:
            self.logger.info(f"stopped at step {progress.step}; continue with --is_keep_training=True")
        acc.end_training()
        return progress

    def finish(self) -> bool:
        """The end of a run: last evaluation, train state, final/, test report. A stop request is
        honoured between these parts; resuming a finished state runs what is left."""
        cfg, progress = self.cfg, self.progress
        if not self.stop_requested() and progress.last_eval_step != progress.step:
            self.maybe_evaluate()
        self.save_state()
        self.rotate_states()
        if self.stop_requested():
            return False
        final = os.path.join(cfg.output_dir, "final")
        if progress.step == 0:
            self.logger.warning("no optimizer step was made: final/ is not written")
            return True
        self.save_model(final)
        self.logger.info(f"final model saved to {final}")
        if cfg.test_file and not self.stop_requested():
            self.test_metrics = self.report(cfg.test_file)["metrics"]
        return True

    def stop_requested(self) -> bool:
        return bool(self.agree(self.stop.signum is not None)[0])

    def run_epochs(self) -> bool:
        """Train until the last epoch or max_steps; False when a signal stopped the run."""
        cfg, progress = self.cfg, self.progress
        while progress.epoch < cfg.epochs and not self.reached_the_end():
            if self.run_epoch():
                return False
            if self.reached_the_end():
                break
            progress.epoch += 1
            self.stream.set_epoch(progress.epoch)
            self.maybe_evaluate(end_of_epoch=True)
        return True

    def reached_the_end(self) -> bool:
        """max_steps made, or early stopping ended the run."""
        return self.progress.early_stopped or bool(self.cfg.max_steps) and self.progress.step >= self.cfg.max_steps

    def run_epoch(self) -> bool:
        """One pass over the data; True when a stop was requested (state not yet saved)."""
        acc, cfg, model, progress = self.accelerator, self.cfg, self.model, self.progress
        stop_pending = False
        model.train()
        for batch, units, all_units, stop_now in self.batches():
            stop_pending = stop_pending or stop_now
            if batch is None:
                # This process has run out of the epoch's data, others have not: it steps with
                # them on a batch that weighs nothing, so their rows are all trained on.
                batch = self.idle_batch
            else:
                self.record_batch(batch)
            # The loss of an optimizer step is the mean over all its units (target tokens; pairs
            # or prompts for DPO and GRPO) across micro-batches and processes, however unevenly
            # they are split: a micro-batch weighs its units. Accelerate divides by the
            # accumulation steps and DDP averages over processes; the weight undoes both against a
            # fixed scale, and apply_update divides by the step's units once they are all known.
            weight = units * acc.num_processes * cfg.gradient_accumulation_steps / self.unit_scale
            batch = {k: v.to(acc.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            saves = progress.step // cfg.save_steps
            # An objective may make several updates on one batch (GRPO's iterations on one batch
            # of samples; it keeps them in the batch). A stop or a train state comes only after the
            # last of them, so a resume starts at a batch boundary.
            updates = self.objective.updates_per_batch
            for update in range(updates):
                self.step_units += all_units
                with acc.accumulate(model):
                    loss, values = self.objective.loss(model, batch, self.reference)
                    self.call_hooks("on_loss", batch, loss, values)
                    acc.backward(loss * weight)  # Accelerate divides by gradient_accumulation_steps: once
                    if acc.sync_gradients:
                        self.apply_update()
                if weight:
                    self.meters.add(values)
                if not acc.sync_gradients:
                    continue
                progress.step += 1
                self.bar.update(1)
                self.maybe_log()
                self.maybe_release_memory()
                if cfg.eval_steps and progress.step % cfg.eval_steps == 0:
                    self.maybe_evaluate()
                self.check_signal()
                self.call_hooks("on_step_end")
                if update == updates - 1 and stop_pending:
                    return True
                if update == updates - 1 and progress.step // cfg.save_steps > saves:
                    self.save_state()
                if self.reached_the_end():
                    return False
        return False

    def apply_update(self):
        """The optimizer step at the end of an accumulation: the scheduled lr, clipping, and a
        check that the gradient is finite. A non-finite one is not applied; max_bad_steps of
        them in a row stop the run before anything is saved."""
        acc, cfg, step = self.accelerator, self.cfg, self.progress.step
        self.last_lr = cfg.learn_rate * self.schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.last_lr
        scale = self.unit_scale / max(1, self.step_units)
        self.step_units = 0
        params = self.trainable_params()
        if scale != 1.0:
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], scale)
        # One norm for all processes (gradients are already averaged), so all decide alike.
        self.grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        finite = math.isfinite(float(self.grad_norm))  # one host sync per optimizer step
        if finite or acc.mixed_precision == "fp16":  # fp16: the grad scaler skips overflowing steps itself
            self.optimizer.step()
            self.bad_steps = 0
            if self.unconfirmed:
                self.rotate_states()
        else:
            self.bad_steps += 1
            self.logger.warning(f"step {step + 1}: gradient norm {float(self.grad_norm)}, update skipped "
                                f"({self.bad_steps} of --max_bad_steps={cfg.max_bad_steps} in a row)")
            if self.bad_steps >= cfg.max_bad_steps:
                self.stop_diverged(step + 1)
        self.optimizer.zero_grad(set_to_none=True)

    def check_signal(self):
        """GRPO: a reward that scores every completion of a group alike gives advantages and
        gradients of 0. When no group of grpo_max_zero_signal_steps steps in a row (all processes)
        told its completions apart, stop with one line instead of training on for nothing."""
        seen = self.objective.take_signal()
        limit, progress = self.cfg.grpo_max_zero_signal_steps, self.progress
        if seen is None or not limit:
            return
        progress.steps_without_signal = 0 if self.agree(seen)[0] else progress.steps_without_signal + 1
        if progress.steps_without_signal < limit:
            return
        self.metrics.log({"train/steps_without_signal": progress.steps_without_signal}, progress.step, progress.epoch,
                         self.total_steps, meta={"stopped": "no_reward_signal"})
        self.on_main(self.write_summary, "no_reward_signal")
        message = (f"every group of the last {limit} steps gave its completions the same reward (--reward="
                   f"{self.cfg.reward}): the reward gives no signal for this model and data, and training stopped at "
                   f"step {progress.step} (the train states saved before are kept); try another --reward, a larger "
                   "--grpo_group_size, a stronger --init_from or a higher --grpo_temperature "
                   "(--grpo_max_zero_signal_steps=0 trains on regardless)")
        raise (UserError if self.accelerator.is_main_process else QuietUserError)(message)

    def stop_diverged(self, step: int):
        """Stop with one line; states saved since the last finite step are set aside."""
        cfg = self.cfg
        if self.accelerator.is_main_process:
            for path in self.unconfirmed:
                if os.path.isdir(path):
                    shutil.rmtree(path + ".diverged", ignore_errors=True)
                    os.replace(path, path + ".diverged")
                    self.logger.warning(f"{path}: the steps after it were not finite; renamed {path}.diverged")
        states = ckpt.list_states(cfg.train_state_dir)
        resume = (f"resume from {os.path.basename(states[-1])} with --is_keep_training=True" if states
                  else "start over")
        raise NonFiniteLoss(f"the loss or gradient norm was not finite for {self.bad_steps} steps in a row, up to "
                            f"step {step}: training stopped and nothing of these steps was saved; lower "
                            f"--learn_rate or set --max_grad_norm, then {resume}")

    def batches(self):
        """Yield (batch or None, its loss units, all processes' units, stop requested anywhere)
        until no process has data left.

        Processes stay in step: each micro-step they count who still has a batch, the units its
        loss is a mean over, and whether any received a stop signal (one small all-reduce on a
        CPU group).
        """
        it = iter(self.loader)
        if self.accelerator.device.type == "cuda" and not self.cfg.num_workers:
            it = prefetch(it)  # on a CPU the thread would take a core from the computation
        while True:
            batch = next(it, None)
            units = self.objective.loss_units(batch) if batch is not None else 0
            active, stop, all_units = self.agree(batch is not None, self.stop.signum is not None, units)
            if not active:
                return
            yield batch, units, all_units, bool(stop)

    def agree(self, *flags: bool) -> list[int]:
        """Each flag summed over all processes."""
        if self.accelerator.num_processes == 1:
            return [int(f) for f in flags]
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        torch.distributed.all_reduce(t, group=self.flag_group)
        return t.tolist()

    def record_batch(self, batch: dict):
        """Take the metadata off the batch (the stream moves its position) and count what it holds."""
        rows, skipped, source = self.stream.advance(batch)
        self.meters.add_batch(self.objective.count_tokens(batch), len(rows), skipped, source)
        self.progress.micro_step += 1
        if self.cfg.trace_samples:
            path = os.path.join(self.cfg.output_dir, f"samples.rank{self.accelerator.process_index}.jsonl")
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"epoch": self.progress.epoch, "micro_step": self.progress.micro_step,
                                    "rows": rows.tolist()}) + "\n")

    def trainable_params(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def flush_counts(self):
        """Add every process's counts to progress (a collective: all processes call it together)."""
        tokens, rows, skipped, *per_source = self.meters.flush(self.accelerator)
        self.progress.tokens += int(tokens)
        self.progress.samples += int(rows)
        self.progress.rows_skipped += int(skipped)
        if len(per_source) > 1:
            old = self.progress.rows_per_source or [0] * len(per_source)
            self.progress.rows_per_source = [a + int(b) for a, b in zip(old, per_source)]

    def maybe_log(self):
        progress, meters = self.progress, self.meters
        if progress.step % self.cfg.logging_steps:
            return
        self.flush_counts()
        seconds = time.perf_counter() - meters.started
        metrics = {f"train/{k}": v for k, v in meters.means().items()}
        metrics.update({"train/lr": self.last_lr, "train/tokens_per_s": meters.counts[0] / seconds,
                        "train/samples_per_s": meters.counts[1] / seconds})
        if self.grad_norm is not None:
            metrics["train/grad_norm"] = float(self.grad_norm)
        if progress.rows_skipped:
            metrics["data/empty_rows_skipped"] = progress.rows_skipped
        for src, rows in zip(self.sources, progress.rows_per_source or []):
            metrics[f"data/rows/{src.label}"] = rows
        if self.cfg.log_memory:
            metrics.update({f"memory/{k}": v for k, v in memory_usage().items()})
        self.metrics.log(metrics, progress.step, progress.epoch, self.total_steps)
        self.bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
        meters.reset()

    def maybe_release_memory(self):
        steps = self.cfg.empty_cache_steps
        if steps and self.progress.step % steps == 0 and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- evaluation --------------------------------------------------------------------
    def maybe_evaluate(self, end_of_epoch: bool = False):
        """Evaluate on the validation rows and the regression prompts; the best model by
        `best_metric` goes to best/, and early stopping counts evaluations without improvement."""
        if self.eval_loader is None and not self.checks:
            return
        cfg, progress = self.cfg, self.progress
        progress.last_eval_step = progress.step
        started = time.perf_counter()
        where = f"end of epoch {progress.epoch - 1}" if end_of_epoch else f"step {progress.step}"
        scores, meta, rows = {}, {"best_metric": cfg.best}, 0
        if self.eval_loader is not None:
            result = evaluate(self.model, self.eval_loader, self.accelerator, self.tokenizer, cfg.max_seq_len,
                              self.reference)
            scores, rows = result["metrics"], len(result["hypotheses"])
        if self.checks:
            passed = self.check_regressions(where)
            scores["regression/pass_rate"] = len(passed) / len(self.checks)
            meta["regression"] = {c.name: c.name in passed for c in self.checks}
        self.metrics.log({f"eval/{k}": v for k, v in scores.items()}, progress.step, progress.epoch,
                         self.total_steps, prefix=f"eval at {where} ({rows} rows):", meta=meta)
        score = scores.get(cfg.best)
        if self.eval_loader is None:  # regression prompts only
            pass
        elif score is None:
            self.logger.warning(f"eval at {where}: no {cfg.best} to choose best/ by (is there a task column?)")
        elif not math.isfinite(scores.get("loss", 0.0)) or not math.isfinite(score):
            self.logger.warning(f"eval at {where}: the validation loss is not finite; best/ is left as it is")
        else:
            self.count_for_early_stopping(score, where)
            if progress.step > 0 and is_better(cfg.best, score, progress.best_score):
                progress.best_score, progress.best_step, progress.best_metric = score, progress.step, cfg.best
                self.save_model(os.path.join(cfg.output_dir, "best"))
                self.logger.info(f"new best {cfg.best} {score:.4f}: model saved to "
                                 f"{os.path.join(cfg.output_dir, 'best')}")
        self.model.train()
        self.meters.started += time.perf_counter() - started  # evaluation time is not training throughput

    def count_for_early_stopping(self, score: float, where: str):
        """An evaluation without an improvement of at least early_stopping_min_delta over the best
        so far counts; early_stopping_patience of them in a row end the run (the count is saved
        with the train state, so it survives a resume)."""
        cfg, progress = self.cfg, self.progress
        if not cfg.early_stopping_patience:
            return
        best = progress.best_score
        gain = None if best is None else (best - score if cfg.best.split("/")[0] in LOWER_IS_BETTER else score - best)
        if gain is None or (gain > 0 and gain >= cfg.early_stopping_min_delta):
            progress.evals_without_improvement = 0
            return
        progress.evals_without_improvement += 1
        self.logger.info(f"eval at {where}: no improvement of {cfg.best} by {cfg.early_stopping_min_delta} "
                         f"({progress.evals_without_improvement} of --early_stopping_patience="
                         f"{cfg.early_stopping_patience})")
        if progress.evals_without_improvement >= cfg.early_stopping_patience:
            progress.early_stopped = True
            self.logger.info(f"early stopping at step {progress.step}: best {cfg.best} {best:.4f} at step "
                             f"{progress.best_step}")

    def check_regressions(self, where: str) -> set[str]:
        """Answer every regression prompt greedily; log the failures, and warn about each prompt
        that passed at the previous evaluation and fails now. Returns the names that passed."""
        model = self.unwrapped()
        model.eval()
        results = run_checks(model, self.tokenizer, self.checks, self.cfg.max_seq_len, self.accelerator.device)
        passed = {c.name for c, _, ok in results if ok}
        before = set(self.progress.regression_passed or [])
        if self.accelerator.is_main_process:
            self.logger.info(f"regression at {where}: {len(passed)}/{len(results)} passed")
            for check, answer, ok in results:
                if ok:
                    continue
                line = f"{check.name}: {check.prompt!r} -> {answer!r}, expected {check.match} {check.expect!r}"
                if check.name in before:
                    self.logger.warning(f"regression at {where}: {line} (it passed at the previous evaluation)")
                else:
                    self.logger.info(f"  fails {line}")
        self.progress.regression_passed = sorted(passed)
        return passed

    def write_summary(self, status: str):
        """output_dir/summary.json and plots/training.png at the end of a run (main process)."""
        cfg, progress = self.cfg, self.progress
        progress.wall_seconds = self.wall_before + time.perf_counter() - self.started
        records = read_metrics(cfg.output_dir) if os.path.isfile(os.path.join(cfg.output_dir, "metrics.jsonl")) \
            else []
        speeds = [r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r]
        evals = [r for r in records if any(k.startswith("eval/") for k in r)]
        last = {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else None
        final_score = last.get(cfg.best) if last and evals[-1]["step"] == progress.step else None
        memory = memory_usage()
        summary = {
            "status": status, "steps": progress.step, "total_steps": self.total_steps, "epoch": progress.epoch,
            "wall_seconds": round(progress.wall_seconds, 1),
            "data": {"rows_trained": progress.samples, "empty_rows_skipped": progress.rows_skipped,
                     "tokens": progress.tokens, "validation_rows": len(self.eval_set) if self.eval_set else 0,
                     "rows_per_source": dict(zip((s.label for s in self.sources), progress.rows_per_source))
                     if progress.rows_per_source else None},
            "median_tokens_per_s": float(np.median(speeds)) if speeds else None,
            "compiled_graphs": compiled_graphs() if cfg.torch_compile else None,
            "peak_rss_gb": round(memory["peak_rss_gb"], 3),
            "peak_gpu_gb": round(memory["peak_gpu_gb"], 3) if "peak_gpu_gb" in memory else None,
            "best": {"metric": cfg.best, "score": progress.best_score, "step": progress.best_step},
            # final/ is the last step's model: which of it and best/ scored better on the validation rows
            "final_vs_best": None if final_score is None or progress.best_score is None else
            "same" if progress.best_step == progress.step or final_score == progress.best_score else
            "final" if is_better(cfg.best, final_score, progress.best_score) else "best",
            "early_stopping": {"patience": cfg.early_stopping_patience, "min_delta": cfg.early_stopping_min_delta,
                               "evals_without_improvement": progress.evals_without_improvement,
                               "stopped_early": progress.early_stopped},
            "last_eval": {"step": evals[-1]["step"], **last} if last else None,
            "regression_failed": sorted(c.name for c in self.checks if c.name not in
                                        set(progress.regression_passed or [])) if self.checks else None,
            "test": self.test_metrics,
            "settings": {k: v for k, v in dataclasses.asdict(cfg).items()},
        }
        path = os.path.join(cfg.output_dir, "summary.json")
        with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, ensure_ascii=False)
        if records:
            plot = plot_training(cfg.output_dir, cfg.best)
            self.logger.info(f"summary: {path}, plot: {plot}")

    def report(self, path: str) -> dict:
        """Score the trained model on a held-out file: its metrics, exact match per task, sample answers."""
        return score_file(self.model, self.accelerator, self.tokenizer, path, self.cfg.batch_size_per_gpu * 4,
                          self.cfg.max_seq_len, self.logger, objective=self.objective, reference=self.reference)
