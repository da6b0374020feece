"""No host syncs in a training step: every read of a tensor's value on the host is counted under a
TorchFunctionMode (utils/syncs.py), which sees the same calls on a CPU as on a GPU."""
import pytest
import torch

from conftest import tiny_flags, train
from test_trainer import mode_data
from utils.logging import read_metrics
from utils.syncs import HostSyncs


class PerStep:
    """A hook: the host syncs of each optimizer step, from the first batch on (start-up is not a
    step), each step's window ending at its on_step_end. `plant`: read the loss on the host
    (the mistake this test is there to catch)."""

    def __init__(self, syncs, plant=False):
        self.syncs, self.plant, self.steps, self.started = syncs, plant, {}, False

    def on_batch(self, trainer, batch):
        if not self.started:
            self.syncs.take()
            self.syncs.where.clear()
            self.started = True

    def on_loss(self, trainer, batch, loss, values):
        if self.plant:
            loss.item()

    def on_step_end(self, trainer):
        self.steps[trainer.progress.step] = (self.syncs.take(), dict(self.syncs.where))
        self.syncs.where.clear()


def counted_run(flags, *hooks, plant=False):
    syncs = HostSyncs(keep_stacks=True)
    counter = PerStep(syncs, plant)
    with syncs:
        trainer = train(flags, hooks=[counter, *hooks])
    return trainer, counter.steps


@pytest.mark.parametrize("mode", ["seq2seq", "dpo", "lora+kl", "grpo", "planted"])
def test_steps_that_neither_log_evaluate_nor_save_read_nothing_on_the_host(tmp_path, data_dir, tokenizer_dir,
                                                                            base_model, mode):
    extra = {"grpo_iterations": 2} if mode == "grpo" else {}
    if mode in ("dpo", "lora+kl", "grpo"):
        extra["loss_chunk_tokens"] = 16  # the chunked head (auto keeps these tiny logits whole)
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, max_steps=9, logging_steps=4, eval_steps=0,
                       save_steps=1000, **{"validation_file": "",
                                           **mode_data("seq2seq" if mode == "planted" else mode, base_model,
                                                       data_dir, tmp_path), **extra})
    flags["validation_file"] = ""
    _, steps = counted_run(flags, plant=mode == "planted")
    assert sorted(steps) == list(range(1, 10))
    # GRPO samples on odd steps (generate() reads its stopping criteria) and updates on those
    # samples again on even ones: those may not sync.
    quiet = [s for s in steps if s % 4 and (mode != "grpo" or s % 2 == 0)]
    synced = {s: steps[s] for s in quiet if steps[s][0]}
    if mode == "planted":
        assert len(synced) == len(quiet)  # the counter sees a planted .item() on every step
        return
    assert not synced, synced
    assert all(steps[s][0] <= 4 for s in (4, 8) if mode != "grpo")  # a log step: its few reads


def test_a_non_finite_gradient_is_skipped_counted_and_reported_without_a_sync(tmp_path, data_dir, tokenizer_dir):
    class Poison:
        """NaN into one gradient during step 3 (a device op), and each step's weights kept."""

        def __init__(self):
            self.weights = {}

        def on_backward(self, trainer):
            if trainer.progress.step == 2:
                next(p for p in trainer.model.parameters() if p.grad is not None).grad.mul_(float("nan"))

        def on_update(self, trainer):
            self.weights[trainer.progress.step + 1] = [p.detach().clone() for p in trainer.model.parameters()]

    poison = Poison()
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, max_steps=8, logging_steps=4, eval_steps=0,
                       validation_file="", max_bad_steps=3)
    trainer, steps = counted_run(flags, poison)
    assert all(steps[s][0] == 0 for s in (1, 2, 3, 5, 6, 7)), steps  # no sync on the steps around it
    w = poison.weights
    assert all(torch.equal(a, b) for a, b in zip(w[2], w[3]))  # step 3 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(w[3], w[4]))  # step 4 trained again
    adam = trainer.optimizer.optimizer
    assert {float(adam.state[p]["step"]) for p in trainer.model.parameters() if p in adam.state} == {7.0}
    assert trainer.progress.skipped_updates == 1
    logged = {r["step"]: r for r in read_metrics(flags["output_dir"]) if "train/loss" in r}
    assert "train/skipped_updates" not in logged.get(2, {}) and logged[4]["train/skipped_updates"] == 1
    with open(f"{flags['output_dir']}/train.log", encoding="utf-8") as f:
        assert "warning: step 3: gradient norm nan, update skipped" in f.read()


def test_the_finite_check_launches_three_operators_a_step_and_counts_on_the_host():
    """A step's finite check is three operators (each a kernel launch on a GPU; counting on the
    device took 35): the norm is kept as it is and read with the others at a log step, where the
    counts are made. They come out as a step-by-step count would, also after the kept norms were
    stacked into one tensor (a run that seldom logs)."""
    from model.policy import NonFiniteSteps
    from utils.syncs import Operators

    inf, nan = float("inf"), float("nan")
    norms = [1.0, inf, 2.0, nan, inf, inf, 0.5, nan, 3.0]
    for keep in (1024, 2):
        steps = NonFiniteSteps("cpu", limit=3)
        steps.KEEP = keep
        seen, skipped = [], []
        for step, norm in enumerate(norms):
            grad_norm = torch.tensor(norm)
            with Operators() as ops, HostSyncs() as syncs:
                found_inf = steps.record(grad_norm, step)
            assert syncs.count == 0
            assert ops.count == 3 or keep == 2
            skipped.append(float(found_inf))
            if step in (2, 8):
                seen.append(steps.take())
        assert skipped == [0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
        assert seen[0] == {"in_a_row": 0, "limit_reached_at": 0, "finite_before": True, "skipped": 1, "last": 2,
                           "norm": inf}
        # steps 4-6 (1-based) are a row of 3: the limit is reached at step 6, with no finite step between
        norm = seen[1].pop("norm")
        assert seen[1] == {"in_a_row": 0, "limit_reached_at": 6, "finite_before": False, "skipped": 4, "last": 8}
        assert norm != norm  # step 8's, NaN
