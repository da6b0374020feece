"""Train states: everything a resume needs, in files that run no code when read, verified before use.

    train_state_dir/step_00001000/
      model.safetensors        weights
      optimizer.pt             optimizer state: tensors and numbers, read with torch.load(weights_only=True)
      rng.rank<N>.safetensors  RNG states of process N (torch, CUDA, numpy, python)
      state.json               progress, every process's data position, the settings a resume keeps
      manifest.json            size and sha256 of every other file; written last

Accelerate's save_state is not used: it pickles registered objects and RNG states, and its
load_state unpickles them with weights_only=False (a file planted in a state directory
would run code on resume) and skips RNG files it cannot read without a word.

A state is written to `step_N.tmp` and renamed when complete; a state saved again at the
same step swaps in whole (`step_N` -> `step_N.old`, `.tmp` -> `step_N`, `.old` removed).
Resume takes the newest state whose manifest matches its files, recovers the leftovers of
an interrupted swap, and moves damaged newer states aside so rotation never counts them.
"""
import hashlib
import json
import os
import random
import re
import shutil

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file, save_model

from utils.errors import UserError

STATE_PREFIX = "step_"
FORMAT = 2
MANIFEST, STATE_JSON, MODEL_FILE, OPTIMIZER_FILE = "manifest.json", "state.json", "model.safetensors", "optimizer.pt"
LEGACY_MARKERS = ("chatlm_state.json", "custom_checkpoint_0.pkl", "random_states_0.pkl")
LEFTOVERS = (".tmp", ".old")


def rng_file(rank: int) -> str:
    return f"rng.rank{rank}.safetensors"


def state_path(train_state_dir: str, step: int) -> str:
    return os.path.join(train_state_dir, f"{STATE_PREFIX}{step:08d}")


def step_of(path: str) -> int | None:
    m = re.fullmatch(STATE_PREFIX + r"(\d+)(\.tmp|\.old)?", os.path.basename(path))
    return int(m.group(1)) if m else None


def list_states(train_state_dir: str) -> list[str]:
    """`step_N` directories, oldest first (leftovers `.tmp`/`.old` and `.damaged` are not listed)."""
    if not os.path.isdir(train_state_dir):
        return []
    names = [n for n in os.listdir(train_state_dir) if re.fullmatch(STATE_PREFIX + r"\d+", n)]
    return [os.path.join(train_state_dir, n) for n in sorted(names, key=lambda n: int(n[len(STATE_PREFIX):]))]


def list_all(train_state_dir: str) -> list[str]:
    """Every state-like directory, leftovers included."""
    if not os.path.isdir(train_state_dir):
        return []
    return [os.path.join(train_state_dir, n) for n in os.listdir(train_state_dir) if n.startswith(STATE_PREFIX)]


# ---- writing ------------------------------------------------------------------------------
def save_model_weights(model: torch.nn.Module, path: str) -> None:
    save_model(model, path)  # T5 ties its embeddings: save_model stores a shared tensor once


def save_optimizer(optimizer, path: str) -> None:
    torch.save(optimizer.state_dict(), path)


def save_rng(path: str) -> None:
    """This process's RNG states: torch CPU and CUDA as byte tensors, numpy's and python's as ints."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
               "python": torch.tensor(py_state, dtype=torch.int64)}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    meta = {"numpy": json.dumps([np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]),
            "python": json.dumps([py_version, py_gauss])}
    save_file(tensors, path, metadata=meta)


def save_json(obj: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str) -> None:
    """Size and sha256 of every file; written last, so a state with a manifest is complete."""
    files = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name != MANIFEST and os.path.isfile(path):
            files[name] = {"size": os.path.getsize(path), "sha256": sha256(path)}
    save_json({"format": FORMAT, "files": files}, os.path.join(directory, MANIFEST))
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_in(tmp: str, final: str) -> None:
    """Put the complete state `tmp` at `final`; a state already there stays until the swap."""
    if os.path.isdir(final):
        shutil.rmtree(final + ".old", ignore_errors=True)
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    shutil.rmtree(final + ".old", ignore_errors=True)


# ---- checking -----------------------------------------------------------------------------
def is_legacy(path: str) -> bool:
    """A state written before this format: Accelerate's save_state with pickled custom states."""
    return not os.path.isfile(os.path.join(path, MANIFEST)) and any(
        os.path.isfile(os.path.join(path, m)) for m in LEGACY_MARKERS)


def problem(path: str, num_processes: int | None = None) -> str | None:
    """Why the state at `path` cannot be used, or None when every file matches the manifest."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        return "incomplete (no manifest: the save was interrupted)"
    try:
        with open(manifest_path, encoding="utf-8") as f:
            files = json.load(f)["files"]
        assert isinstance(files, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return "its manifest is unreadable"
    for name in (MODEL_FILE, OPTIMIZER_FILE, STATE_JSON):
        if name not in files:
            return f"{name} is not in its manifest"
    if num_processes is not None:
        for rank in range(num_processes):
            if rng_file(rank) not in files:
                return f"{rng_file(rank)} is not in its manifest (saved by fewer processes?)"
    for name, entry in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != entry.get("size"):
            return f"{name} has {os.path.getsize(file)} bytes, its manifest says {entry.get('size')} (truncated?)"
        if sha256(file) != entry.get("sha256"):
            return f"{name} does not match its checksum (changed after it was saved)"
    return None


def find_resumable(train_state_dir: str, trust_pickled_state: bool, warn) -> str | None:
    """The newest usable state in `train_state_dir`, or None.

    Damaged states newer than it are named through `warn` and renamed `step_N.damaged`, so
    that rotation never counts them; the complete leftover of an interrupted swap is renamed
    into place. A state in the pickled format is taken only with `trust_pickled_state`.
    """
    by_step: dict[int, list[str]] = {}
    for path in list_all(train_state_dir):
        step = step_of(path)
        if step is not None and os.path.isdir(path):
            by_step.setdefault(step, []).append(path)
    # A complete .tmp is the newest save of its step; .old is what a swap was replacing.
    order = {".tmp": 0, "": 1, ".old": 2}
    for step in sorted(by_step, reverse=True):
        for path in sorted(by_step[step], key=lambda p: order[p[len(_base(p)):]]):
            if is_legacy(path):
                if not trust_pickled_state:
                    raise UserError(
                        f"{path} is a train state in the old format, whose pickle files can run code when "
                        "loaded; resume from it only if you trust where it came from, with "
                        "--trust_pickled_state=True (the states saved after it use the safe format)")
                return path
            why = problem(path)
            if why is None:
                return recover(path, by_step[step], warn)
            if path.endswith(".tmp"):
                shutil.rmtree(path, ignore_errors=True)  # an interrupted save: the usual leftover of a kill
                if why.startswith("incomplete"):
                    continue
            warn(f"train state {path} is damaged: {why}; an older state is used")
            if path == _base(path):
                _set_aside(path)
                warn(f"{path} was renamed {os.path.basename(path)}.damaged: delete it when you have looked")
    return None


def _base(path: str) -> str:
    return path[:-len(".tmp")] if path.endswith(LEFTOVERS) else path


def _set_aside(path: str) -> None:
    target = path + ".damaged"
    shutil.rmtree(target, ignore_errors=True)
    os.replace(path, target)


def recover(path: str, same_step: list[str], warn) -> str:
    """Put the intact state `path` at its final name, finishing an interrupted swap."""
    final = _base(path)
    if path != final:
        warn(f"recovered train state {final} from {os.path.basename(path)} (a save was interrupted)")
        if path.endswith(".tmp"):
            swap_in(path, final)
        else:
            if os.path.isdir(final):
                _set_aside(final)
            os.replace(path, final)
    for other in same_step:
        if other.endswith(LEFTOVERS) and os.path.isdir(other):
            shutil.rmtree(other, ignore_errors=True)
    return final


# ---- reading ------------------------------------------------------------------------------
def load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        if not isinstance(obj, dict):
            raise ValueError("not an object")
        return obj
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({err}); resume from another state or start over") from None


def load_model_weights(model: torch.nn.Module, path: str) -> None:
    try:
        load_model(model, path, strict=True)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise UserError(f"cannot load the weights in {path} ({str(err).splitlines()[0]}); "
                        "resume from another state or start over") from None


def load_optimizer(optimizer, path: str, device) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (an UnpicklingError is what a planted payload gives)
        raise UserError(f"refusing to load {path}: {str(err).splitlines()[0][:200]} (it holds more than "
                        "tensors and numbers); resume from another state or start over") from None
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise UserError(f"the optimizer state in {path} does not fit this model ({err}); resume with the "
                        "settings it was saved with (--optimizer, --trainable) or start over") from None


def load_rng(path: str) -> None:
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
        name, pos, has_gauss, gauss = json.loads(meta["numpy"])
        py_version, py_gauss = json.loads(meta["python"])
        torch.set_rng_state(tensors["torch"])
        np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate((py_version, tuple(tensors["python"].tolist()), py_gauss))
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")),
                                           key=lambda k: int(k.split(".")[1]))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, RuntimeError) as err:
        raise UserError(f"cannot restore the RNG states from {path} ({str(err).splitlines()[0]}); an exact "
                        "resume needs them: resume from another state or start over") from None
