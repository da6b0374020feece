"""Training and model configuration: one dataclass each, YAML files, command-line overrides.

Precedence: dataclass defaults < `--config=FILE.yaml` < `--field=value` flags.
"""
import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, fields

import yaml

from utils.cli import coerce
from utils.errors import UserError


@dataclass(frozen=True)
class T5ModelConfig:
    """Shape of the T5 model; `vocab_size` comes from the tokenizer."""
    d_model: int = 768
    d_ff: int = 3072
    num_heads: int = 12
    d_kv: int = 64
    num_layers: int = 10  # encoder layers
    num_decoder_layers: int = 10
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    feed_forward_proj: str = "relu"

    @classmethod
    def preset(cls, name: str) -> "T5ModelConfig":
        if name not in MODEL_PRESETS:
            raise UserError(f"unknown model_size {name!r}; choose one of {sorted(MODEL_PRESETS)}")
        return MODEL_PRESETS[name]


MODEL_PRESETS = {
    # The CPU demo and the tests: trains the demo tasks in minutes on two cores. T5 knows
    # positions only through attention biases; 8 narrow heads learned the demo's digit
    # positions in half the steps of 4 wide ones, and from every seed we tried.
    "tiny": T5ModelConfig(d_model=128, d_ff=512, num_heads=8, d_kv=16, num_layers=3,
                          num_decoder_layers=3, relative_attention_max_distance=64, dropout_rate=0.0),
    # The original ChatLM-mini-Chinese model: about 0.2B parameters with a 29k vocabulary.
    "small": T5ModelConfig(),
}


@dataclass(frozen=True)
class TrainConfig:
    # Data: parquet with string columns prompt/response. train_file may be a list or a glob.
    train_file: str | list[str] = "./data/my_train_dataset.parquet"  # a path, a glob or a list
    validation_file: str = "./data/my_valid_dataset.parquet"  # "" for no evaluation
    test_file: str = ""  # if set, the final model is scored on it at the end of training
    tokenizer_dir: str = "./model_save/tokenizer"  # trained from train_file when missing
    vocab_size: int = 29298  # for a tokenizer trained by `train`
    max_seq_len: int = 256  # tokens per text, [EOS] included; longer texts are truncated

    # Model and modes.
    model_size: str = "small"  # a preset of T5ModelConfig: tiny or small
    is_finetune: bool = False  # load finetune_from_ckp_file, freeze embedding and encoder
    finetune_from_ckp_file: str = ""  # a saved model directory or a .safetensors file
    is_keep_training: bool | str = False  # resume from the latest intact state; auto: resume if there is one
    trust_pickled_state: bool = False  # resume from a state in the old pickle format (it can run code: only your own)
    overwrite: bool = False  # a fresh run may replace the states already in train_state_dir

    # Optimisation. Steps are optimizer steps (after accumulation).
    epochs: int = 8  # passes over train_file
    max_steps: int = 0  # stop after this many optimizer steps; 0: no limit
    batch_size_per_gpu: int = 16  # rows per micro-batch, per process
    gradient_accumulation_steps: int = 8  # micro-batches per optimizer step
    learn_rate: float = 1e-4  # peak learning rate
    div_factor: float = 50.0  # warmup starts at, and decay ends at, learn_rate / div_factor
    warmup_steps: int = 1024  # optimizer steps of linear warmup
    optimizer: str = "adamw"  # adamw or adafactor (factored second moments, less memory)
    weight_decay: float = 0.01  # AdamW only; never on norms
    max_grad_norm: float = 1.0  # 0: no clipping
    max_bad_steps: int = 3  # consecutive steps with a non-finite loss or grad norm (skipped) before the run stops
    mixed_precision: str = "auto"  # auto (bf16 where the GPU has it, else no), no, bf16, fp16
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower
    seed: int = 23333  # model init, dropout and data order

    # Data loading.
    dataloader_buffer_size: int = 10000  # rows per shuffle window, per data shard
    group_by_length: bool = True  # batches of similar length within a window: far less padding
    num_workers: int = 0  # DataLoader worker processes per training process
    keep_in_memory: bool = False  # hold the parquet in memory instead of re-reading it

    # Evaluation, logging, checkpoints.
    eval_steps: int = 0  # also evaluate every N optimizer steps; 0: once per epoch only
    max_eval_rows: int = 500  # validation rows used for loss and BLEU
    logging_steps: int = 50  # optimizer steps between log lines
    log_with: str = "tensorboard"  # tensorboard or none
    log_memory: bool = False  # add RSS and GPU memory to each log line
    empty_cache_steps: int = 0  # release cached GPU memory every N steps; 0: never
    trace_samples: bool = False  # write each batch's row indices to output_dir/samples.rank<N>.jsonl
    save_steps: int = 5000  # optimizer steps between train states
    keep_latest_n_ckp: int = 3  # train states kept in train_state_dir
    train_state_dir: str = "./model_save/train_state"  # train states for --is_keep_training
    output_dir: str = "./model_save"  # models (best/, final/), train.log, TensorBoard

    def __post_init__(self):
        validate(self)


CHOICES = {
    "optimizer": ("adamw", "adafactor"),
    "mixed_precision": ("auto", "no", "bf16", "fp16"),
    "log_with": ("tensorboard", "none"),
    "model_size": tuple(MODEL_PRESETS),
}
POSITIVE = ("epochs", "batch_size_per_gpu", "gradient_accumulation_steps", "learn_rate", "div_factor",
            "vocab_size", "max_seq_len", "dataloader_buffer_size", "logging_steps", "save_steps",
            "keep_latest_n_ckp", "max_eval_rows", "max_bad_steps")
NON_NEGATIVE = ("max_steps", "warmup_steps", "weight_decay", "max_grad_norm", "num_workers", "eval_steps",
                "empty_cache_steps")


def validate(cfg: TrainConfig) -> None:
    """Reject bad values and combinations once, at start-up, saying what to change."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f"--{name}={getattr(cfg, name)!r} is not one of {list(allowed)}")
    for name in POSITIVE:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be > 0, got {getattr(cfg, name)}")
    for name in NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name} must be a finite number, got {value}")
    if cfg.vocab_size < 16:
        raise UserError(f"--vocab_size must be at least 16, got {cfg.vocab_size}")
    if cfg.is_keep_training not in (True, False, "auto"):
        raise UserError(f"--is_keep_training must be True, False or auto, got {cfg.is_keep_training!r}")
    if cfg.is_finetune and not cfg.finetune_from_ckp_file:
        raise UserError("--is_finetune=True needs --finetune_from_ckp_file=DIR_OR_FILE (a trained model)")
    if not cfg.train_file:
        raise UserError("--train_file is empty; give a parquet file, a list of files or a glob")


def merge(cfg: TrainConfig, overrides: dict, source: str) -> TrainConfig:
    """Apply `overrides` onto `cfg`; unknown keys and wrong types fail, naming the valid keys."""
    hints = typing.get_type_hints(TrainConfig)
    valid = [f.name for f in fields(TrainConfig)]
    unknown = [k for k in overrides if k not in hints]
    if unknown:
        close = difflib.get_close_matches(unknown[0], valid, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"unknown setting {unknown[0]!r} in {source}; {hint}valid keys: {', '.join(valid)}")
    values = {k: coerce(k, v, hints[k]) for k, v in overrides.items()}
    return dataclasses.replace(cfg, **values)


def load_config(config: str | None = None, base: TrainConfig | None = None, **flags) -> TrainConfig:
    """Defaults (or `base`) < YAML file `config` < `flags`."""
    cfg = base if base is not None else TrainConfig()
    if config:
        if not os.path.isfile(config):
            raise UserError(f"config file {config} not found; pass --config=PATH to a YAML file")
        try:
            with open(config, encoding="utf-8") as f:
                from_file = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise UserError(f"config file {config} is not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(from_file, dict):
            raise UserError(f"config file {config} must hold a mapping of setting: value")
        cfg = merge(cfg, from_file, config)
    return merge(cfg, flags, "the command line")


def low_memory(cfg: TrainConfig, micro_batch: int = 2) -> TrainConfig:
    """The low-memory profile: the same run, in less RAM and GPU memory.

    The effective batch (batch_size_per_gpu x gradient_accumulation_steps) stays the same:
    micro-batches shrink to `micro_batch` rows and accumulation grows to match.
    """
    per_step = cfg.batch_size_per_gpu * cfg.gradient_accumulation_steps
    micro = min(micro_batch, cfg.batch_size_per_gpu)
    return dataclasses.replace(
        cfg,
        batch_size_per_gpu=micro,
        gradient_accumulation_steps=max(1, per_step // micro),
        gradient_checkpointing=True,
        optimizer="adafactor",
        keep_in_memory=False,
        dataloader_buffer_size=min(cfg.dataloader_buffer_size, 2000),
        num_workers=min(cfg.num_workers, 1),
        empty_cache_steps=cfg.empty_cache_steps or 100,
        log_memory=True,
    )
