"""The engine: how the model being trained is spread over the processes.

- `Replicated` (one process, or DDP): every process holds the whole model, its gradients and the
  optimizer state; Accelerate's `prepare` places the model and wraps it in DDP, whose all-reduce
  `accumulate` skips between the micro-batches of an accumulation.
- `Sharded` (`--fsdp=full` or `--fsdp=grad_op`): torch's FSDP2 (`fully_shard`) on each T5 block,
  then on the root (the shared embedding, tied to the head, is used by four modules: the
  encoder or decoder stack cannot be wrapped on its own). Each process holds 1/N of the
  parameters, gradients and optimizer state; a block's weights are gathered for its forward and
  backward. `full` frees them again after the forward (the least memory); `grad_op` keeps them
  from forward to backward: ZeRO-2's profile (sharded gradients and optimizer state, whole
  weights during a step), with fewer gathers. Gradients are reduce-scattered only at the last
  micro-batch of an accumulation. bf16 is FSDP2's MixedPrecisionPolicy (weights gathered in
  bf16, gradients reduced in fp32) under Accelerate's autocast, as the other engine runs it.
  The trainer shards the model itself, outside `accelerator.prepare`: Accelerate 1.15 switches to
  FSDP only for GPU processes (on a CPU an FSDP config trains as DDP, and a sharded model passed
  to `prepare` there is wrapped in DDP and fails), and its sharded save_state is
  torch.distributed.checkpoint's, which unpickles its metadata. So the one setting runs alike
  under any launch, on CPUs (gloo) and GPUs (NCCL).

Both engines read and write one train-state format (model/checkpoint.py): the whole weights, and
the whole optimizer state in the layout an unsharded optimizer has (its parameters numbered in
the optimizer's order), gathered by all processes together (torch.distributed.checkpoint's
get_state_dict, with full_state_dict) and written by the main process, with no pickle. A state
saved under one engine resumes under the other, and its weights and optimizer state load into
any number of processes. Every method marked "collective" must be called by all processes at
the same point (the rule of model/run.py).
"""
import copy
import warnings

import torch
from transformers.models.t5.modeling_t5 import T5Block

FSDP_MODES = ("", "full", "grad_op")


def grad_norm(params: list) -> torch.Tensor:
    """The norm of the gradients of `params` as clipping measures it, over all processes under
    either engine (DDP's are already averaged; FSDP2's shards are DTensors, their norm made whole),
    the gradients left as they are."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def tied_names(model: torch.nn.Module) -> list[list[str]]:
    """Groups of state-dict names that are one tensor (T5's shared embedding, the encoder's and
    decoder's embed_tokens, and the head), each sorted: a weights file keeps the first name of
    a group (as safetensors' save_model does), a load gives the tensor to every name."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [sorted(group) for group in names.values() if len(group) > 1]


def without_aliases(state: dict, groups: list[list[str]]) -> dict:
    """`state` with each tied tensor under its first name only."""
    drop = {name for group in groups for name in group[1:] if group[0] in state}
    return {k: v for k, v in state.items() if k not in drop}


def with_aliases(state: dict, groups: list[list[str]]) -> dict:
    """`state` with each tied tensor under every name of its group (whichever name it was saved under)."""
    state = dict(state)
    for group in groups:
        present = next((state[name] for name in group if name in state), None)
        if present is not None:
            state.update({name: present for name in group})
    return state


def optimizer_order(model: torch.nn.Module, optimizer) -> list[str]:
    """The names of the optimizer's parameters in its order: the numbering of an unsharded
    optimizer's state_dict (groups in order, each group's parameters in order)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def by_index(state: dict, order: list[str]) -> dict:
    """A name-keyed optimizer state (torch.distributed.checkpoint's) in the numbered layout."""
    index = {name: i for i, name in enumerate(order)}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in state["param_groups"]]}


def by_name(state: dict, order: list[str]) -> dict:
    """A numbered optimizer state (a train state's) keyed by parameter name."""
    return {"state": {order[i]: value for i, value in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}


def inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer


class Replicated:
    """One process, or DDP through Accelerate: every process holds the whole model."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.name = "ddp" if accelerator.num_processes > 1 else "one process"

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # accelerator.prepare places it

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen model (the reference) on the device."""
        return model.to(self.accelerator.device)

    def prepare(self, model, optimizer, eval_loader):
        return self.accelerator.prepare(model, optimizer, eval_loader)

    def set_gradient_sync(self, model, sync: bool) -> None:
        pass  # Accelerate's accumulate() skips DDP's all-reduce between micro-batches itself

    def clip_grad_norm(self, params: list, max_norm: float) -> torch.Tensor:
        # One norm for all processes (gradients are already averaged), so all decide alike.
        return self.accelerator.clip_grad_norm_(params, max_norm)

    def model_state(self, model) -> dict | None:
        """Collective: the whole weights on the main process (None elsewhere)."""
        return model.state_dict() if self.accelerator.is_main_process else None

    def load_model_state(self, model, state: dict) -> None:
        model.load_state_dict(state, strict=True)

    def optimizer_state(self, model, optimizer) -> dict | None:
        """Collective: the whole optimizer state, numbered, on the main process (None elsewhere)."""
        return optimizer.state_dict() if self.accelerator.is_main_process else None

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def full_model(self, model, build) -> torch.nn.Module | None:
        """Collective: the whole model as a plain module on the main process (here the model
        itself), None elsewhere."""
        return model if self.accelerator.is_main_process else None


class Sharded:
    """FSDP2 over all processes (see the module docstring)."""

    def __init__(self, mode: str, accelerator):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy
        self.accelerator, self.mode = accelerator, mode
        self.name = f"fsdp2 {mode}"
        self.mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
        self.reshard_after_forward = mode == "full"
        # Weights gathered in bf16, gradients reduced in fp32; the sharded weights, their
        # gradients and the optimizer stay fp32.
        self.mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if accelerator.mixed_precision == "bf16" else MixedPrecisionPolicy()

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Collective: `model` sharded in place over the processes (every process holds the same
        whole model before: the same seed, or the same checkpoint)."""
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        settings = dict(mesh=self.mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=self.mp_policy)
        for module in model.modules():
            if isinstance(module, T5Block):
                fully_shard(module, **settings)
        fully_shard(model, **settings)
        # generate() gathers the root's weights (the embedding and head) like forward, and runs
        # on every process until all are done: a process that stopped early would leave the
        # others waiting in a gather. transformers' generate reads this attribute (set by its own
        # FSDP2 integration) to pass synced_gpus=True; under peft the T5 model inside generates.
        register_fsdp_forward_method(model, "generate")
        for module in model.modules():
            if hasattr(module, "generate"):
                module._is_fsdp_managed_module = True
        return model

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """Collective: a frozen model (the reference) sharded like the policy."""
        return self.shard(model)

    def prepare(self, model, optimizer, eval_loader):
        acc = self.accelerator
        # Accelerate's autocast on forward, and no DDP wrapper (evaluation_mode): the model is sharded.
        model = acc.prepare_model(model, device_placement=False, evaluation_mode=True)
        optimizer, eval_loader = acc.prepare(optimizer, eval_loader)
        return model, optimizer, eval_loader

    def set_gradient_sync(self, model, sync: bool) -> None:
        """Reduce-scatter the gradients only at the last micro-batch of an accumulation (the others
        add to the whole gradients each process keeps meanwhile)."""
        model.set_requires_gradient_sync(sync)

    def clip_grad_norm(self, params: list, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # the norm over all shards, on every process
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def full_options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def model_state(self, model) -> dict | None:
        """Collective: the whole weights, gathered onto the main process's CPU (None elsewhere)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        state = get_model_state_dict(model, options=self.full_options())
        return state if self.accelerator.is_main_process else None

    def load_model_state(self, model, state: dict) -> None:
        """Collective: every process gives the whole weights and keeps its shard."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))

    def optimizer_state(self, model, optimizer) -> dict | None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        state = get_optimizer_state_dict(model, inner(optimizer), options=self.full_options())
        return by_index(state, optimizer_order(model, inner(optimizer))) if self.accelerator.is_main_process \
            else None

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        """Collective: every process gives the whole numbered state and keeps its shard. Model and
        optimizer are set apart: set_state_dict with an empty model state on some processes hangs."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        optimizer = inner(optimizer)
        set_optimizer_state_dict(model, optimizer, by_name(state, optimizer_order(model, optimizer)),
                                 options=StateDictOptions(full_state_dict=True))
        for group in optimizer.param_groups:  # it hands tuples (AdamW's betas) back as lists
            group.update({k: tuple(group[k]) for k, v in optimizer.defaults.items()
                          if isinstance(v, tuple) and isinstance(group.get(k), list)})

    def full_model(self, model, build) -> torch.nn.Module | None:
        """Collective: the whole model as a plain module on the main process's CPU (None
        elsewhere): `build()` makes its skeleton on the meta device, the gathered weights fill it."""
        state = self.model_state(model)
        if state is None:
            return None
        with torch.device("meta"):
            plain = build()
        plain.load_state_dict(with_aliases(state, tied_names(plain)), strict=True, assign=True)
        plain.tie_weights()
        plain.generation_config = copy.deepcopy(getattr(model, "generation_config", plain.generation_config))
        return plain.eval()


def get_engine(cfg, accelerator, logger):
    """The engine of `cfg.fsdp` for this launch."""
    if cfg.fsdp and accelerator.num_processes > 1:
        # FSDP2 warns that a block returns a view (T5's position bias, which nothing changes in
        # place; the losses and gradients equal DDP's: tests/test_engines.py).
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        return Sharded(cfg.fsdp, accelerator)
    if cfg.fsdp:
        logger.warning(f"--fsdp={cfg.fsdp} with one process has nothing to shard: training unsharded")
    return Replicated(accelerator)
