"""What trains, and the model it is kept close to: built in one place, saved in one place.

- What trains (`trainable`): `all`; `decoder` (the shared embedding, tied to the output head, and
  the encoder frozen: the original's finetune); `lora` (peft adapters on `lora_target_modules`,
  checked against the model's linear layers). The optimizer and clipping see only trainable
  parameters.
- The reference, for objectives that need one (DPO, kl_beta, GRPO with grpo_beta): under LoRA the
  policy itself with its adapters disabled (no second copy in memory); otherwise a frozen copy of
  the starting model, made before gradient checkpointing and the peft wrap so it is the plain
  model, in eval mode, without gradients, out of the optimizer, and prepared by Accelerate in
  evaluation mode so it runs under the policy's precision.
- Dropout off (`disable_dropout`; auto: for objectives that compare the policy with itself or a
  reference), so the difference they train on is not noise.
- The engine (model/engine.py): the model whole on every process (one process, DDP) or sharded
  (FSDP2), and the reference alike; the policy asks it for the whole weights and optimizer state
  a train state holds, and for the whole model a save writes.
- The save: a directory that AutoModelForSeq2SeqLM and AutoTokenizer load alone; under LoRA the
  merged model, and the adapter in peft's format beside it.
- The optimizer and the learning-rate schedule of what trains.
"""
import copy
import math
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import T5Config
from transformers.optimization import Adafactor

from config import T5ModelConfig, TrainConfig
from model.chat_model import ATTENTION_KERNELS, TextToTextModel, disable_dropout, get_generation_config, get_t5_config
from utils.errors import UserError
from utils.files import atomic_dir, describe_error


class Reference:
    """The model the policy is kept close to, read only: a frozen copy of the starting model, or
    (under LoRA) the policy itself with its adapters disabled. Always in eval mode, no grad."""

    def __init__(self, model: torch.nn.Module | None = None, policy=None):
        self.model, self.policy = model, policy  # exactly one is set

    @torch.no_grad()
    def __call__(self, **inputs):
        if self.model is not None:
            return self.model(**inputs)
        policy = self.policy()  # the unwrapped peft model
        training = policy.training
        policy.eval()
        try:
            with policy.disable_adapter():
                return policy(**inputs)
        finally:
            policy.train(training)

    def head_weight(self) -> torch.Tensor:
        """The output head's weight (under LoRA the policy's: the head carries no adapter). Under
        FSDP2 it is gathered whole (collective: every process computes the loss together)."""
        weight = (self.model if self.model is not None else self.policy()).get_output_embeddings().weight.detach()
        return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def freeze_for_finetune(model: TextToTextModel) -> None:
    """Freeze the shared embedding (tied to the output head) and the whole encoder."""
    model.shared.requires_grad_(False)
    model.encoder.requires_grad_(False)


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


def set_trainable(model: TextToTextModel, cfg: TrainConfig):
    """`model` with what trains set: decoder freezes the rest, lora wraps it in peft adapters."""
    if cfg.trains == "decoder":
        freeze_for_finetune(model)
    elif cfg.trains == "lora":
        from peft import LoraConfig, get_peft_model  # only LoRA runs pay for importing peft
        model = get_peft_model(model, LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="SEQ_2_SEQ_LM",
            target_modules=lora_targets(model, cfg.lora_target_modules)))
    return model


def shape_model(cfg: TrainConfig, vocab_size: int):
    """The model before any weights are loaded (the checkpoint's shape when starting from a
    directory), with what trains set: built on the meta device, it tells a run's shape and size."""
    if os.path.isdir(cfg.start_from):
        config = T5Config.from_pretrained(cfg.start_from)
    else:
        config = get_t5_config(T5ModelConfig.preset(cfg.preset), vocab_size)
    return set_trainable(TextToTextModel(config), cfg)


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


class Policy:
    """The model being trained (prepared by Accelerate) and its reference (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, objective, tokenizer, accelerator, engine, logger):
        self.cfg, self.accelerator, self.engine = cfg, accelerator, engine
        if cfg.start_from:  # on resume too: the checkpoint gives the shape, the state the weights
            model = load_start_model(cfg.start_from, cfg, tokenizer)
            logger.info(f"starting from {cfg.start_from}")
        else:
            model = TextToTextModel(get_t5_config(T5ModelConfig.preset(cfg.preset), len(tokenizer)))
        model.generation_config = get_generation_config(cfg.max_seq_len)
        # Always set: transformers gives a new or loaded model sdpa wherever torch has it, so a
        # setting applied only when it differs from "eager" left every run on sdpa.
        model.set_attn_implementation(ATTENTION_KERNELS[cfg.attn_implementation])
        self.t5_config = model.config  # the shape a whole copy is built in (full_model)
        # Before checkpointing and the peft wrap: the copy is the plain model.
        frozen = copy.deepcopy(model).eval().requires_grad_(False) \
            if objective.needs_reference and cfg.trains != "lora" else None
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
            if cfg.trains == "lora":
                model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        self.model = set_trainable(model, cfg)
        if cfg.dropout_off:
            # Against a reference, or sampled in eval mode and scored in train mode, dropout is
            # noise in the very difference being trained (TRL's disable_dropout, on by default).
            switched = disable_dropout(self.model)
            if switched:
                logger.info(f"dropout off in {switched} modules (--disable_dropout={cfg.disable_dropout})")
        self.model = engine.shard(self.model)  # before the optimizer: it holds the shards
        if frozen is not None:
            frozen = engine.place(frozen)  # on the device, or sharded like the policy
        self.reference = None
        if objective.needs_reference:
            self.reference = Reference(model=frozen) if frozen is not None else Reference(policy=self.unwrapped)
        trainable = sum(p.numel() for p in self.trainable_params())
        total = sum(p.numel() for p in self.model.parameters())
        held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in self.model.parameters())
        shape = self.t5_config
        logger.info(f"model: d_model {shape.d_model}, {shape.num_layers}+{shape.num_decoder_layers} layers, "
                    f"{total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable ({cfg.trains}), "
                    f"objective {objective.name}" + (", with a reference" if self.reference else "")
                    + f"; engine {engine.name}" + (f", {held / 1e6:.2f}M parameters held by this process"
                                                   if held != total else ""))

    def prepare(self, optimizer, eval_loader):
        """The model, optimizer and evaluation loader through the engine (accelerator.prepare:
        DDP, device, precision, compile); the frozen reference through prepare_model in evaluation
        mode (as TRL): the policy's precision, no DDP wrapper. The training loader is not
        prepared: each process reads its own shard already."""
        acc = self.accelerator
        self.model, optimizer, eval_loader = self.engine.prepare(self.model, optimizer, eval_loader)
        if self.reference is not None and self.reference.model is not None:
            self.reference.model = acc.prepare_model(self.reference.model, evaluation_mode=True)
        return optimizer, eval_loader

    def unwrapped(self):
        """The model being trained without its DDP and compile wrappers (its parameters are the
        same tensors): what is saved and loaded, under plain parameter names."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def trainable_params(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    # ---- the whole model and its state, whatever the engine ------------------------------
    def model_state(self) -> dict | None:
        """Collective: the whole weights under plain names on the main process (None elsewhere)."""
        return self.engine.model_state(self.unwrapped())

    def load_model_state(self, state: dict) -> None:
        """Collective: the whole weights (each tied tensor under any one of its names) into the model."""
        from model.engine import tied_names, with_aliases
        model = self.unwrapped()
        self.engine.load_model_state(model, with_aliases(state, tied_names(model)))

    def optimizer_state(self, optimizer) -> dict | None:
        """Collective: the whole optimizer state, numbered as an unsharded optimizer's, on the main process."""
        return self.engine.optimizer_state(self.unwrapped(), optimizer)

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        """Collective: a numbered whole optimizer state into the optimizer."""
        self.engine.load_optimizer_state(self.unwrapped(), optimizer, state)

    def set_gradient_sync(self, sync: bool) -> None:
        self.engine.set_gradient_sync(self.model, sync)

    def clip_grad_norm(self, params: list, max_norm: float) -> torch.Tensor:
        """Clip the gradients of `params` to `max_norm` over all processes; their norm before (a device scalar)."""
        return self.engine.clip_grad_norm(params, max_norm)

    def build_plain(self) -> torch.nn.Module:
        """A new model of this run's shape with what trains set (its weights initialised anew)."""
        return set_trainable(TextToTextModel(copy.deepcopy(self.t5_config)), self.cfg)

    def save_together(self, run, path: str, tokenizer) -> None:
        """Collective (through `run`): the whole model gathered by every process, the main one
        writes the directory."""
        run.wait()
        model = self.engine.full_model(self.unwrapped(), self.build_plain)
        run.on_main(self.save, path, tokenizer, model)

    def save(self, path: str, tokenizer, model=None) -> None:
        """A directory that AutoModelForSeq2SeqLM and AutoTokenizer load with nothing else
        (main process only; the trainer calls it through Run.on_main): of `model`, a whole one,
        or the one being trained."""
        model = model if model is not None else self.unwrapped()
        with atomic_dir(path) as tmp:
            if hasattr(model, "merge_and_unload"):  # a peft model
                # The merged model for every tool, and the adapter in peft's format beside it. The
                # merge runs on a copy: merging in place and back would change the weights' bits.
                model.save_pretrained(os.path.join(tmp, "adapter"))
                copy.deepcopy(model).merge_and_unload().save_pretrained(tmp, safe_serialization=True)
            else:
                model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)


# ---- optimisation of what trains -------------------------------------------------------------

def get_optimizer(params: list, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or Adafactor with a fixed, really applied learning rate. Only trainable parameters
    go in: a finetune's frozen encoder holds no optimizer state."""
    if cfg.optimizer == "adafactor":
        # relative_step=False: the original left it True, which ignores lr altogether.
        return Adafactor(params, lr=cfg.learn_rate, relative_step=False, scale_parameter=False,
                         warmup_init=False)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # layer norms
    # fused: one kernel for all parameters instead of a loop of small ones, and it takes
    # `found_inf` (a device tensor) so a non-finite step is skipped without the host asking.
    fused = bool(params) and all(p.device.type in fused_devices() for p in params) or None
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learn_rate, fused=fused)


def fused_devices() -> tuple:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:
        return ("cuda",)


def skips_on_device(optimizer) -> bool:
    """Whether the optimizer skips a step itself when its `found_inf` is 1 (fused AdamW)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper
    return isinstance(inner, torch.optim.AdamW) and bool(inner.defaults.get("fused"))


def step_divisor(norm: torch.Tensor, max_norm: float, scale: float) -> torch.Tensor:
    """What fused AdamW divides each gradient by (its `grad_scale`) to take the step that
    multiplying the gradients by `scale` and then clipping them to `max_norm` (0: no clipping)
    would; `norm` is the scaled gradients' norm. torch's clip_grad_norm_ multiplies by
    min(1, max_norm / (norm + 1e-6)): this is that factor times `scale`, inverted,
    max(norm + 1e-6, max_norm) / (max_norm * scale) (three operators). A float32 device scalar
    (NaN with clipping where the norm is not; the step is skipped by `found_inf` anyway)."""
    if not max_norm:
        return torch.full((), 1.0 / scale, dtype=torch.float32, device=norm.device)
    return (norm.float() + 1e-6).clamp_(min=max_norm).div_(max_norm * scale)


class NonFiniteSteps:
    """Which optimizer steps had a non-finite gradient norm, counted without a host read.

    `record` is called at each step and reads nothing on the host: a step is skipped by the
    optimizer (`found_inf`), and each step's norm is kept, as the device tensor clipping returned,
    until `take`, which the loop calls only where it syncs anyway (log steps, saves, the end). It
    reads them all at once and counts on the host: bad steps in a row now; the step (1-based) at
    which the row first reached `limit` (0: not yet); whether a finite step came before that; bad
    steps since the last take; the last bad step; its gradient norm. Counting on the device took
    35 operators a step (kernel launches on a GPU); keeping the norm takes none, and the step's
    `found_inf` three.
    """

    KEEP = 1024  # norms kept as separate tensors before they are stacked into one (8 bytes a step)

    def __init__(self, device, limit: int):
        self.limit, self.device = limit, device
        self.norms, self.steps, self.row = [], [], 0

    def record(self, grad_norm: torch.Tensor, step: int) -> torch.Tensor:
        """Keep step `step`'s (0-based) norm; returns 1.0 where it was not finite, else 0.0 (a
        float32 device scalar)."""
        self.norms.append(grad_norm)  # clipping made it without a graph
        self.steps.append(step)
        if len(self.norms) > self.KEEP:  # a run that seldom logs: no tensor a step piles up
            self.norms = [self.stacked()]
        # x * 0 is 0 for a finite x and NaN for inf and NaN: three operators, where isfinite's
        # own decomposition (x == x, |x| != inf, and) and the not take five.
        return grad_norm.mul(0).ne(0).float()

    def stacked(self) -> torch.Tensor:
        return torch.cat([n.reshape(-1).double() for n in self.norms])

    def take(self) -> dict:
        """The counts since the last take (one host read), and start the next window."""
        norms = self.stacked().tolist() if self.norms else []
        seen = {"in_a_row": self.row, "limit_reached_at": 0, "finite_before": False, "skipped": 0, "last": 0,
                "norm": 0.0}
        for step, norm in zip(self.steps, norms):
            bad = not math.isfinite(norm)
            self.row = self.row + 1 if bad else 0
            if not bad and not seen["limit_reached_at"]:
                seen["finite_before"] = True
            if not seen["limit_reached_at"] and self.row >= self.limit:
                seen["limit_reached_at"] = step + 1
            if bad:
                seen["skipped"] += 1
                seen["last"], seen["norm"] = step + 1, norm
        seen["in_a_row"] = self.row
        self.norms, self.steps = [], []
        return seen


def optimizer_state_bytes(model: torch.nn.Module, optimizer: str) -> int:
    """Bytes of optimizer state for the trainable parameters (fp32): AdamW keeps two copies,
    Adafactor a row and a column vector per matrix."""
    total = 0
    for p in model.parameters():
        if p.requires_grad:
            total += 8 * p.numel() if optimizer == "adamw" else 4 * (sum(p.shape[-2:]) if p.ndim >= 2 else p.numel())
    return total


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
