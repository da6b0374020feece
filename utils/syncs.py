"""Counting the calls that make the host wait for the device.

On a GPU, reading a tensor's value on the host (`.item()`, `float(t)`, `bool(t)`, `.tolist()`,
`.cpu()`, `.numpy()`, `.to("cpu")`) waits until every kernel queued before it has run: the
Python side stops queueing work and the GPU idles while Python catches up. On a CPU there is
no queue, so these calls cost nothing there and a timing cannot find them; counting them can.
`HostSyncs` counts them under a `TorchFunctionMode` (every tensor method passes through it),
whichever device the tensors are on, so a count taken on a CPU is the count a GPU run makes.
"""
import collections
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

READS = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__", "cpu",
                   "numpy"})


def is_host_copy(func, args, kwargs) -> bool:
    """`tensor.to("cpu")`: a copy to the host wherever the tensor is. (A `.to(device)` with the
    tensor's own device, as library code writes it, is one on a CPU and none on a GPU: not counted.)"""
    if getattr(func, "__name__", "") != "to":
        return False
    target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, str)), None))
    return isinstance(target, str) and torch.device(target).type == "cpu"


def on_the_host_by_design(frames) -> bool:
    """Reads of tensors that live on the host whatever the device: torch.optim's own step
    counters (capturable=False keeps them there; a fused optimizer keeps them beside the
    parameters) and the DataLoader's seed, drawn once an epoch from the CPU generator."""
    return any("/torch/optim/" in f.filename or "/torch/utils/data/" in f.filename for f in frames[-4:])


class HostSyncs(TorchFunctionMode):
    """`with HostSyncs() as syncs:` counts host reads of tensors made inside (`syncs.count`);
    `syncs.where` keeps the first frames of each, to say which line made it."""

    def __init__(self, keep_stacks: bool = False):
        super().__init__()
        self.count, self.keep_stacks = 0, keep_stacks
        self.where = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in READS or is_host_copy(func, args, kwargs):
            frames = traceback.extract_stack(limit=8)[:-1]
            if on_the_host_by_design(frames):
                return func(*args, **kwargs)
            self.count += 1
            if self.keep_stacks:
                self.where[" <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in frames[::-1][:4])
                           + f" ({name})"] += 1
        return func(*args, **kwargs)

    def take(self) -> int:
        """The count since the last take, and start again."""
        count, self.count = self.count, 0
        return count


class Operators(TorchDispatchMode):
    """`with Operators() as ops:` counts the ATen operators dispatched inside (`ops.count`, and by
    name, `ops.names`): each is at least one kernel launch on a GPU, where a small model waits on
    the host that launches them."""

    def __init__(self):
        super().__init__()
        self.count, self.names = 0, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        self.names[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
