"""Train states: everything a resume needs, in files that run no code when read, verified before use.

    train_state_dir/step_00001000/
      model.safetensors        the whole weights (each tied tensor once)
      optimizer.pt             the whole optimizer state, numbered as an unsharded optimizer's:
                               tensors and numbers, read with torch.load(weights_only=True)
      rng.rank<N>.safetensors  RNG states of process N (torch, CUDA, numpy, python)
      state.json               progress, every process's data position, the settings a resume keeps
      manifest.json            size and sha256 of every other file; written last

Accelerate's save_state is not used: it pickles registered objects and RNG states, and its
load_state unpickles them with weights_only=False (a file planted in a state directory
would run code on resume) and skips RNG files it cannot read without a word. Nor is
torch.distributed.checkpoint's sharded format (FSDP's): it unpickles its `.metadata`. Under every
engine (model/engine.py) the processes gather the whole weights and optimizer state and the main
process writes these files, so a state saved under FSDP2 resumes under DDP and back, and its
weights and optimizer state load into any number of processes.

A state is written to `step_N.tmp` and renamed when complete; a state saved again at the
same step swaps in whole (`step_N` -> `step_N.old`, `.tmp` -> `step_N`, `.old` removed).
Resume takes the newest state whose manifest matches its files, recovers the leftovers of
an interrupted swap, and moves damaged newer states aside so rotation never counts them.
`state.json` names its `format`; a state of another format is refused with one line.

`StateStore` (below) is a run's use of these files: the save all processes make together, the
load into the run's pieces, rotation once a later step was finite, and setting aside the states
of a run that diverged. Every library error on the way is one line (UserError) that says what to do.
"""
import functools
import hashlib
import json
import os
import random
import re
import shutil

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

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
def save_model_weights(state: dict, tied: list[list[str]], path: str) -> None:
    """The whole weights `state`, each tied tensor once (T5 ties its embeddings and head)."""
    from model.engine import without_aliases
    save_file({k: v.contiguous() for k, v in without_aliases(state, tied).items()}, path, metadata={"format": "pt"})


def save_optimizer(state: dict, path: str) -> None:
    torch.save(state, path)


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


def read_weights(path: str) -> dict:
    """The weights file: tensors by name (each tied tensor under one of its names)."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read the weights in {path} ({str(err).splitlines()[0][:300]}); "
                        "resume from another state or start over") from None


def load_model_weights(policy, state: dict, path: str) -> None:
    """Collective: the whole weights read from `path` into the policy's model."""
    try:
        policy.load_model_state(state)
    except (RuntimeError, KeyError, ValueError) as err:
        raise UserError(f"cannot load the weights in {path} ({str(err).splitlines()[0][:300]}); "
                        "resume from another state or start over") from None


def read_optimizer(path: str) -> dict:
    """The optimizer file: tensors and numbers only (weights_only), never code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"state", "param_groups"} <= state.keys():
            raise ValueError("not an optimizer state")
        return state
    except Exception as err:  # noqa: BLE001 (an UnpicklingError is what a planted payload gives)
        raise UserError(f"refusing to load {path}: {str(err).splitlines()[0][:200]} (it holds more than "
                        "tensors and numbers); resume from another state or start over") from None


def load_optimizer(policy, optimizer, state: dict, path: str) -> None:
    """Collective: the whole optimizer state read from `path` into the run's optimizer."""
    try:
        policy.load_optimizer_state(optimizer, state)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as err:
        raise UserError(f"the optimizer state in {path} does not fit this model ({str(err)[:300]}); resume with "
                        "the settings it was saved with (--optimizer, --trainable) or start over") from None


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


# ---- the state store: one run's train states ----------------------------------------------------

# Settings that decide which rows form which batch: a resume must keep them.
DATA_ORDER_KEYS = ("batch_size_per_gpu", "dataloader_buffer_size", "seed", "max_seq_len", "group_by_length",
                   "num_shards", "validation_split", "mix_strategy", "weights", "last_turn_only")
# What a state saved before a key existed had, in effect.
DATA_ORDER_DEFAULTS = {"validation_split": 0.0, "mix_strategy": "first_exhausted", "weights": None,
                       "last_turn_only": False}
MODEL_SHAPE_KEYS = ("d_model", "d_ff", "num_heads", "d_kv", "num_layers", "num_decoder_layers", "vocab_size")


@functools.lru_cache(maxsize=4)
def weights_hash(path: str) -> str | None:
    """sha256 of the weights a run starts from (None for a new model)."""
    if not path:
        return None
    file = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    return sha256(file) if os.path.isfile(file) else None


def vocab_hash(tokenizer) -> str:
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]


def state_settings(cfg, model_config, tokenizer, pieces, sources, processes: int) -> dict:
    """What a resumed run must share with the run that saved the state."""
    lora = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "target_modules": sorted(cfg.lora_target_modules)} \
        if cfg.trains == "lora" else None
    return {"model": {k: getattr(model_config, k) for k in MODEL_SHAPE_KEYS}, "vocab": vocab_hash(tokenizer),
            "objective": cfg.objective, "trainable": cfg.trains, "lora": lora, "optimizer": cfg.optimizer,
            "init_from": {"path": cfg.start_from, "sha256": weights_hash(cfg.start_from)},
            **{k: getattr(cfg, k) for k in DATA_ORDER_KEYS if k not in ("num_shards", "weights")},
            "weights": {src.label: src.weight for src in sources} if len(sources) > 1 else None,
            "num_shards": processes * max(1, cfg.num_workers),
            "rows_per_row_group": [p.num_rows for p in pieces],
            "num_processes": processes, "num_workers": cfg.num_workers}


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


def check_resumable(path: str, settings: dict) -> None:
    """The state at `path` (new or legacy format) fits a run with these settings."""
    if is_legacy(path):
        saved = load_json(os.path.join(path, "chatlm_state.json"))
        saved["trainable"] = "decoder" if saved.get("is_finetune") else "all"
        keys = DATA_ORDER_KEYS + ("trainable",)
        check_settings(path, {k: saved.get(k, DATA_ORDER_DEFAULTS.get(k)) for k in keys},
                       {k: settings[k] for k in keys})
        return
    saved = load_json(os.path.join(path, STATE_JSON))
    if saved.get("format") != FORMAT:
        raise UserError(f"{path} is a train state of format {saved.get('format')!r}; this chatlm reads format "
                        f"{FORMAT}: resume it with the chatlm that saved it, or start over")
    check_settings(path, saved.get("settings") or {}, settings)


class StateStore:
    """train_state_dir for one run: save a state all processes write together, load one, keep the
    newest keep_latest_n_ckp, set aside those saved after the last finite step.

    Saves and loads take the run's pieces as arguments; the store keeps only which states are not
    yet confirmed by a later finite step (rotation waits for that, so a state whose weights
    diverge is never the one left).
    """

    def __init__(self, cfg, run, logger, settings: dict):
        self.cfg, self.run, self.logger, self.settings = cfg, run, logger, settings
        self.unconfirmed: list[str] = []

    def save(self, policy, optimizer, stream, scaler) -> str:
        """Collective: everything a resume needs to train_state_dir/step_N. A failure on any
        process (a full disk, a lost mount) is one error line; the partial directory is removed
        and earlier states stay intact."""
        from model.engine import tied_names
        run, progress = self.run, self.run.progress
        progress.wall_seconds = run.wall_seconds()
        data = run.gather(stream.state_dict())
        # The whole weights and optimizer state, gathered by every process onto the main one.
        weights, optimizer_state = policy.model_state(), policy.optimizer_state(optimizer)
        final = state_path(self.cfg.train_state_dir, progress.step)
        tmp = final + ".tmp"

        def fail(reason):
            return (f"could not save the train state {final}: {reason}; free some space or fix the path, "
                    "then resume with --is_keep_training=True (the earlier states are intact)")

        def cleanup():
            shutil.rmtree(tmp, ignore_errors=True)

        def part(write):
            try:
                write()
                error = None
            except Exception as err:  # noqa: BLE001 (OSError, torch's RuntimeError, SafetensorError)
                error = err
            run.fail_together(error, fail, cleanup, tmp)

        def start():
            if run.is_main:
                cleanup()
                os.makedirs(tmp)

        def files():
            if run.is_main:
                save_model_weights(weights, tied_names(policy.unwrapped()), os.path.join(tmp, MODEL_FILE))
                save_optimizer(optimizer_state, os.path.join(tmp, OPTIMIZER_FILE))
                save_json({"format": FORMAT, "step": progress.step, "progress": progress.state_dict(),
                           "data": data, "settings": self.settings,
                           # fp16's loss scale: numbers only
                           "scaler": scaler.state_dict() if scaler is not None else None,
                           "torch_threads": torch.get_num_threads()}, os.path.join(tmp, STATE_JSON))
            save_rng(os.path.join(tmp, rng_file(run.accelerator.process_index)))

        def finish():
            if run.is_main:
                write_manifest(tmp)
                swap_in(tmp, final)

        for write in (start, files, finish):
            part(write)
        self.unconfirmed.append(final)
        self.logger.info(f"saved train state {final}")
        return final

    def load(self, path: str, policy, optimizer, stream, scaler) -> None:
        """Collective: restore a verified state of this format into the run's pieces. Every process
        reads the files first; one it cannot use, on any process, is one line from the main
        process before any weights move."""
        acc, run = self.run.accelerator, self.run
        error = weights = optimizer_state = None
        try:
            saved = self.read_progress(path, stream, scaler)
            load_rng(os.path.join(path, rng_file(acc.process_index)))
            weights = read_weights(os.path.join(path, MODEL_FILE))
            optimizer_state = read_optimizer(os.path.join(path, OPTIMIZER_FILE))
        except UserError as err:
            error = err
        run.raise_together(error)
        try:
            load_model_weights(policy, weights, os.path.join(path, MODEL_FILE))
            load_optimizer(policy, optimizer, optimizer_state, os.path.join(path, OPTIMIZER_FILE))
        except UserError as err:
            error = err
        run.raise_together(error)
        self.apply_optimizer_settings(optimizer)
        threads = saved.get("torch_threads")
        if acc.device.type == "cpu" and threads and threads != torch.get_num_threads():
            self.logger.warning(f"{path} was saved with {threads} torch threads, this run has "
                                f"{torch.get_num_threads()}: on a CPU the resumed run then differs from an "
                                f"uninterrupted one in the last bits (OMP_NUM_THREADS={threads} avoids that)")

    def read_progress(self, path: str, stream, scaler) -> dict:
        """state.json into progress, this process's data position and the loss scale; its content."""
        acc, progress = self.run.accelerator, self.run.progress
        saved = load_json(os.path.join(path, STATE_JSON))
        try:
            data = saved["data"]
            if len(data) != acc.num_processes:
                raise UserError(f"{path} was saved by {len(data)} processes, this run has {acc.num_processes}; "
                                "resume with the same number of processes (the data position is per process)")
            progress.load_state_dict(saved["progress"])
            stream.load_state_dict(data[acc.process_index])
            if scaler is not None and saved.get("scaler"):
                scaler.load_state_dict({k: v for k, v in saved["scaler"].items()
                                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            if isinstance(err, UserError):
                raise
            raise UserError(f"{path}/{STATE_JSON} is not a chatlm train state ({err!r}); resume from "
                            "another state or start over") from None
        return saved

    def load_legacy(self, path: str, optimizer, stream) -> None:
        """A state of the old format, through Accelerate's pickle loader: only with trust_pickled_state."""
        acc, progress = self.run.accelerator, self.run.progress
        self.logger.warning(f"loading {path} in the old pickle format (--trust_pickled_state=True)")

        class Receiver:  # takes what Accelerate unpickles for each registered object
            state = None

            def state_dict(self):
                return {}

            def load_state_dict(self, state):
                self.state = state

        scheduler, old_progress = Receiver(), Receiver()
        acc.register_for_checkpointing(scheduler, old_progress)
        try:
            acc.load_state(path)
        except Exception as err:  # noqa: BLE001 (Accelerate raises whatever its loaders raise)
            from utils.files import describe_error
            raise UserError(f"cannot load the old train state {path} ({describe_error(err)})") from None
        old = dict(old_progress.state)
        old["best_score"] = old.pop("best_bleu", None)
        positions, workers = old.pop("positions", []), old.pop("next_workers", [])
        progress.load_state_dict(old)
        rank = acc.process_index
        stream.load_state_dict({"epoch": progress.epoch, "positions": positions[rank] if positions else {},
                                "next_worker": workers[rank] if workers else 0})
        self.apply_optimizer_settings(optimizer)

    def apply_optimizer_settings(self, optimizer) -> None:
        """Settings that may change on resume win over the ones saved in the optimizer state."""
        if self.cfg.optimizer == "adamw":
            optimizer.param_groups[0]["weight_decay"] = self.cfg.weight_decay

    def confirm(self) -> None:
        """A later step was finite: the states saved before it count, and the oldest beyond
        keep_latest_n_ckp go (main process)."""
        if not self.unconfirmed:
            return
        self.unconfirmed = []
        if self.run.is_main:
            for old in list_states(self.cfg.train_state_dir)[:-self.cfg.keep_latest_n_ckp]:
                shutil.rmtree(old, ignore_errors=True)

    def set_aside_unconfirmed(self) -> str:
        """The steps after the states saved since the last finite step were not finite: rename
        those states `.diverged` (main process); returns how to go on."""
        if self.run.is_main:
            for path in self.unconfirmed:
                if os.path.isdir(path):
                    shutil.rmtree(path + ".diverged", ignore_errors=True)
                    os.replace(path, path + ".diverged")
                    self.logger.warning(f"{path}: the steps after it were not finite; renamed {path}.diverged")
        states = list_states(self.cfg.train_state_dir)
        return (f"resume from {os.path.basename(states[-1])} with --is_keep_training=True" if states
                else "start over")

    def clear(self) -> None:
        """A fresh run with --overwrite: the states of an earlier run go (main process)."""
        if self.run.is_main:
            for old in list_all(self.cfg.train_state_dir):
                shutil.rmtree(old, ignore_errors=True)
