"""Start-up checks: everything that can be seen before any work, so a mistake costs seconds, not
hours. They return the plan of the run: its sources and files, objective, regression prompts,
optimizer steps and the state to resume from.

Checked: the launch's engine; every input file readable with the objective's columns and a row
to train on (not only empty rows, nor DPO pairs with equal answers), and enough of them for a
step; the columns rewards read; the regression prompts; output, state and tokenizer directories
writable; room for a train state and a model; the tokenizer loads and fits a starting checkpoint
(and a model_size the checkpoint overrides is a warning); the state to resume from is intact and
fits this run, or a fresh run may start over the states there.
"""
import dataclasses
import os

import torch
from transformers import T5Config

import model.checkpoint as ckpt
from config import T5ModelConfig, TrainConfig
from model.conversations import has_conversations
from model.dataset import epoch_batches, get_pieces, get_sources, has_usable_row, open_data, text_columns
from model.objectives import get_objective
from model.policy import optimizer_state_bytes, shape_model
from model.regression import load_checks
from utils.errors import UserError
from utils.files import check_data_file, free_bytes, probe_writable
from utils.tokenizer import load_tokenizer


@dataclasses.dataclass
class Plan:
    """What the start-up checks found: the run's data, objective, steps and where it resumes."""
    sources: list
    train_files: list[str]
    objective: object
    checks: list  # regression prompts
    pieces: list
    total_steps: int
    resume_from: str | None  # the train state to resume from; None: a fresh run


def check_engine_environment(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the engine a launch asks for through the environment, checked before Accelerate
    starts. DeepSpeed is refused on every device type (on a CPU Accelerate would end in an
    ImportError). An Accelerate FSDP2 config (ACCELERATE_USE_FSDP with FSDP_VERSION=2) is this
    trainer's --fsdp: `full`, or `grad_op` where it keeps the weights after forward; the trainer
    shards the model itself on every device, so Accelerate is told not to (it would on GPUs only,
    and save FSDP's pickled sharded states)."""
    from accelerate.utils import parse_flag_from_env
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        raise UserError("DeepSpeed is not supported: its checkpoints load with pickle (torch.load with "
                        "weights_only=False), which a chatlm train state never does; FSDP2 --fsdp=grad_op shards "
                        "gradients and optimizer state as ZeRO-2 does (--fsdp=full the weights too, as ZeRO-3): "
                        "accelerate launch --config_file configs/accelerate/fsdp2.yaml")
    if not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return cfg
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise UserError(f"the launch config asks for FSDP version {version}; chatlm shards with FSDP2: set "
                        "fsdp_version: 2 (configs/accelerate/fsdp2.yaml), or launch with DDP and --fsdp=full")
    if parse_flag_from_env("FSDP_OFFLOAD_PARAMS"):
        raise UserError("fsdp_offload_params is not supported: set it to false in the launch config")
    if parse_flag_from_env("FSDP_ACTIVATION_CHECKPOINTING"):
        raise UserError("fsdp_activation_checkpointing is not read: set it to false in the launch config and "
                        "pass --gradient_checkpointing=True")
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    mode = "grad_op" if reshard in ("false", "shard_grad_op", "2") else "full"
    if cfg.fsdp and cfg.fsdp != mode:
        raise UserError(f"--fsdp={cfg.fsdp}, but the launch config asks for FSDP2 {mode} (fsdp_reshard_after_forward: "
                        f"{reshard}); drop --fsdp or change the config")
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    return dataclasses.replace(cfg, fsdp=mode)


def check_accelerator(accelerator) -> None:
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):  # set some other way than the environment
        raise UserError(f"Accelerate's {accelerator.distributed_type.value} is not used: launch with "
                        "configs/accelerate/fsdp2.yaml or ddp.yaml (with --fsdp=full or grad_op to shard)")


def check_rows(path: str, what: str, objective) -> None:
    """The file has the objective's columns (or conversations) and a row it trains on."""
    pf = open_data(path, objective)
    if not has_conversations(pf.schema_arrow.names):
        check_data_file(path, objective.columns, what=what)
        if objective.no_usable_row and not has_usable_row(path, objective):
            raise UserError(f"--{what} {path} has no usable row: {objective.no_usable_row}")
    elif not has_usable_row(path, objective):
        raise UserError(f"--{what} {path} has no usable conversation: each has no assistant turn, an assistant turn "
                        "before any user turn, an unknown role or an empty turn"
                        + (", or does not end with a user turn (DPO)" if objective.name == "dpo" else "")
                        + "; check the file (docs/training.md#conversations)")


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


def overridden_shape(cfg: TrainConfig) -> str | None:
    """A model_size given with a checkpoint directory of another shape: the checkpoint's shape
    trains, and the user is told the flag they typed was not used."""
    if not (cfg.model_size and os.path.isdir(cfg.start_from)):
        return None

    def shape(c) -> str:
        return (f"d_model {c.d_model}, d_ff {c.d_ff}, {c.num_heads} heads of {c.d_kv}, "
                f"{c.num_layers}+{c.num_decoder_layers} layers, {c.feed_forward_proj}")
    preset, saved = T5ModelConfig.preset(cfg.model_size), T5Config.from_pretrained(cfg.start_from)
    if shape(preset) == shape(saved):
        return None
    return (f"--model_size={cfg.model_size} ({shape(preset)}) is not the shape of {cfg.start_from} "
            f"({shape(saved)}): training goes on in the checkpoint's shape; drop --model_size")


def check_free_space(cfg: TrainConfig, model) -> None:
    """Room for one more train state and one model directory, from the parameter count."""
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


def count_total_steps(cfg: TrainConfig, pieces, sources, processes: int, updates_per_batch: int,
                      rows_per_batch: int | None = None) -> int:
    """Optimizer steps of the whole run, for the schedule and the progress bar.

    Every process steps until the one with the most batches is done; accumulation runs on
    across epoch ends. Exact when no row is empty (empty rows can only make it shorter).
    """
    workers = max(1, cfg.num_workers)

    def per_epoch(epoch):
        return max(epoch_batches(pieces, sources, range(rank * workers, (rank + 1) * workers),
                                 processes * workers, cfg.dataloader_buffer_size,
                                 rows_per_batch or cfg.batch_size_per_gpu,
                                 cfg.seed, epoch, cfg.mix_strategy, cfg.validation_split)
                   for rank in range(processes))

    # Every epoch has as many batches, unless the validation split moves rows between windows.
    batches = sum(map(per_epoch, range(cfg.epochs))) if cfg.validation_split else per_epoch(0) * cfg.epochs
    total = batches // cfg.gradient_accumulation_steps * updates_per_batch
    if total == 0:
        raise UserError(f"the training data gives {batches} batches in all, fewer than one "
                        f"optimizer step of {cfg.gradient_accumulation_steps}; lower "
                        "--gradient_accumulation_steps or --batch_size_per_gpu, or give more rows")
    return min(total, cfg.max_steps) if cfg.max_steps else total


def estimate_budget_steps(cfg: TrainConfig, plan: Plan, stream, processes: int, logger) -> int:
    """Optimizer steps with token-budget batches or conversations (several rows from one): the
    parquet rows a batch holds in the first two windows of this process's first shard, applied
    to every shard's rows. An estimate (the run ends when the data does; the schedule holds its
    floor beyond)."""
    rows, batches = set(), 0
    shard = stream.rank * stream.workers
    for batch, (window, _) in stream.one_pass(shard, [cfg.seed, 0], None, 0, 0):
        if window >= 2:
            break
        rows.update(batch["row_index"].tolist())
        batches += 1
    per_batch = max(1, round(len(rows) / max(1, batches)))
    steps = count_total_steps(cfg, plan.pieces, plan.sources, processes, plan.objective.updates_per_batch, per_batch)
    why = f"token budget {cfg.max_tokens_per_batch}" if cfg.max_tokens_per_batch else "conversations"
    logger.info(f"{why}: about {per_batch} parquet rows a batch in the first windows, so about {steps} optimizer "
                "steps")
    return steps


def preflight(cfg: TrainConfig, run, logger) -> Plan:
    """The start-up checks (see the module docstring), on every process; what needs the disk is
    checked by the main process and its verdict shared."""
    processes = run.accelerator.num_processes
    sources = get_sources(cfg.train_file)
    train_files = [f for src in sources for f in src.files]
    objective = get_objective(cfg)
    for path in train_files:
        check_rows(path, "train_file", objective)
    text_columns(objective, train_files)  # what the rewards read is there
    for what in ("validation_file", "test_file"):
        if getattr(cfg, what):
            check_rows(getattr(cfg, what), what, objective)
            text_columns(objective, [getattr(cfg, what)])  # evaluation's rewards read them too
    checks = load_checks(cfg.regression_file) if cfg.regression_file else []
    pieces = get_pieces(train_files, sources)
    # With a token budget the rows per batch depend on the lengths: until the tokenizer can
    # tell, count with one row a batch, which only checks there is a step's worth.
    total_steps = count_total_steps(cfg, pieces, sources, processes, objective.updates_per_batch,
                                    1 if cfg.max_tokens_per_batch else None)
    has_tokenizer = os.path.isfile(os.path.join(cfg.tokenizer_dir, "tokenizer.json"))
    tokenizer = load_tokenizer(cfg.tokenizer_dir) if has_tokenizer else None
    if cfg.start_from:
        flag = "--init_from" if cfg.init_from else "--finetune_from_ckp_file"
        for warning in (check_finetune_source(cfg.start_from, tokenizer, cfg.tokenizer_dir, flag),
                        overridden_shape(cfg)):
            if warning:
                logger.warning(warning)
    if cfg.is_keep_training is True and tokenizer is None:
        raise UserError(f"no tokenizer in {cfg.tokenizer_dir}: a resume needs the tokenizer its state was "
                        "trained with; pass --tokenizer_dir")
    with torch.device("meta"):  # the shape and size of the model, without its memory
        model = shape_model(cfg, len(tokenizer) if tokenizer is not None else cfg.vocab_size)
    settings = ckpt.state_settings(cfg, model.config, tokenizer, pieces, sources, processes) \
        if tokenizer is not None else None
    resume_from = run.on_main(check_disk, cfg, model, settings, logger)
    return Plan(sources, train_files, objective, checks, pieces, total_steps, resume_from)


def check_disk(cfg: TrainConfig, model, settings: dict | None, logger) -> str | None:
    """Directories writable, room to save, and the state to resume from (main process)."""
    probe_writable(cfg.output_dir, "output_dir")
    probe_writable(cfg.train_state_dir, "train_state_dir")
    if not os.path.isfile(os.path.join(cfg.tokenizer_dir, "tokenizer.json")):
        probe_writable(cfg.tokenizer_dir, "tokenizer_dir")
    check_free_space(cfg, model)
    path = None
    if cfg.is_keep_training:
        path = ckpt.find_resumable(cfg.train_state_dir, cfg.trust_pickled_state, logger.warning)
        if path is None and cfg.is_keep_training == "auto":
            logger.info(f"no train state in {cfg.train_state_dir}: starting a new run (--is_keep_training=auto)")
        elif path is None:
            raise UserError(f"no intact train state in {cfg.train_state_dir} to resume from; run without "
                            "--is_keep_training (or with --is_keep_training=auto) or point --train_state_dir at one")
        elif settings is None:
            raise UserError(f"no tokenizer in {cfg.tokenizer_dir}: a resume needs the tokenizer its state was "
                            "trained with; pass --tokenizer_dir")
    if path is not None:
        ckpt.check_resumable(path, settings)
        return path
    states = ckpt.list_states(cfg.train_state_dir)
    if states and not cfg.overwrite:
        raise UserError(f"{cfg.train_state_dir} already holds train states (latest "
                        f"{os.path.basename(states[-1])}); resume with --is_keep_training=True, "
                        "pass --overwrite=True to start over, or choose another --train_state_dir")
    return None
