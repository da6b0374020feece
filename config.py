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
    # The shapes of the original T5-base and T5-large (about 0.22B and 0.74B parameters with a 29k
    # vocabulary): for these, shard the training state across GPUs (--fsdp, docs/training.md).
    "base": T5ModelConfig(num_layers=12, num_decoder_layers=12),
    "large": T5ModelConfig(d_model=1024, d_ff=4096, num_heads=16, d_kv=64, num_layers=24, num_decoder_layers=24),
}


@dataclass(frozen=True)
class TrainConfig:
    # Data: parquet with string columns prompt/response, or a messages column of {role, content}
    # turns (conversations: docs/training.md). train_file may be a path, a glob, a list, or
    # {path or glob: weight}: weighted sources, whose rows are drawn in those proportions (see mix_strategy).
    train_file: str | list[str] | dict[str, float] = "./data/my_train_dataset.parquet"  # path, glob, list, weights
    mix_strategy: str = "first_exhausted"  # weights: an epoch ends as one runs out, or all (all_exhausted)
    validation_file: str = "./data/my_valid_dataset.parquet"  # "" for no evaluation
    validation_split: float = 0.0  # without validation_file: this share of the training rows is held out to evaluate on
    test_file: str = ""  # if set, the final model is scored on it at the end of training
    tokenizer_dir: str = "./model_save/tokenizer"  # trained from train_file when missing
    vocab_size: int = 29298  # for a tokenizer trained by `train`
    max_seq_len: int = 256  # tokens per text, [EOS] included; longer texts are truncated (a conversation's oldest turns go first)
    last_turn_only: bool = False  # conversations (a messages column): a row of the last assistant turn only; False: of every one

    # Model and modes: an objective, where to start, what trains.
    model_size: str = ""  # a preset of T5ModelConfig: tiny, small, base or large; "": small, or the shape of init_from
    objective: str = "seq2seq"  # seq2seq (prompt -> response), dpo (prompt, chosen, rejected) or grpo (prompt + reward)
    init_from: str = ""  # a model directory or .safetensors to start from; the reference of dpo and kl_beta
    trainable: str = "all"  # all, decoder (shared embedding and encoder frozen) or lora (peft adapters only)
    is_finetune: bool = False  # the old flag: means --init_from=finetune_from_ckp_file --trainable=decoder
    finetune_from_ckp_file: str = ""  # a saved model directory or a .safetensors file (with is_finetune)
    lora_r: int = 16  # rank of the LoRA adapters
    lora_alpha: float = 32.0  # LoRA scale numerator: updates are scaled by lora_alpha / lora_r
    lora_dropout: float = 0.05  # dropout on the adapters' input
    lora_target_modules: str | list[str] = "q,k,v,o,wi,wo"  # T5 linear layers that get adapters
    dpo_beta: float = 0.1  # DPO: strength of the pull to the reference (higher: closer)
    dpo_loss: str = "sigmoid"  # DPO loss: sigmoid (Rafailov et al.), ipo or hinge
    dpo_label_smoothing: float = 0.0  # DPO sigmoid loss: assumed share of flipped preference labels
    dpo_rpo_alpha: float = 0.0  # DPO: plus this x the NLL of the chosen answers (TRL's rpo_alpha); 0: pure DPO
    kl_beta: float = 0.0  # seq2seq: weight of KL(policy || init_from) per response token; 0: off
    reward: str = "exact_match"  # GRPO: exact_match, lcs_f1, char_bag_f1, module:function, or weighted: 'exact_match=1,lcs_f1=0.5'
    grpo_group_size: int = 8  # GRPO: completions sampled per prompt
    grpo_max_new_tokens: int = 32  # GRPO: longest completion sampled
    grpo_temperature: float = 1.0  # GRPO: sampling temperature
    grpo_top_p: float = 1.0  # GRPO: nucleus sampling mass (1: off)
    grpo_clip_eps: float = 0.2  # GRPO: ratio clipped to [1 - eps, 1 + eps_high]
    grpo_clip_eps_high: float = 0.0  # GRPO: upper clip (0: the same as grpo_clip_eps)
    grpo_beta: float = 0.0  # GRPO: weight of the k3 KL to init_from per token; 0: no reference is loaded
    grpo_iterations: int = 1  # GRPO: optimizer updates on each batch of samples (ratio clipped from the 2nd on)
    grpo_loss_aggregation: str = "token"  # GRPO: mean over the batch's tokens (token) or per completion (sequence)
    grpo_max_zero_signal_steps: int = 20  # GRPO: stop when every group had equal rewards this many steps in a row; 0: never
    disable_dropout: bool | str = "auto"  # dropout off in train mode; auto: for dpo, grpo and kl_beta (policy vs reference)
    best_metric: str = ""  # metric that picks best/: "" = bleu4 (seq2seq), exact_match (dpo), reward (grpo)
    is_keep_training: bool | str = False  # resume from the latest intact state; auto: resume if there is one
    trust_pickled_state: bool = False  # resume from a state in the old pickle format (it can run code: only your own)
    overwrite: bool = False  # a fresh run may replace the states already in train_state_dir
    profile: str = ""  # low_memory: micro-batches of 2, checkpointing, Adafactor (AdamW under --fsdp), small buffer

    # Optimisation. Steps are optimizer steps (after accumulation).
    epochs: int = 8  # passes over train_file
    max_steps: int = 0  # stop after this many optimizer steps; 0: no limit
    batch_size_per_gpu: int = 16  # rows per micro-batch, per process
    max_tokens_per_batch: int = 0  # micro-batches by a budget of padded prompt + response tokens; 0: by rows
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
    torch_compile: bool = False  # torch.compile the model (pad_to_multiple_of then defaults to 64)
    torch_compile_backend: str = "inductor"  # inductor, aot_eager or eager (dynamo's graphs only)
    pad_to_multiple_of: int = 0  # round padded lengths up to a multiple; 0: 64 compiled, 8 on CUDA, else 1
    attn_implementation: str = "auto"  # auto (sdpa, but where T5's trained position bias would send a CPU to sdpa's math kernel, the bias folded into the scores' matmul: model/chat_model.py), sdpa (torch's scaled_dot_product_attention) or eager
    fsdp: str = ""  # shard over the processes with FSDP2: full (weights, gradients, optimizer state) or grad_op (ZeRO-2: all but the weights); "": none (DDP); set by an Accelerate FSDP2 launch config too
    loss_chunk_tokens: int = -1  # tokens per chunk of the output head and loss, no (tokens, vocabulary) logits kept (model/chunked.py); -1: auto (8 MB chunks; for DPO, GRPO and kl_beta only where the full logits would reach 256 MB); 0: the full logits
    seed: int = 23333  # model init, dropout and data order

    # Data loading.
    dataloader_buffer_size: int = 10000  # rows per shuffle window, per data shard
    group_by_length: bool = True  # batches of similar length within a window: far less padding
    num_workers: int = 0  # DataLoader worker processes per training process
    keep_in_memory: bool = False  # hold the parquet in memory instead of re-reading it

    # Evaluation, logging, checkpoints.
    eval_steps: int = 0  # also evaluate every N optimizer steps; 0: once per epoch only
    max_eval_rows: int = 500  # validation rows used for loss and BLEU
    early_stopping_patience: int = 0  # stop after this many evaluations without best_metric improving; 0: off
    early_stopping_min_delta: float = 0.0  # the least change of best_metric that counts as an improvement
    regression_file: str = ""  # YAML/JSONL: prompt, expect, match (exact, contains, regex)
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
        if isinstance(self.lora_target_modules, str):
            object.__setattr__(self, "lora_target_modules",
                               [m.strip() for m in self.lora_target_modules.split(",") if m.strip()])
        validate(self)

    # The old finetune flags are mapped here, once: --is_finetune=True --finetune_from_ckp_file=X
    # means start from X and train the decoder. The trainer reads only these two.
    @property
    def start_from(self) -> str:
        """The model training starts from ("" for a new one)."""
        return self.init_from or (self.finetune_from_ckp_file if self.is_finetune else "")

    @property
    def trains(self) -> str:
        """What trains: all, decoder or lora."""
        return "decoder" if self.is_finetune and self.trainable == "all" else self.trainable

    @property
    def preset(self) -> str:
        """The model_size preset a new model (or a .safetensors start) is built in."""
        return self.model_size or "small"

    @property
    def pad_multiple(self) -> int:
        """What padded lengths are rounded up to."""
        if self.pad_to_multiple_of:
            return self.pad_to_multiple_of
        import torch
        return 64 if self.torch_compile else 8 if torch.cuda.is_available() else 1

    @property
    def best(self) -> str:
        """The metric that picks best/: best_metric, or the objective's default."""
        from model.objectives import objective_class
        return self.best_metric or objective_class(self.objective).default_best_metric

    @property
    def dropout_off(self) -> bool:
        """Whether the model trains with its dropout turned off (disable_dropout, auto resolved)."""
        if self.disable_dropout == "auto":
            from model.objectives import objective_class
            return objective_class(self.objective).dropout_free_for(self)
        return bool(self.disable_dropout)


CHOICES = {
    "grpo_loss_aggregation": ("token", "sequence"),
    "trainable": ("all", "decoder", "lora"),
    "dpo_loss": ("sigmoid", "ipo", "hinge"),
    "optimizer": ("adamw", "adafactor"),
    "mixed_precision": ("auto", "no", "bf16", "fp16"),
    "log_with": ("tensorboard", "none"),
    "model_size": ("",) + tuple(MODEL_PRESETS),
    "mix_strategy": ("first_exhausted", "all_exhausted"),
    "profile": ("", "low_memory"),
    "attn_implementation": ("auto", "eager", "sdpa"),
    "fsdp": ("", "full", "grad_op"),
    "torch_compile_backend": ("inductor", "aot_eager", "eager", "cudagraphs"),
}
POSITIVE = ("epochs", "batch_size_per_gpu", "gradient_accumulation_steps", "learn_rate", "div_factor",
            "vocab_size", "max_seq_len", "dataloader_buffer_size", "logging_steps", "save_steps",
            "keep_latest_n_ckp", "max_eval_rows", "max_bad_steps", "lora_r", "lora_alpha", "dpo_beta",
            "grpo_max_new_tokens", "grpo_temperature", "grpo_iterations")
NON_NEGATIVE = ("max_steps", "warmup_steps", "weight_decay", "max_grad_norm", "num_workers", "eval_steps",
                "empty_cache_steps", "kl_beta", "lora_dropout", "dpo_label_smoothing", "dpo_rpo_alpha",
                "grpo_clip_eps", "grpo_clip_eps_high", "grpo_beta", "grpo_max_zero_signal_steps",
                "early_stopping_patience",
                "early_stopping_min_delta", "max_tokens_per_batch", "pad_to_multiple_of")


def validate(cfg: TrainConfig) -> None:
    """Reject bad values and combinations once, at start-up, saying what to change. The objective
    checks the settings that concern it (model/objectives.py)."""
    from model.objectives import objective_class
    objective = objective_class(cfg.objective)
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f"--{name}={getattr(cfg, name)!r} is not one of {list(allowed)}")
    for name in POSITIVE:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be > 0, got {getattr(cfg, name)}")
    for name in NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.fsdp and cfg.mixed_precision == "fp16":
        raise UserError(f"--fsdp={cfg.fsdp} cannot train in fp16: FSDP2 has no sharded grad scaler; use "
                        "--mixed_precision=bf16 (or no)")
    if cfg.fsdp and cfg.optimizer == "adafactor":
        raise UserError(f"--fsdp={cfg.fsdp} with --optimizer=adafactor is not supported yet (its factored statistics "
                        "need whole matrices); use --optimizer=adamw, whose state FSDP2 shards over the processes")
    if cfg.fsdp and cfg.torch_compile:
        raise UserError(f"--fsdp={cfg.fsdp} with --torch_compile is not supported yet; drop one of them")
    if cfg.loss_chunk_tokens < -1:
        raise UserError(f"--loss_chunk_tokens must be -1 (auto), 0 (full logits) or a number of tokens, "
                        f"got {cfg.loss_chunk_tokens}")
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name} must be a finite number, got {value}")
    if cfg.vocab_size < 16:
        raise UserError(f"--vocab_size must be at least 16, got {cfg.vocab_size}")
    if cfg.is_keep_training not in (True, False, "auto"):
        raise UserError(f"--is_keep_training must be True, False or auto, got {cfg.is_keep_training!r}")
    if cfg.disable_dropout not in (True, False, "auto"):
        raise UserError(f"--disable_dropout must be True, False or auto, got {cfg.disable_dropout!r}")
    if cfg.is_finetune and not cfg.finetune_from_ckp_file:
        raise UserError("--is_finetune=True needs --finetune_from_ckp_file=DIR_OR_FILE (a trained model)")
    if cfg.is_finetune and cfg.trainable == "lora":
        raise UserError("--is_finetune=True trains the decoder, not LoRA adapters; for LoRA give "
                        "--init_from=DIR --trainable=lora instead")
    if cfg.is_finetune and cfg.init_from and cfg.init_from != cfg.finetune_from_ckp_file:
        raise UserError("give either --init_from or --is_finetune with --finetune_from_ckp_file, not both")
    objective.check_settings(cfg)
    if cfg.trainable == "lora" and not cfg.lora_target_modules:
        raise UserError("--lora_target_modules is empty; name the layers that get adapters (e.g. q,k,v,o,wi,wo)")
    if not 0 <= cfg.lora_dropout < 1 or not 0 <= cfg.dpo_label_smoothing < 0.5:
        raise UserError("--lora_dropout must be in [0, 1) and --dpo_label_smoothing in [0, 0.5)")
    base = cfg.best.split("/")[0] if cfg.best.startswith(("exact_match/", "reward/")) else cfg.best
    if base not in objective.eval_metric_names:
        raise UserError(f"--best_metric={cfg.best_metric!r} is not reported by --objective={cfg.objective}; "
                        f"choose one of {', '.join(objective.eval_metric_names)} (or exact_match/TASK)")
    if not cfg.train_file:
        raise UserError("--train_file is empty; give a parquet file, a list of files or a glob")
    if isinstance(cfg.train_file, dict):
        bad = [w for w in cfg.train_file.values() if not w > 0]
        if bad:
            raise UserError(f"--train_file weights must be > 0, got {bad[0]}; drop a source instead of weighting it 0")
    if cfg.max_tokens_per_batch and cfg.max_tokens_per_batch < 2 * cfg.max_seq_len:
        raise UserError(f"--max_tokens_per_batch={cfg.max_tokens_per_batch} is below 2 x --max_seq_len "
                        f"({2 * cfg.max_seq_len}): the longest row would not fit; raise it or lower --max_seq_len")
    if not 0 <= cfg.validation_split < 1:
        raise UserError(f"--validation_split must be in [0, 1), got {cfg.validation_split}")
    if cfg.validation_split and cfg.validation_file:
        raise UserError("give --validation_file or --validation_split, not both (--validation_file='' to split "
                        "the training data)")
    if cfg.early_stopping_patience and not (cfg.validation_file or cfg.validation_split):
        raise UserError("--early_stopping_patience needs an evaluation: give --validation_file or --validation_split")


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
    """Defaults (or `base`) < YAML file `config` < `profile` < `flags`.

    The profile re-splits the effective batch the file and flags give (batch_size_per_gpu x
    gradient_accumulation_steps); every other flag wins over the profile."""
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
    cfg = merge(cfg, flags, "the command line")
    if cfg.profile == "low_memory":
        cfg = merge(low_memory(cfg), {k: v for k, v in flags.items() if k not in BATCH_KEYS}, "the command line")
    return cfg


# The settings a profile derives from the effective batch rather than taking as given.
BATCH_KEYS = ("batch_size_per_gpu", "gradient_accumulation_steps")


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
        optimizer="adamw" if cfg.fsdp else "adafactor",  # under FSDP2, AdamW's state is sharded instead
        keep_in_memory=False,
        dataloader_buffer_size=min(cfg.dataloader_buffer_size, 2000),
        num_workers=min(cfg.num_workers, 1),
        empty_cache_steps=cfg.empty_cache_steps or 100,
        log_memory=True,
    )
