"""ChatTrainer: the one loop every training mode runs, composed of the pieces a run is made of.

Order of a run: accelerator -> start-up checks (model/preflight.py: the plan) -> tokenizer ->
policy and reference (model/policy.py) -> data stream -> evaluator (model/evaluation.py) -> state
store (model/checkpoint.py) -> resume -> loop -> finish (last evaluation, train state, final/,
test report, summary). The objective (model/objectives.py) owns what differs between modes;
calls all processes make together go through `Run` (model/run.py).

The loop is forward, backward, step, then maybe_log / maybe_evaluate / maybe_save. Tests,
benchmarks and users extend it with hooks (`Hooks`), never by subclassing it.
"""
import dataclasses
import json
import os
import signal
import sys
import time

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

import model.checkpoint as ckpt
from config import TrainConfig
from model.dataset import get_stream, get_tokenizer, get_train_loader, prefetch
from model.engine import get_engine, grad_norm
from model.evaluation import Evaluator, compiled_graphs
from model.policy import NonFiniteSteps, Policy, get_lr_lambda, get_optimizer, skips_on_device, step_divisor
from model.preflight import check_accelerator, check_engine_environment, estimate_budget_steps, preflight
from model.run import Meters, Run, StopRequest, TrainingProgress, get_accelerator
from utils.errors import QuietUserError, UserError
from utils.logging import MetricsLog, get_logger, memory_usage


class NonFiniteLoss(UserError):
    """The loss or the gradient norm stayed non-finite for max_bad_steps steps."""


class Hooks:
    """What tests, benchmarks and users extend a run with, instead of subclassing the loop. Each
    method is called with the trainer; these defaults do nothing. Pass objects with any of them
    as `ChatTrainer(cfg, hooks=[...])`; the loop calls each one's, in order.

    - `on_batch(trainer, batch)`: a micro-batch arrived from the stream (None: this process has
      run out of the epoch's data and steps on an idle batch).
    - `on_loss(trainer, batch, loss, values)`: after an objective's loss of a micro-batch, before
      its backward (`batch` on the device, `values` the objective's metrics, on the device too).
    - `on_backward(trainer)`: after the backward of a micro-batch.
    - `on_update(trainer)`: after an optimizer update (or a skipped non-finite one).
    - `on_evaluate(trainer)`: at each point of the run that evaluates (every eval_steps, each
      epoch's end, the end of the run), after the validation rows and regression prompts, if any.
    - `on_save(trainer, path)`: before final/ is written.
    - `on_step_end(trainer)`: after each optimizer step, its log line and any evaluation.
    """

    def on_batch(self, trainer, batch) -> None:
        pass

    def on_loss(self, trainer, batch: dict, loss: torch.Tensor, values: dict) -> None:
        pass

    def on_backward(self, trainer) -> None:
        pass

    def on_update(self, trainer) -> None:
        pass

    def on_evaluate(self, trainer) -> None:
        pass

    def on_step_end(self, trainer) -> None:
        pass

    def on_save(self, trainer, path: str) -> None:
        pass


@dataclasses.dataclass
class UpdateState:
    """What the optimizer step keeps between micro-batches and steps."""
    schedule: object  # step -> multiplier of learn_rate
    unit_scale: float  # the fixed scale of a micro-batch's weight: about one micro-batch's loss units
    nonfinite: NonFiniteSteps  # the non-finite steps, counted at log steps without a sync between
    params: list  # what the optimizer updates (the same tensors for the run)
    last_lr: float = 0.0
    grad_norm: torch.Tensor | None = None
    units: int = 0  # loss units of the step so far, all processes


def share_cores(cfg: TrainConfig, device) -> None:
    if cfg.num_workers:
        # Each worker process tokenizes already; the tokenizer's own thread pool would only
        # compete with training (and it warns after every fork).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if device.type == "cpu" and cfg.num_workers:
        # DataLoader workers tokenize on the same cores: leave them one each, or the compute
        # threads spin-wait on preempted peers and a step can take many times longer.
        torch.set_num_threads(max(1, torch.get_num_threads() - cfg.num_workers))


class ChatTrainer:
    def __init__(self, cfg: TrainConfig, hooks=()):
        self.cfg, self.hooks = cfg, list(hooks)
        # The run's pieces, built by build() in this order.
        self.accelerator = self.run = self.logger = self.metrics = self.plan = self.tokenizer = None
        self.policy = self.stream = self.loader = self.idle_batch = self.evaluator = self.store = None
        self.optimizer = self.meters = self.update = self.stop = self.bar = None

    # ---- what tests and tools read -----------------------------------------------------------
    objective = property(lambda self: self.plan.objective)
    model = property(lambda self: self.policy.model)
    reference = property(lambda self: self.policy.reference)
    progress = property(lambda self: self.run.progress)
    total_steps = property(lambda self: self.plan.total_steps)
    eval_set = property(lambda self: self.evaluator.eval_set)
    settings = property(lambda self: self.store.settings)
    test_metrics = property(lambda self: self.evaluator.test_metrics)
    resume_from = property(lambda self: self.plan.resume_from)

    def unwrapped(self):
        return self.policy.unwrapped()

    def call_hooks(self, name: str, *args) -> None:
        for hook in self.hooks:
            method = getattr(hook, name, None)
            if method is not None:
                method(self, *args)

    def request_stop(self) -> None:
        """Stop after this optimizer step (and its train state), as SIGTERM would."""
        self.stop.signum = signal.SIGTERM

    # ---- build -------------------------------------------------------------------------------
    def build(self):
        cfg = self.cfg = check_engine_environment(self.cfg)
        acc = self.accelerator = get_accelerator(cfg)
        check_accelerator(acc)
        self.run = Run(acc)
        self.logger = get_logger(None, acc.is_main_process)  # no file until the output dir is checked
        plan = self.plan = preflight(cfg, self.run, self.logger)
        self.logger = logger = get_logger(cfg.output_dir, acc.is_main_process)
        self.metrics = MetricsLog(cfg.output_dir if acc.is_main_process else None, logger, acc)
        share_cores(cfg, acc.device)
        set_seed(cfg.seed)
        if acc.mixed_precision == "fp16":
            logger.warning("fp16 overflows in T5's feed-forward layers; prefer --mixed_precision=bf16")
        self.tokenizer = get_tokenizer(cfg, self.run, plan.train_files, logger)
        plan.objective.set_tokenizer(self.tokenizer)  # an objective that samples decodes with it
        self.policy = Policy(cfg, plan.objective, self.tokenizer, acc, get_engine(cfg, acc, logger), logger)
        plan.objective.vocab = self.policy.unwrapped().config.vocab_size  # the head's rows: the logits' width
        self.stream = get_stream(cfg, plan, self.tokenizer, acc, logger)
        if cfg.max_tokens_per_batch or self.stream.conversations:
            plan.total_steps = estimate_budget_steps(cfg, plan, self.stream, acc.num_processes, logger)
        self.loader = get_train_loader(self.stream, cfg.num_workers, pin_memory=acc.device.type == "cuda")
        eos = [self.tokenizer.eos_token_id]
        self.idle_batch = plan.objective.collate({c: [eos] for c in plan.objective.columns})
        self.evaluator = Evaluator(cfg, self.run, plan, self.tokenizer, self.policy, self.metrics, logger)
        self.store = ckpt.StateStore(cfg, self.run, logger, ckpt.state_settings(
            cfg, self.policy.model.config, self.tokenizer, self.stream.pieces, plan.sources, acc.num_processes))
        # There is no scheduler object: the lr is a function of the step, set before each update,
        # so a resume with another learn_rate or max_steps follows the new schedule at once.
        self.optimizer, self.evaluator.loader = self.policy.prepare(
            get_optimizer(self.policy.trainable_params(), cfg), self.evaluator.unprepared_loader())
        self.meters = Meters(acc.device, plan.objective.metric_names, len(plan.sources))
        self.update = UpdateState(get_lr_lambda(plan.total_steps, cfg.warmup_steps, cfg.div_factor),
                                  float(cfg.batch_size_per_gpu * plan.objective.unit_scale),
                                  NonFiniteSteps(acc.device, cfg.max_bad_steps), self.policy.trainable_params())
        self.maybe_resume()
        if acc.is_main_process:
            self.metrics.start(self.progress.step if plan.resume_from is not None else None)
        if cfg.log_with != "none":
            # TensorBoard's hparams take numbers, strings and booleans only (weighted sources are a dict).
            acc.init_trackers("chatlm", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                for k, v in dataclasses.asdict(cfg).items()})

    def maybe_resume(self):
        path, progress = self.plan.resume_from, self.progress
        if path is None:
            return
        if ckpt.is_legacy(path):
            if self.policy.engine.name.startswith("fsdp"):
                raise UserError(f"{path} is a train state in the old format, which loads only unsharded: resume it "
                                "without --fsdp once (its next state is in the new format), then with --fsdp")
            self.store.load_legacy(path, self.optimizer, self.stream)
        else:
            self.store.load(path, self.policy, self.optimizer, self.stream, self.accelerator.scaler)
        self.logger.info(f"resumed from {path}: epoch {progress.epoch}, step {progress.step}, "
                         f"{progress.micro_step} batches done")
        if progress.best_metric not in (None, self.cfg.best) and progress.best_score is not None:
            self.logger.warning(f"best/ was chosen by {progress.best_metric}, this run chooses by {self.cfg.best}: "
                                "the next evaluation sets a new best/")
            progress.best_score, progress.best_step, progress.evals_without_improvement = None, -1, 0

    # ---- training ----------------------------------------------------------------------------
    def train(self) -> TrainingProgress:
        self.build()
        cfg, acc, progress = self.cfg, self.accelerator, self.progress
        if cfg.overwrite and self.plan.resume_from is None:
            self.store.clear()
        self.stop = StopRequest(self.logger)
        # The bar is for a terminal; in a scheduler's log file the log lines say the same.
        self.bar = tqdm(total=self.total_steps, initial=min(progress.step, self.total_steps),
                        disable=not (acc.is_main_process and sys.stderr.isatty()), desc="train", unit="step",
                        dynamic_ncols=True, mininterval=1.0)
        self.logger.info(f"training: {self.total_steps} optimizer steps, {acc.num_processes} process(es), "
                         f"device {acc.device}, mixed precision {acc.mixed_precision}, engine {self.policy.engine.name}")
        self.meters.reset()
        self.update.last_lr = cfg.learn_rate * self.update.schedule(progress.step)
        self.run.start_clock()
        try:
            done = self.run_epochs()
            if done:
                done = self.finish()
            else:
                self.save_state()
        finally:
            self.bar.close()
            self.stop.restore()
        self.run.on_main(self.evaluator.write_summary, "early_stopped" if done and progress.early_stopped else
                         "finished" if done else "stopped")
        if cfg.torch_compile:
            self.logger.info(f"torch.compile ({cfg.torch_compile_backend}): {compiled_graphs()} graphs compiled, "
                             f"padded lengths rounded up to multiples of {cfg.pad_multiple}")
        if not done:
            self.logger.info(f"stopped at step {progress.step}; continue with --is_keep_training=True")
        self.run.close()
        acc.end_training()
        return progress

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

    def run_epoch(self) -> bool:
        """One pass over the data; True when a stop was requested (state not yet saved)."""
        acc, cfg, progress = self.accelerator, self.cfg, self.progress
        stop_pending = False
        self.policy.model.train()
        for batch, units, all_units, stop_now in self.batches():
            stop_pending = stop_pending or stop_now
            self.call_hooks("on_batch", batch)
            # A process that has run out of the epoch's data steps with the others on a batch that
            # weighs nothing, so their rows are all trained on.
            batch = self.idle_batch if batch is None else self.record_batch(batch)
            # The loss of an optimizer step is the mean over all its units (target tokens; pairs
            # or prompts for DPO and GRPO) across micro-batches and processes, however unevenly
            # they are split: a micro-batch weighs its units. Accelerate divides by the
            # accumulation steps and DDP averages over processes; the weight undoes both against a
            # fixed scale, and apply_update divides by the step's units once they are all known.
            weight = units * acc.num_processes * cfg.gradient_accumulation_steps / self.update.unit_scale
            batch = {k: v.to(acc.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            saves = progress.step // cfg.save_steps
            # An objective may make several updates on one batch (GRPO's iterations on one batch of
            # samples). A stop or a train state comes only after the last of them, so a resume
            # starts at a batch boundary.
            updates = self.objective.updates_per_batch
            for update in range(updates):
                if not self.micro_step(batch, update, weight, all_units):
                    continue
                ended = self.end_step(last=update == updates - 1, stop=stop_pending, saves=saves)
                if ended is not None:
                    return ended
        return False

    def micro_step(self, batch: dict, update: int, weight: float, all_units: int) -> bool:
        """Forward and backward of one micro-batch, and the optimizer step at the end of an
        accumulation; True when that step was made."""
        acc, model = self.accelerator, self.policy.model
        self.update.units += all_units
        with acc.accumulate(model):
            self.policy.set_gradient_sync(acc.sync_gradients)
            loss, values = self.objective.loss(model, batch, self.policy.reference, update)
            self.call_hooks("on_loss", batch, loss, values)
            acc.backward(loss * weight)  # Accelerate divides by gradient_accumulation_steps: once
            self.call_hooks("on_backward")
            if acc.sync_gradients:
                self.apply_update()
                self.call_hooks("on_update")
        if weight:
            self.meters.add(values)
        return acc.sync_gradients

    def end_step(self, last: bool, stop: bool, saves: int) -> bool | None:
        """After an optimizer step: log, evaluate, check, and at the batch's `last` update stop (on
        a signal) or save (when a save_steps boundary was crossed since `saves`); True to stop for
        a signal, False at the end of the run, None to go on."""
        cfg, progress = self.cfg, self.progress
        progress.step += 1
        self.bar.update(1)
        self.maybe_log()
        if cfg.empty_cache_steps and progress.step % cfg.empty_cache_steps == 0 and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if cfg.eval_steps and progress.step % cfg.eval_steps == 0:
            self.maybe_evaluate()
        self.check_signal()
        self.call_hooks("on_step_end")
        if last and stop:
            return True
        if last and progress.step // cfg.save_steps > saves:
            self.save_state()
        return False if self.reached_the_end() else None

    def apply_update(self):
        """The optimizer step at the end of an accumulation: the scheduled lr, clipping, and a
        check that the gradient is finite, made on the device: fused AdamW skips a non-finite
        step itself (`found_inf`) and NonFiniteSteps counts it, so the host waits for nothing
        here. The counts are read where the loop syncs anyway (check_steps)."""
        acc, cfg, step, u = self.accelerator, self.cfg, self.progress.step, self.update
        u.last_lr = cfg.learn_rate * u.schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = u.last_lr
        scale, u.units = u.unit_scale / max(1, u.units), 0
        params = u.params
        # Past the grad scaler, Accelerate's optimizer wrapper only calls the optimizer here (its
        # XLA branch aside), but first looks for the lomo_optim package on sys.path, twice a
        # step (a tenth of a millisecond on a CPU): the optimizer itself is called instead.
        inner = self.optimizer.optimizer
        fused = skips_on_device(self.optimizer) and acc.mixed_precision != "fp16"
        if fused:
            # The units' scale and the clipping are one factor, which fused AdamW applies to each
            # gradient as it reads it (`grad_scale`, which it divides by): no pass over the
            # gradients of their own (two multi-tensor kernels a step, each reading and writing
            # every gradient), the same step as scaling, clipping and stepping.
            u.grad_norm = grad_norm(params) * scale
            inner.grad_scale = step_divisor(u.grad_norm, cfg.max_grad_norm, scale)
        else:
            if scale != 1.0:
                torch._foreach_mul_([p.grad for p in params if p.grad is not None], scale)
            u.grad_norm = self.policy.clip_grad_norm(params, cfg.max_grad_norm or float("inf"))
        if acc.mixed_precision == "fp16":  # the grad scaler skips overflowing steps itself
            self.optimizer.step()
            self.store.confirm()
        elif fused:
            inner.found_inf = u.nonfinite.record(u.grad_norm, step).float()
            inner.step()
        else:  # Adafactor takes no found_inf: the host asks, once a step
            if not u.nonfinite.record(u.grad_norm, step).item():
                inner.step()
            self.check_steps()
        inner.zero_grad(set_to_none=True)

    def check_steps(self):
        """Read the non-finite counts (at log steps and saves, where the loop syncs anyway): the
        states saved before a finite step count; a skipped step is a warning; max_bad_steps in a
        row stop the run with the states saved since the last finite step set aside."""
        cfg, seen = self.cfg, self.update.nonfinite.take()
        if seen["finite_before"]:
            self.store.confirm()
        if seen["skipped"]:
            self.progress.skipped_updates += seen["skipped"]
            self.logger.warning(f"step {seen['last']}: gradient norm {seen['norm']}, update skipped ({seen['skipped']} "
                                f"skipped since the last log line, {seen['in_a_row']} of --max_bad_steps="
                                f"{cfg.max_bad_steps} in a row now)")
        if seen["limit_reached_at"]:
            resume = self.store.set_aside_unconfirmed()
            raise NonFiniteLoss(f"the loss or gradient norm was not finite for {cfg.max_bad_steps} steps in a row, "
                                f"up to step {seen['limit_reached_at']}: training stopped and nothing of these steps "
                                f"was saved; lower --learn_rate or set --max_grad_norm, then {resume}")

    def batches(self):
        """Yield (batch or None, its loss units, all processes' units, stop requested anywhere)
        until no process has data left. Processes stay in step: each micro-step they count who
        still has a batch, the units its loss is a mean over, and whether any received a stop
        signal (one small all-reduce on a CPU group)."""
        it = iter(self.loader)
        if self.accelerator.device.type == "cuda" and not self.cfg.num_workers:
            it = prefetch(it)  # on a CPU the thread would take a core from the computation
        while True:
            batch = next(it, None)
            units = batch["counts"][1] if batch is not None else 0  # counted where the batch was made
            active, stop, all_units = self.run.agree(batch is not None, self.stop.signum is not None, units)
            if not active:
                return
            yield batch, units, all_units, bool(stop)

    def record_batch(self, batch: dict) -> dict:
        """Take the metadata off the batch (the stream moves its position) and count what it holds."""
        rows, skipped, source, tokens, truncated = self.stream.advance(batch)
        self.meters.add_batch(tokens, len(rows), skipped, source, truncated)
        self.progress.micro_step += 1
        if self.cfg.trace_samples:
            path = os.path.join(self.cfg.output_dir, f"samples.rank{self.accelerator.process_index}.jsonl")
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"epoch": self.progress.epoch, "micro_step": self.progress.micro_step,
                                    "rows": rows.tolist()}) + "\n")
        return batch

    def check_signal(self):
        """GRPO: a reward that scores every completion of a group alike gives advantages and
        gradients of 0. When no group of grpo_max_zero_signal_steps steps in a row (all processes)
        told its completions apart, stop with one line instead of training on for nothing."""
        seen = self.objective.take_signal()
        limit, progress = self.cfg.grpo_max_zero_signal_steps, self.progress
        if seen is None or not limit:
            return
        progress.steps_without_signal = 0 if self.run.agree(seen)[0] else progress.steps_without_signal + 1
        if progress.steps_without_signal < limit:
            return
        self.metrics.log({"train/steps_without_signal": progress.steps_without_signal}, progress.step, progress.epoch,
                         self.total_steps, meta={"stopped": "no_reward_signal"})
        self.run.on_main(self.evaluator.write_summary, "no_reward_signal")
        message = (f"every group of the last {limit} steps gave its completions the same reward (--reward="
                   f"{self.cfg.reward}): the reward gives no signal for this model and data, and training stopped at "
                   f"step {progress.step} (the train states saved before are kept); try another --reward, a larger "
                   "--grpo_group_size, a stronger --init_from or a higher --grpo_temperature "
                   "(--grpo_max_zero_signal_steps=0 trains on regardless)")
        raise (UserError if self.run.is_main else QuietUserError)(message)

    def maybe_log(self):
        progress, meters, u = self.progress, self.meters, self.update
        if progress.step % self.cfg.logging_steps:
            return
        self.check_steps()
        self.run.flush(meters)
        seconds = time.perf_counter() - meters.started
        metrics = {f"train/{k}": v for k, v in meters.means().items()}
        metrics.update({"train/lr": u.last_lr, "train/tokens_per_s": meters.counts[0] / seconds,
                        "train/samples_per_s": meters.counts[1] / seconds})
        if u.grad_norm is not None:
            metrics["train/grad_norm"] = float(u.grad_norm)
        if progress.rows_skipped:
            metrics["data/empty_rows_skipped"] = progress.rows_skipped
        if progress.histories_truncated:
            metrics["data/histories_truncated"] = progress.histories_truncated
        if progress.skipped_updates:
            metrics["train/skipped_updates"] = progress.skipped_updates
        for src, rows in zip(self.plan.sources, progress.rows_per_source or []):
            metrics[f"data/rows/{src.label}"] = rows
        if self.cfg.log_memory:
            metrics.update({f"memory/{k}": v for k, v in memory_usage().items()})
        self.metrics.log(metrics, progress.step, progress.epoch, self.total_steps)
        self.bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
        meters.reset()

    def maybe_evaluate(self, end_of_epoch: bool = False):
        self.meters.started += self.evaluator.maybe_evaluate(end_of_epoch)  # not training throughput
        self.call_hooks("on_evaluate")

    # ---- the end -----------------------------------------------------------------------------
    def finish(self) -> bool:
        """The end of a run: last evaluation, train state, final/, test report. A stop request is
        honoured between these parts; resuming a finished state runs what is left."""
        cfg, progress = self.cfg, self.progress
        if not self.stop_requested() and progress.last_eval_step != progress.step:
            self.maybe_evaluate()
        self.save_state()
        self.store.confirm()
        if self.stop_requested():
            return False
        final = os.path.join(cfg.output_dir, "final")
        if progress.step == 0:
            self.logger.warning("no optimizer step was made: final/ is not written")
            return True
        self.call_hooks("on_save", final)
        self.policy.save_together(self.run, final, self.tokenizer)
        self.logger.info(f"final model saved to {final}")
        if cfg.test_file and not self.stop_requested():
            self.evaluator.report(cfg.test_file)
        return True

    def save_state(self):
        """Collective: the run's counts, then everything a resume needs (model/checkpoint.py)."""
        self.check_steps()
        self.run.flush(self.meters)
        self.store.save(self.policy, self.optimizer, self.stream, self.accelerator.scaler)

    def stop_requested(self) -> bool:
        return bool(self.run.agree(self.stop.signum is not None)[0])

    def reached_the_end(self) -> bool:
        """max_steps made, or early stopping ended the run."""
        return self.progress.early_stopped or bool(self.cfg.max_steps) and self.progress.step >= self.cfg.max_steps
