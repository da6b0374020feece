"""ChatTrainer: pre-training, finetuning and exact resume on HuggingFace Accelerate.

Order of a run: accelerator -> tokenizer -> data -> model -> optimizer -> resume -> loop.
The loop is forward, backward, step, then maybe_log / maybe_evaluate / maybe_save.
"""
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import signal
import time

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, gather_object, set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers.optimization import Adafactor

from config import T5ModelConfig, TrainConfig
from model.chat_model import TextToTextModel, get_generation_config, get_t5_config
from model.dataset import EvalSet, TrainStream, collate, count_rows, describe, get_eval_loader, get_train_loader
from utils.errors import UserError
from utils.files import atomic_dir, expand_files, open_parquet
from utils.logging import get_logger, memory_usage
from utils.metrics import bleu4, exact_match_by_group
from utils.tokenizer import load_tokenizer, train_tokenizer

STATE_PREFIX = "step_"
META_FILE = "chatlm_state.json"
# Settings that decide which rows form which batch: a resume must keep them.
DATA_ORDER_KEYS = ("batch_size_per_gpu", "dataloader_buffer_size", "seed", "max_seq_len", "group_by_length",
                   "num_shards")


@dataclasses.dataclass
class TrainingProgress:
    """Where training stands; saved with every train state and restored on resume."""
    epoch: int = 0
    step: int = 0  # optimizer steps
    micro_step: int = 0  # batches consumed
    samples: int = 0
    tokens: int = 0  # non-pad tokens, prompts and responses, all processes
    rows_skipped: int = 0  # empty prompt/response rows dropped by the data stream
    best_bleu: float = -1.0
    # Per process: {shard: (window, batches done)} of the current epoch, and the worker whose
    # batch comes next. Filled from every process just before a save.
    positions: list = dataclasses.field(default_factory=list)
    next_workers: list = dataclasses.field(default_factory=list)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


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
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learn_rate)


def resolve_mixed_precision(value: str) -> str:
    if value != "auto":
        return value
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def list_states(train_state_dir: str) -> list[str]:
    """Complete train states, oldest first (a save in progress ends in .tmp and is not listed)."""
    states = [d for d in glob.glob(os.path.join(train_state_dir, STATE_PREFIX + "*"))
              if re.fullmatch(STATE_PREFIX + r"\d+", os.path.basename(d))
              and os.path.isfile(os.path.join(d, META_FILE))]
    return sorted(states, key=lambda d: int(os.path.basename(d)[len(STATE_PREFIX):]))


def freeze_for_finetune(model: TextToTextModel) -> None:
    """Freeze the shared embedding (tied to the output head) and the whole encoder."""
    model.shared.requires_grad_(False)
    model.encoder.requires_grad_(False)


def load_model_for_finetune(path: str, cfg: TrainConfig, tokenizer) -> TextToTextModel:
    """A saved model directory, or a .safetensors state dict for the model_size preset."""
    vocab_size = len(tokenizer)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{path} holds no saved model (config.json missing); "
                            "point --finetune_from_ckp_file at a directory written by `train`")
        if os.path.isfile(os.path.join(path, "tokenizer.json")) and \
                load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
            raise UserError(f"{path} was trained with another tokenizer than {cfg.tokenizer_dir}; "
                            f"pass --tokenizer_dir={path}")
        model = TextToTextModel.from_pretrained(path)
    elif os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise UserError(f"{path} is not a .safetensors file or a model directory; "
                            "give the directory a previous `train` saved (e.g. model_save/best)")
        model = TextToTextModel(get_t5_config(T5ModelConfig.preset(cfg.model_size), vocab_size))
        try:
            missing, unexpected = model.load_state_dict(load_file(path), strict=False)
        except RuntimeError as err:
            raise UserError(f"{path} does not fit --model_size={cfg.model_size} with this tokenizer "
                            f"({str(err).splitlines()[1].strip()}); pick the model_size it was trained with") from None
        missing = [k for k in missing if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                                                   "lm_head.weight")]
        if missing or unexpected:
            raise UserError(f"{path} does not fit --model_size={cfg.model_size}: "
                            f"{len(missing)} missing and {len(unexpected)} unexpected tensors")
    else:
        raise UserError(f"--finetune_from_ckp_file={path} not found; give a model directory written by `train`")
    if model.config.vocab_size < vocab_size:
        raise UserError(f"checkpoint {path} has {model.config.vocab_size} embeddings but the tokenizer has "
                        f"{vocab_size} tokens; use the tokenizer it was trained with (--tokenizer_dir)")
    return model


class StopRequest:
    """Ctrl+C or SIGTERM: finish the optimizer step, save the train state, exit. No questions."""

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


class ChatTrainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    # ---- build -------------------------------------------------------------------------
    def build(self):
        cfg = self.cfg
        self.train_files = expand_files(cfg.train_file)
        self.accelerator = Accelerator(
            # Several processes on a machine without a GPU (`accelerate launch --multi_gpu` or
            # torchrun there): Accelerate needs cpu=True to join them over gloo instead of
            # running each as a separate single-process job.
            cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
            mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False),
            log_with=None if cfg.log_with == "none" else cfg.log_with,
            project_dir=cfg.output_dir)
        acc = self.accelerator
        self.logger = get_logger(cfg.output_dir, acc.is_main_process)
        self.check_train_state_dir()
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
        self.model = self.get_model()
        self.stream = self.get_stream()
        self.loader = get_train_loader(self.stream, cfg.num_workers, pin_memory=acc.device.type == "cuda")
        self.idle_batch = collate([[self.tokenizer.eos_token_id]], [[self.tokenizer.eos_token_id]])
        self.eval_set = EvalSet(cfg.validation_file, self.tokenizer, cfg.max_seq_len, cfg.max_eval_rows) \
            if cfg.validation_file else None
        if cfg.test_file:
            open_parquet(cfg.test_file)  # read only at the end: a bad path must fail now, not in hours
        self.total_steps = self.estimate_total_steps()
        self.optimizer = get_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, get_lr_lambda(self.total_steps, cfg.warmup_steps, cfg.div_factor))
        eval_loader = get_eval_loader(self.eval_set, cfg.batch_size_per_gpu) if self.eval_set else None
        # The training loader is not prepared: each process already reads its own shard, and
        # Accelerate would otherwise read every batch on one process and send slices around.
        # The scheduler is not prepared either: Accelerate steps a prepared one once per process.
        self.model, self.optimizer, self.eval_loader = acc.prepare(self.model, self.optimizer, eval_loader)
        self.progress = TrainingProgress()
        # Registered before any load_state: the original registered after loading, and its
        # second resume failed.
        acc.register_for_checkpointing(self.scheduler, self.progress)
        if acc.num_processes > 1:
            # Stop flags travel on a CPU group so the check never waits on the GPU queue.
            self.flag_group = torch.distributed.new_group(backend="gloo")
        self.maybe_resume()
        if cfg.log_with != "none":
            acc.init_trackers("chatlm", config={k: str(v) if isinstance(v, list) else v
                                                for k, v in dataclasses.asdict(cfg).items()})

    def check_train_state_dir(self):
        cfg, states = self.cfg, list_states(self.cfg.train_state_dir)
        if cfg.is_keep_training:
            if not states:
                raise UserError(f"no train state in {cfg.train_state_dir} to resume from; "
                                "run without --is_keep_training or point --train_state_dir at one")
        elif states and not cfg.overwrite:
            raise UserError(f"{cfg.train_state_dir} already holds train states (latest "
                            f"{os.path.basename(states[-1])}); resume with --is_keep_training=True, "
                            "pass --overwrite=True to start over, or choose another --train_state_dir")

    def get_tokenizer(self):
        cfg, acc = self.cfg, self.accelerator
        with acc.main_process_first():
            if acc.is_main_process and not os.path.isfile(os.path.join(cfg.tokenizer_dir, "tokenizer.json")):
                self.logger.info(f"no tokenizer in {cfg.tokenizer_dir}: training one "
                                 f"(vocab_size={cfg.vocab_size}) on {', '.join(self.train_files)}")
                train_tokenizer(self.train_files, cfg.tokenizer_dir, cfg.vocab_size,
                                model_max_length=cfg.max_seq_len, seed=cfg.seed)
            return load_tokenizer(cfg.tokenizer_dir)

    def get_model(self) -> TextToTextModel:
        cfg = self.cfg
        if cfg.is_finetune:  # on resume too: the checkpoint gives the shape, the state the weights
            model = load_model_for_finetune(cfg.finetune_from_ckp_file, cfg, self.tokenizer)
            self.logger.info(f"finetuning {cfg.finetune_from_ckp_file}")
        else:
            model = TextToTextModel(get_t5_config(T5ModelConfig.preset(cfg.model_size), len(self.tokenizer)))
        model.generation_config = get_generation_config(cfg.max_seq_len)
        if cfg.is_finetune:
            freeze_for_finetune(model)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        shape = model.config
        self.logger.info(f"model: d_model {shape.d_model}, {shape.num_layers}+{shape.num_decoder_layers} layers, "
                         f"{total / 1e6:.1f}M parameters, {trainable / 1e6:.1f}M trainable")
        return model

    def get_stream(self) -> TrainStream:
        cfg, acc = self.cfg, self.accelerator
        keep_in_memory = cfg.keep_in_memory and acc.num_processes == 1
        if cfg.keep_in_memory and not keep_in_memory:
            self.logger.info("several processes: streaming the training data instead of holding it in memory")
        self.logger.info(f"training data: {describe(self.train_files)}, "
                         f"{'in memory' if keep_in_memory else 'streamed'}")
        return TrainStream(self.train_files, self.tokenizer, cfg.batch_size_per_gpu, cfg.max_seq_len,
                           cfg.dataloader_buffer_size, cfg.seed, acc.process_index, acc.num_processes,
                           cfg.num_workers, keep_in_memory, cfg.group_by_length)

    def estimate_total_steps(self) -> int:
        """Optimizer steps of the whole run, for the schedule and the progress bar."""
        cfg, acc = self.cfg, self.accelerator
        rows_per_process = count_rows(self.train_files) / acc.num_processes
        batches = math.ceil(rows_per_process / cfg.batch_size_per_gpu)
        per_epoch = max(1, batches // cfg.gradient_accumulation_steps)
        total = per_epoch * cfg.epochs
        return min(total, cfg.max_steps) if cfg.max_steps else total

    # ---- checkpoints -------------------------------------------------------------------
    def state_meta(self) -> dict:
        cfg, model = self.cfg, self.accelerator.unwrap_model(self.model).config
        shape = {k: getattr(model, k) for k in ("d_model", "d_ff", "num_heads", "num_layers", "num_decoder_layers")}
        return {"model": shape, "vocab_size": len(self.tokenizer),
                "batch_size_per_gpu": cfg.batch_size_per_gpu, "dataloader_buffer_size": cfg.dataloader_buffer_size,
                "seed": cfg.seed, "max_seq_len": cfg.max_seq_len, "group_by_length": cfg.group_by_length,
                "num_shards": self.stream.num_shards,
                "num_processes": self.accelerator.num_processes, "num_workers": cfg.num_workers,
                "is_finetune": cfg.is_finetune, "step": self.progress.step}

    def maybe_resume(self):
        if not self.cfg.is_keep_training:
            return
        state = list_states(self.cfg.train_state_dir)[-1]
        with open(os.path.join(state, META_FILE), encoding="utf-8") as f:
            saved = json.load(f)
        now = self.state_meta()
        if saved["model"] != now["model"]:
            raise UserError(f"{state} holds a model of shape {saved['model']}, this run builds {now['model']}; "
                            "resume with the --model_size (or --finetune_from_ckp_file) it was trained with")
        for key in ("vocab_size", "is_finetune"):
            if saved[key] != now[key]:
                raise UserError(f"{state} was saved with {key}={saved[key]}, this run has {now[key]}; "
                                f"resume with the same {'tokenizer' if key == 'vocab_size' else '--' + key}")
        for key in DATA_ORDER_KEYS:
            if saved[key] != now[key]:
                hint = ("the same number of processes x --num_workers "
                        f"({saved['num_processes']} x {saved['num_workers']})") if key == "num_shards" \
                    else f"--{key}={saved[key]}"
                raise UserError(f"{state} was saved with {key}={saved[key]}, this run has {now[key]}; "
                                f"an exact resume needs {hint}")
        self.accelerator.load_state(state)
        rank = self.accelerator.process_index
        positions = self.progress.positions[rank] if self.progress.positions else {}
        first = self.progress.next_workers[rank] if self.progress.next_workers else 0
        self.stream.set_epoch(self.progress.epoch, positions, first)
        self.logger.info(f"resumed from {state}: epoch {self.progress.epoch}, step {self.progress.step}, "
                         f"{self.progress.micro_step} batches done")

    def save_state(self):
        """Save everything a resume needs to train_state_dir/step_N, atomically."""
        acc, cfg, progress = self.accelerator, self.cfg, self.progress
        self.flush_counts()
        progress.positions = gather_object([dict(self.positions)])
        progress.next_workers = gather_object([self.next_worker])
        final = os.path.join(cfg.train_state_dir, f"{STATE_PREFIX}{progress.step:08d}")
        tmp = final + ".tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        acc.wait_for_everyone()
        try:
            acc.save_state(tmp)
            if acc.is_main_process:
                with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
                    json.dump(self.state_meta(), f, indent=1)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"could not save the train state to {final} ({err.strerror}); free space or fix the "
                            "path, the earlier states are intact") from None
        acc.wait_for_everyone()
        if acc.is_main_process:
            if os.path.isdir(final):  # the same step saved again: keep the old one until the swap
                os.replace(final, final + ".old")
            os.replace(tmp, final)
            shutil.rmtree(final + ".old", ignore_errors=True)
            for old in list_states(cfg.train_state_dir)[:-cfg.keep_latest_n_ckp]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        self.logger.info(f"saved train state {final}")

    def save_model(self, path: str):
        """A directory that AutoModelForSeq2SeqLM and AutoTokenizer load with nothing else."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            with atomic_dir(path) as tmp:
                acc.unwrap_model(self.model).save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
        acc.wait_for_everyone()

    # ---- training ----------------------------------------------------------------------
    def train(self):
        self.build()
        cfg, acc, progress = self.cfg, self.accelerator, self.progress
        if cfg.overwrite and not cfg.is_keep_training and acc.is_main_process:
            for old in list_states(cfg.train_state_dir):
                shutil.rmtree(old)
        self.stop = StopRequest(self.logger)
        self.bar = tqdm(total=self.total_steps, initial=progress.step, disable=not acc.is_main_process,
                        desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
        self.logger.info(f"training: {self.total_steps} optimizer steps, {acc.num_processes} process(es), "
                         f"device {acc.device}, mixed precision {acc.mixed_precision}")
        self.reset_meters()
        self.last_eval_step = -1
        try:
            finished = self.run_epochs()
            if finished and self.last_eval_step != progress.step:
                self.maybe_evaluate()
        finally:
            self.bar.close()
            self.stop.restore()
        self.save_state()  # also after a save at this step: epoch, best score and counts may have moved
        if finished:
            self.save_model(os.path.join(cfg.output_dir, "final"))
            self.logger.info(f"final model saved to {os.path.join(cfg.output_dir, 'final')}")
            if cfg.test_file:
                self.report(cfg.test_file)
        else:
            self.logger.info(f"stopped at step {progress.step}; continue with --is_keep_training=True")
        acc.end_training()
        return progress

    def run_epochs(self) -> bool:
        """Train until the last epoch or max_steps; False when a signal stopped the run."""
        cfg, progress = self.cfg, self.progress
        while progress.epoch < cfg.epochs and not self.reached_max_steps():
            self.positions = dict(self.stream.positions)
            self.next_worker = self.stream.first_worker
            stopped = self.run_epoch()
            if stopped:
                return False
            if self.reached_max_steps():
                break
            progress.epoch += 1
            self.stream.set_epoch(progress.epoch)
            self.positions, self.next_worker = {}, 0
            self.maybe_evaluate(end_of_epoch=True)
        return True

    def reached_max_steps(self) -> bool:
        return bool(self.cfg.max_steps) and self.progress.step >= self.cfg.max_steps

    def run_epoch(self) -> bool:
        """One pass over the data; True when a stop was requested (state not yet saved)."""
        acc, cfg, model, progress = self.accelerator, self.cfg, self.model, self.progress
        stop_pending = False
        model.train()
        for batch, active, stop_now in self.batches():
            stop_pending = stop_pending or stop_now
            if batch is None:
                # This process has run out of the epoch's data, others have not: it steps with
                # them on a batch that weighs nothing, so their rows are all trained on.
                batch, weight = self.idle_batch, 0.0
            else:
                self.record_batch(batch)
                # DDP averages over all processes; this makes it the mean over those with data.
                weight = acc.num_processes / active
            batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
            with acc.accumulate(model):
                loss = model(**batch).loss
                acc.backward(loss * weight)  # Accelerate divides by gradient_accumulation_steps: once
                if acc.sync_gradients and cfg.max_grad_norm:
                    self.grad_norm = acc.clip_grad_norm_(self.trainable_params(), cfg.max_grad_norm)
                self.optimizer.step()
                if acc.sync_gradients:
                    self.last_lr = self.scheduler.get_last_lr()[0]
                    if not acc.optimizer_step_was_skipped:
                        self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            if weight:
                self.loss_sum += loss.detach().float()
                self.loss_count += 1
            if not acc.sync_gradients:
                continue
            progress.step += 1
            self.bar.update(1)
            self.maybe_log()
            self.maybe_release_memory()
            if cfg.eval_steps and progress.step % cfg.eval_steps == 0:
                self.maybe_evaluate()
            if stop_pending:
                return True
            if progress.step % cfg.save_steps == 0:
                self.save_state()
            if self.reached_max_steps():
                return False
        return False

    def batches(self):
        """Yield (batch or None, processes with a batch, stop requested anywhere) until no
        process has data left.

        Processes stay in step: each micro-step they count who still has a batch and whether
        any received a stop signal (one small all-reduce on a CPU group).
        """
        it = iter(self.loader)
        while True:
            batch = next(it, None)
            active, stop = self.agree(batch is not None, self.stop.signum is not None)
            if not active:
                return
            yield batch, active, bool(stop)

    def agree(self, *flags: bool) -> list[int]:
        """Each flag summed over all processes."""
        if self.accelerator.num_processes == 1:
            return [int(f) for f in flags]
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        torch.distributed.all_reduce(t, group=self.flag_group)
        return t.tolist()

    def record_batch(self, batch: dict):
        """Take the metadata off the batch and count what it holds."""
        rows, (shard, window, done), skipped = batch.pop("row_index"), batch.pop("position"), batch.pop("skipped")
        self.positions[shard] = (window, done)
        workers = self.stream.workers
        self.next_worker = (shard - self.accelerator.process_index * workers + 1) % workers
        tokens = int(batch["attention_mask"].sum()) + int((batch["labels"] >= 0).sum())
        self.pending += np.array([tokens, len(rows), skipped])
        self.progress.micro_step += 1
        if self.cfg.trace_samples:
            path = os.path.join(self.cfg.output_dir, f"samples.rank{self.accelerator.process_index}.jsonl")
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"epoch": self.progress.epoch, "micro_step": self.progress.micro_step,
                                    "rows": rows.tolist()}) + "\n")

    def trainable_params(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def reset_meters(self):
        self.loss_sum, self.loss_count = torch.zeros((), device=self.accelerator.device), 0
        self.pending = np.zeros(3, dtype=np.int64)  # tokens, rows, empty rows skipped: not yet in progress
        self.meter = np.zeros(3, dtype=np.int64)  # the same, since the last log line
        self.grad_norm, self.last_lr = None, self.scheduler.get_last_lr()[0]
        self.timer = time.perf_counter()

    def flush_counts(self):
        """Add every process's counts to progress (a collective: all processes call it together)."""
        acc = self.accelerator
        counts = acc.reduce(torch.tensor(self.pending, device=acc.device), reduction="sum").cpu().numpy()
        self.progress.tokens += int(counts[0])
        self.progress.samples += int(counts[1])
        self.progress.rows_skipped += int(counts[2])
        self.meter += counts
        self.pending[:] = 0

    def maybe_log(self):
        acc, progress = self.accelerator, self.progress
        if progress.step % self.cfg.logging_steps:
            return
        self.flush_counts()
        tokens, rows, _ = self.meter.tolist()
        loss = acc.reduce(self.loss_sum / max(1, self.loss_count), reduction="mean").item()
        seconds = time.perf_counter() - self.timer
        metrics = {"train/loss": loss, "train/lr": self.last_lr, "train/tokens_per_s": tokens / seconds,
                   "train/samples_per_s": rows / seconds, "train/epoch": progress.epoch}
        if self.grad_norm is not None:
            metrics["train/grad_norm"] = float(self.grad_norm)
        line = (f"epoch {progress.epoch} step {progress.step}/{self.total_steps} loss {loss:.4f} "
                f"lr {self.last_lr:.3e} tokens/s {tokens / seconds:,.0f}")
        if self.grad_norm is not None:
            line += f" grad_norm {float(self.grad_norm):.3f}"
        if progress.rows_skipped:
            line += f" empty_rows_skipped {progress.rows_skipped}"
        if self.cfg.log_memory:
            memory = memory_usage()
            metrics.update({f"memory/{k}": v for k, v in memory.items()})
            line += " " + " ".join(f"{k} {v:.2f}" for k, v in memory.items())
        self.logger.info(line)
        self.bar.set_postfix(loss=f"{loss:.3f}")
        acc.log(metrics, step=progress.step)
        self.reset_meters()

    def maybe_release_memory(self):
        steps = self.cfg.empty_cache_steps
        if steps and self.progress.step % steps == 0 and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- evaluation --------------------------------------------------------------------
    def maybe_evaluate(self, end_of_epoch: bool = False):
        if self.eval_loader is None:
            return
        self.last_eval_step = self.progress.step
        started = time.perf_counter()
        result = evaluate(self.model, self.eval_loader, self.accelerator, self.tokenizer, self.cfg.max_seq_len)
        progress = self.progress
        metrics = {"eval/loss": result["loss"], "eval/perplexity": result["perplexity"], "eval/bleu4": result["bleu4"]}
        self.accelerator.log(metrics, step=progress.step)
        where = f"end of epoch {progress.epoch - 1}" if end_of_epoch else f"step {progress.step}"
        self.logger.info(f"eval at {where}: loss {result['loss']:.4f} perplexity {result['perplexity']:.2f} "
                         f"bleu4 {result['bleu4']:.4f} ({len(result['hypotheses'])} rows)")
        if result["bleu4"] > progress.best_bleu:
            progress.best_bleu = result["bleu4"]
            self.save_model(os.path.join(self.cfg.output_dir, "best"))
            self.logger.info(f"new best bleu4 {result['bleu4']:.4f}: model saved to "
                             f"{os.path.join(self.cfg.output_dir, 'best')}")
        self.model.train()
        self.timer += time.perf_counter() - started  # evaluation time is not training throughput

    def report(self, path: str) -> dict:
        """Score the trained model on a held-out file: BLEU-4, exact match per task, sample answers."""
        return score_file(self.model, self.accelerator, self.tokenizer, path, self.cfg.batch_size_per_gpu * 4,
                          self.cfg.max_seq_len, self.logger)


def score_file(model, accelerator: Accelerator, tokenizer, path: str, batch_size: int, max_seq_len: int, logger,
               max_rows: int = 10**9, samples: int = 5) -> dict:
    """evaluate() over a parquet file, then its report: with a `task` column, exact match per task."""
    has_task = "task" in open_parquet(path).schema_arrow.names
    dataset = EvalSet(path, tokenizer, max_seq_len, max_rows,
                      columns=("prompt", "response", "task") if has_task else ("prompt", "response"))
    loader = accelerator.prepare(get_eval_loader(dataset, batch_size))
    result = evaluate(model, loader, accelerator, tokenizer, max_seq_len)
    print_report(result, dataset, samples, logger)
    return result


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, tokenizer, max_new_tokens: int) -> dict:
    """Loss, perplexity and corpus BLEU-4 over every row of `loader` (an EvalSet), on all processes.

    Generated sequences differ in length between processes: they are padded to a common
    length before gathering (the original gathered ragged tensors, which fails with several).
    BLEU pools every row of every batch (the original kept only the last batch's scores).
    """
    model.eval()
    generator = accelerator.unwrap_model(model)
    loss_sums, token_counts, predictions, indices = [], [], [], []
    for batch in loader:
        index = batch.pop("index")
        logits = model(**batch).logits.float()
        mask = batch["labels"] != -100
        token_loss = F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100, reduction="none")
        out = generator.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        out = accelerator.pad_across_processes(out, dim=1, pad_index=0)
        gathered = accelerator.gather_for_metrics(((token_loss * mask).sum(1), mask.sum(1), out, index))
        for store, value in zip((loss_sums, token_counts, predictions, indices), gathered):
            store.append(value.cpu())
    loss = float(sum(s.sum() for s in loss_sums)) / max(1, int(sum(t.sum() for t in token_counts)))
    hyps = [h for p in predictions for h in tokenizer.batch_decode(p, skip_special_tokens=True)]
    rows = [i for ix in indices for i in ix.tolist()]
    refs = [loader.dataset.responses[i] for i in rows]
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "bleu4": bleu4(refs, hyps),
            "hypotheses": hyps, "references": refs, "rows": rows}


def print_report(result: dict, dataset: EvalSet, samples: int, logger):
    rows = result["rows"]
    groups = [dataset.extra["task"][i] for i in rows] if "task" in dataset.extra else None
    scores = exact_match_by_group(result["references"], result["hypotheses"], groups)
    logger.info(f"test: {len(rows)} rows, bleu4 {result['bleu4']:.4f}, loss {result['loss']:.4f}")
    for name, (right, total) in sorted(scores.items(), key=lambda kv: kv[0] != "all"):
        logger.info(f"exact match {name:>10}: {right / total:7.2%} ({right}/{total})")
    for k in sorted(np.random.default_rng(0).choice(len(rows), size=min(samples, len(rows)), replace=False)):
        logger.info(f"  {dataset.prompts[rows[k]]} -> {result['hypotheses'][k]}  (expected {result['references'][k]})")
