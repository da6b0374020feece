"""What differs between training objectives, in one small object the trainer calls.

An objective owns its columns, how a batch of their token ids is padded, the batch an idle
process steps on, the tokens a batch counts, its loss and the metrics it logs and evaluates.
The trainer and the data stream never ask which objective they run.

- `Seq2Seq`: cross-entropy of the response given the prompt (pre-training, SFT); with
  `kl_beta > 0` plus kl_beta x KL(policy || reference) over the whole vocabulary at every
  response position.
- `DPO`: direct preference optimisation (Rafailov et al. 2023) for an encoder-decoder. TRL
  dropped its encoder-decoder path (0.29) and 0.28 does not import with our transformers, so
  the loss is written here, following TRL's formulas (sigmoid with label smoothing, ipo, hinge).
- `GRPO`: group relative policy optimisation (Shao et al. 2024) with verifiable rewards. TRL's
  GRPOTrainer concatenates prompt and completion for a decoder-only model and has no
  encoder-decoder path, so it is written here: the encoder reads the prompt, the decoder samples
  a group of completions, which are then scored as labels.
"""
import time

import numpy as np
import torch
import torch.nn.functional as F

from utils.metrics import normalise

LABEL_PAD = -100  # ignored by the loss
EOS = 1  # [EOS]; [PAD] = 0 is also T5's decoder start token


def non_empty(*columns: list) -> np.ndarray:
    """Rows whose every text is non-null and not only whitespace."""
    return np.array([all(t and t.strip() for t in texts) for texts in zip(*columns)], dtype=bool)


def pad(rows: list, value: int, multiple: int = 1) -> torch.Tensor:
    """Token id arrays -> (len(rows), longest rounded up to `multiple`) tensor padded with `value`."""
    out = torch.full((len(rows), -(-max(map(len, rows)) // multiple) * multiple), value, dtype=torch.long)
    for i, ids in enumerate(rows):
        out[i, :len(ids)] = torch.as_tensor(ids)
    return out


def encoder_inputs(prompts: list, multiple: int = 1) -> dict:
    input_ids = pad(prompts, 0, multiple)
    lengths = torch.tensor([len(p) for p in prompts])
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-sequence log-probability of `labels` (B, T; -100 = padding) under `logits` (B, T, V).

    An encoder-decoder scores its labels at their own positions (the decoder input is the
    labels shifted right inside the model): no shift here. `average` divides by the length.
    """
    mask = labels != LABEL_PAD
    token_logps = torch.gather(logits.float().log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    summed = (token_logps * mask).sum(-1)
    return summed / mask.sum(-1).clamp(min=1) if average else summed


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


class Seq2Seq:
    name = "seq2seq"
    updates_per_batch = 1  # optimizer updates the loop makes on each batch
    columns = ("prompt", "response")
    target = "response"  # what greedy answers are compared with
    default_best_metric = "bleu4"
    pad_multiple = 1  # padded lengths are rounded up to this (a compiled model sees few shapes)

    # Why a file has no row to train on, beyond empty texts (which every objective skips).
    no_usable_row = None

    def __init__(self, kl_beta: float = 0.0):
        self.kl_beta = kl_beta
        self.needs_reference = kl_beta > 0
        # Runs its policy against a reference: dropout would be noise in the difference
        # (the trainer turns it off unless --disable_dropout=False).
        self.dropout_free = kl_beta > 0
        self.metric_names = ("loss", "ce", "kl") if kl_beta > 0 else ("loss",)

    def usable_rows(self, texts: dict) -> np.ndarray:
        """Which rows of {column: texts} train (the others are skipped and counted): no text empty."""
        return non_empty(*(texts[c] for c in self.columns))

    def collate(self, rows: dict) -> dict:
        """{"prompt": [ids], "response": [ids]} -> padded encoder inputs and labels."""
        return {**encoder_inputs(rows["prompt"], self.pad_multiple),
                "labels": pad(rows["response"], LABEL_PAD, self.pad_multiple)}

    def count_tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum()) + int((batch["labels"] != LABEL_PAD).sum())

    def loss_units(self, batch: dict) -> int:
        """What the loss is a mean over, counted in a batch: the target tokens. The loop weights
        each micro-batch by it, so an optimizer step's loss is the mean over all its units."""
        return int((batch["labels"] != LABEL_PAD).sum())

    def loss(self, model, batch: dict, reference: Reference | None) -> tuple[torch.Tensor, dict]:
        out = model(**batch)
        if not self.kl_beta:
            return out.loss, {"loss": out.loss.detach()}
        kl = self.token_kl(out.logits, reference(**batch).logits, batch["labels"])
        loss = out.loss + self.kl_beta * kl
        return loss, {"loss": loss.detach(), "ce": out.loss.detach(), "kl": kl.detach()}

    @staticmethod
    def token_kl(policy_logits, reference_logits, labels) -> torch.Tensor:
        """Mean over response tokens of KL(policy || reference) over the whole vocabulary."""
        mask = labels != LABEL_PAD
        logp, logq = policy_logits.float().log_softmax(-1), reference_logits.float().log_softmax(-1)
        per_token = (logp.exp() * (logp - logq)).sum(-1)
        return (per_token * mask).sum() / mask.sum().clamp(min=1)

    @torch.no_grad()
    def eval_rows(self, model, batch: dict, reference: Reference | None) -> dict:
        """Per-row sums for evaluation: summed token loss and target tokens (and KL)."""
        out = model(**batch)
        mask = batch["labels"] != LABEL_PAD
        token_loss = F.cross_entropy(out.logits.float().transpose(1, 2), batch["labels"], ignore_index=LABEL_PAD,
                                     reduction="none")
        rows = {"loss_sum": (token_loss * mask).sum(1), "tokens": mask.sum(1).float()}
        if reference is not None and self.kl_beta:
            logp = out.logits.float().log_softmax(-1)
            logq = reference(**batch).logits.float().log_softmax(-1)
            rows["kl_sum"] = ((logp.exp() * (logp - logq)).sum(-1) * mask).sum(1)
        return rows

    def answer_metrics(self, prompts: list[str], answers: list[str], columns: dict) -> dict:
        """Metrics of the greedy answers beyond BLEU and exact match (GRPO's reward): none."""
        return {}

    def take_signal(self) -> bool | None:
        """Whether the micro-batches since the last call gave a learning signal; None: always."""
        return None

    def eval_metrics(self, sums: dict) -> dict:
        import math
        loss = float(sums["loss_sum"].sum()) / max(1.0, float(sums["tokens"].sum()))
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
        if "kl_sum" in sums:
            metrics["kl"] = float(sums["kl_sum"].sum()) / max(1.0, float(sums["tokens"].sum()))
        return metrics


class DPO:
    name = "dpo"
    updates_per_batch = 1
    columns = ("prompt", "chosen", "rejected")
    target = "chosen"
    # rewards/accuracy saturates at 1.0 long before the answers are good (pure DPO reaches 100%
    # with 0% exact match): best/ follows the greedy answers against chosen instead.
    default_best_metric = "exact_match"
    needs_reference = True
    dropout_free = True
    no_usable_row = ("in every row chosen equals rejected (whitespace and full-width forms ignored) or a text is "
                     "empty: identical answers carry no preference; give pairs whose answers differ")
    pad_multiple = 1
    metric_names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 rpo_alpha: float = 0.0):
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        # TRL's rpo_alpha (Pang et al. 2024): plus rpo_alpha x the NLL of the chosen answers per
        # token. Pure DPO can win a pair by pushing the rejected text down alone; this also
        # pulls the chosen one up, which a model that never produced the chosen style needs.
        self.rpo_alpha = rpo_alpha
        if rpo_alpha:
            self.metric_names = DPO.metric_names + ("nll",)

    def usable_rows(self, texts: dict) -> np.ndarray:
        """Pairs with every text non-empty and answers that differ once normalised as evaluation
        compares them: a pair of equal answers carries no preference (its loss is ln 2 and its
        gradient 0 whatever the model does), so it is skipped and counted like an empty row."""
        keep = non_empty(*(texts[c] for c in self.columns))
        for i in np.flatnonzero(keep):
            keep[i] = normalise(texts["chosen"][i]) != normalise(texts["rejected"][i])
        return keep

    def collate(self, rows: dict) -> dict:
        """Prompts once; chosen (rows 0..B-1) and rejected (B..2B-1) labels stacked, one padding."""
        return {**encoder_inputs(rows["prompt"], self.pad_multiple),
                "labels": pad(rows["chosen"] + rows["rejected"], LABEL_PAD, self.pad_multiple)}

    def count_tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum()) + int((batch["labels"] != LABEL_PAD).sum())

    def loss_units(self, batch: dict) -> int:
        """The loss is a mean over pairs."""
        return int(batch["input_ids"].shape[0])

    def logps(self, model, batch: dict, nll: bool = False):
        """(2B,) log-probs of chosen then rejected: one forward over the stacked batch. With
        `nll`, also the mean negative log-likelihood per chosen token."""
        labels = batch["labels"]
        out = model(input_ids=batch["input_ids"].repeat(2, 1), attention_mask=batch["attention_mask"].repeat(2, 1),
                    labels=labels)
        summed = sequence_logps(out.logits, labels)
        lengths = (labels != LABEL_PAD).sum(-1).clamp(min=1)
        logps = summed / lengths if self.loss_type == "ipo" else summed
        if not nll:
            return logps
        chosen = len(labels) // 2
        return logps, -summed[:chosen].sum() / lengths[:chosen].sum()

    def losses(self, policy: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Per-pair losses and rewards from (2B,) log-probs of chosen then rejected."""
        pc, pr = policy.chunk(2)
        rc, rr = reference.chunk(2)
        logits = (pc - pr) - (rc - rr)
        if self.loss_type == "sigmoid":
            ls = self.label_smoothing
            losses = -F.logsigmoid(self.beta * logits) * (1 - ls) - F.logsigmoid(-self.beta * logits) * ls
        elif self.loss_type == "ipo":
            losses = (logits - 1 / (2 * self.beta)) ** 2
        elif self.loss_type == "hinge":
            losses = torch.relu(1 - self.beta * logits)
        else:
            raise ValueError(f"unknown dpo_loss {self.loss_type!r}")
        chosen, rejected = self.beta * (pc - rc).detach(), self.beta * (pr - rr).detach()
        return losses, {"rewards/chosen": chosen, "rewards/rejected": rejected,
                        "rewards/accuracy": (chosen > rejected).float(), "rewards/margin": chosen - rejected}

    def loss(self, model, batch: dict, reference: Reference) -> tuple[torch.Tensor, dict]:
        policy, nll = self.logps(model, batch, nll=True)
        with torch.no_grad():
            ref = self.logps(reference, batch)
        losses, rewards = self.losses(policy, ref)
        loss = losses.mean() + self.rpo_alpha * nll if self.rpo_alpha else losses.mean()
        values = {"loss": loss.detach(), **{k: v.mean() for k, v in rewards.items()}}
        if self.rpo_alpha:
            values["nll"] = nll.detach()
        return loss, values

    @torch.no_grad()
    def eval_rows(self, model, batch: dict, reference: Reference) -> dict:
        losses, rewards = self.losses(self.logps(model, batch), self.logps(reference, batch))
        return {"loss": losses, **rewards}

    def eval_metrics(self, sums: dict) -> dict:
        return {k: float(v.mean()) if len(v) else 0.0 for k, v in sums.items()}

    def answer_metrics(self, prompts: list[str], answers: list[str], columns: dict) -> dict:
        return {}

    def take_signal(self) -> bool | None:
        return None


class GRPO(Seq2Seq):
    """Samples `group_size` completions per prompt, rewards them, and pushes up the log-probability
    of those better than their group's mean (a clipped ratio objective, as PPO's), optionally
    held to the reference by the k3 estimator of KL(policy || reference).

    Evaluation scores the greedy answers to the held-out prompts with the rewards it trains on
    (`reward`, and `reward/NAME` for each of a weighted sum), which picks best/ by default; where
    the rows have a `response` (a reward reads it), also Seq2Seq's loss and exact match against it.
    Sampling uses the process's torch RNG, which the train state saves, so a resumed run samples
    what the uninterrupted one would have.
    """
    name = "grpo"
    default_best_metric = "reward"
    # Sampling runs in eval mode and scoring in train mode: with dropout they would be two
    # different policies, and the ratio of the first update would not be 1.
    dropout_free = True

    def loss_units(self, batch: dict) -> int:
        """Prompts: the loss is a mean within the batch's samples, and batches weigh by prompts."""
        return int(batch["input_ids"].shape[0])

    def __init__(self, rewards: list, group_size: int = 8, max_new_tokens: int = 32, temperature: float = 1.0,
                 top_p: float = 1.0, clip_eps: float = 0.2, clip_eps_high: float = 0.0, beta: float = 0.0,
                 loss_aggregation: str = "token", iterations: int = 1):
        super().__init__(0.0)
        self.dropout_free = True
        # grpo_iterations: updates on each batch of samples (the loop repeats the batch; the
        # samples are kept in it, under "rollout").
        self.updates_per_batch = iterations
        self.rewards, self.group_size, self.max_new_tokens = rewards, group_size, max_new_tokens
        self.temperature, self.top_p = temperature, top_p
        self.clip_low, self.clip_high = clip_eps, clip_eps_high or clip_eps
        self.beta, self.loss_aggregation = beta, loss_aggregation
        self.needs_reference = beta > 0
        self.tokenizer = None  # set by the trainer: completions are decoded for the rewards
        # Raw text the rewards read travels with each batch (batch["texts"]); "*": every column.
        wanted = {"prompt"} | {c for r in rewards for c in r.columns}
        self.text_columns = tuple(sorted(wanted)) + (("*",) if any(r.all_columns for r in rewards) else ())
        # `response` is needed only when a reward reads it; then it is also what evaluation's loss
        # and exact match compare with.
        self.columns = ("prompt", "response") if "response" in wanted else ("prompt",)
        self.target = "response" if "response" in wanted else None
        self.metric_names = (("loss", "reward", "reward_std", "zero_std_groups", "completion_length", "clip_fraction")
                             + (("kl",) if beta else ())
                             + (tuple(f"reward/{r.name}" for r in rewards) if len(rewards) > 1 else ())
                             + ("sample_seconds", "train_seconds", "sampled_tokens_per_s"))
        self._last_call = None  # when the previous micro-step's sampling ended
        self._signal = False  # a group with unequal rewards since take_signal (read on the host: no sync)

    def collate(self, rows: dict) -> dict:
        return super().collate(rows) if "response" in rows else encoder_inputs(rows["prompt"], self.pad_multiple)

    def count_tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum()) + (int((batch["labels"] != LABEL_PAD).sum())
                                                     if "labels" in batch else 0)

    @torch.no_grad()
    def eval_rows(self, model, batch: dict, reference: Reference | None) -> dict:
        return super().eval_rows(model, batch, reference) if "labels" in batch else {}

    def eval_metrics(self, sums: dict) -> dict:
        return super().eval_metrics(sums) if "loss_sum" in sums else {}

    def take_signal(self) -> bool:
        """Whether any group sampled since the last call had unequal rewards (a zero-variance group
        has advantages and a gradient of 0)."""
        signal, self._signal = self._signal, False
        return signal

    def answer_metrics(self, prompts: list[str], answers: list[str], columns: dict) -> dict:
        """The rewards of the greedy answers: `reward` (the weighted sum), and each reward's mean."""
        total, means = self.score_texts(prompts, answers, columns)
        return {"reward": float(total.mean()) if len(total) else 0.0,
                **({k: float(v) for k, v in means.items()} if len(self.rewards) > 1 else {})}

    # ---- the formulas, on tensors (tested against a direct implementation) -------------
    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """(B*G,) rewards, groups consecutive -> (r - group mean) / (group std + 1e-4).
        The std is the unbiased one (torch's default, as TRL's)."""
        r = rewards.view(-1, self.group_size)
        return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)

    def policy_loss(self, logps, old_logps, advantages, mask, ref_logps=None) -> tuple[torch.Tensor, dict]:
        """Per-token clipped ratio objective (+ beta x k3 KL), aggregated over `mask`ed tokens.

        logps, old_logps, ref_logps, mask: (N, T); advantages: (N,).
        """
        ratio = torch.exp(logps - old_logps)
        a = advantages[:, None]
        per_token = -torch.min(ratio * a, ratio.clamp(1 - self.clip_low, 1 + self.clip_high) * a)
        m = mask.float()
        stats = {}
        if self.beta:
            delta = ref_logps - logps
            kl = torch.exp(delta) - delta - 1  # k3: unbiased, always >= 0 (Schulman 2020)
            per_token = per_token + self.beta * kl
            stats["kl"] = ((kl * m).sum() / m.sum().clamp(min=1)).detach()
        if self.loss_aggregation == "token":  # every completion token of the batch weighs the same
            loss = (per_token * m).sum() / m.sum().clamp(min=1)
        else:  # every completion weighs the same
            loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
        clipped = ((ratio < 1 - self.clip_low) & (a < 0)) | ((ratio > 1 + self.clip_high) & (a > 0))
        stats["clip_fraction"] = ((clipped.float() * m).sum() / m.sum().clamp(min=1)).detach()
        return loss, stats

    @staticmethod
    def completion_labels(sequences: torch.Tensor) -> torch.Tensor:
        """generate()'s (N, 1 + T) output -> (N, T) labels: the sampled tokens up to and with the
        first [EOS]; what follows it (padding) is LABEL_PAD and carries no loss."""
        tokens = sequences[:, 1:]  # position 0 is the decoder start token
        after_eos = (tokens == EOS).int().cumsum(1) - (tokens == EOS).int() > 0
        return tokens.masked_fill(after_eos, LABEL_PAD)

    @staticmethod
    def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.gather(logits.float().log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)

    # ---- one micro-step ------------------------------------------------------------------
    def sample(self, model, batch: dict) -> torch.Tensor:
        policy = getattr(model, "module", model)  # DDP's wrapper has no generate
        training = policy.training
        policy.eval()  # no dropout while sampling
        try:
            with torch.no_grad():
                out = policy.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0,
                                      max_new_tokens=self.max_new_tokens, num_return_sequences=self.group_size,
                                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=EOS)
        finally:
            policy.train(training)
        return self.completion_labels(out)

    def score(self, batch: dict, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Weighted sum of the rewards of every completion, and each reward's mean."""
        n, g = batch["input_ids"].shape[0], self.group_size
        texts = batch.get("texts") or {}
        columns = {c: [v for v in values for _ in range(g)] for c, values in texts.items()}
        prompts = columns.pop("prompt", [""] * n * g)
        completions = self.tokenizer.batch_decode(labels.clamp(min=0), skip_special_tokens=True)
        total, means = self.score_texts(prompts, completions, columns)
        return total.float(), means

    def score_texts(self, prompts: list[str], completions: list[str], columns: dict) -> tuple[torch.Tensor, dict]:
        """(len(completions),) weighted sums of the rewards, and each reward's mean; `columns` holds
        one value per completion of every column a reward reads."""
        total = torch.zeros(len(completions), dtype=torch.float64)
        means = {}
        for reward in self.rewards:
            wanted = columns if reward.all_columns else \
                {c: columns.get(c, [""] * len(completions)) for c in reward.columns}
            values = torch.tensor(reward(prompts, completions, wanted), dtype=torch.float64)
            total += reward.weight * values
            means[f"reward/{reward.name}"] = values.mean()
        return total, means

    def rollout(self, model, batch: dict) -> dict:
        """Sample and score the batch's groups: completions, rewards, advantages, seconds."""
        started = time.perf_counter()
        train_seconds = started - self._last_call if self._last_call is not None else 0.0
        labels = self.sample(model, batch)
        sample_seconds = time.perf_counter() - started
        self._last_call = time.perf_counter()
        rewards, reward_means = self.score(batch, labels)
        return {"labels": labels, "rewards": rewards, "reward_means": reward_means,
                "advantages": self.advantages(rewards).to(labels.device), "old_logps": None,
                "sample_seconds": sample_seconds, "train_seconds": train_seconds}

    def loss(self, model, batch: dict, reference: Reference | None) -> tuple[torch.Tensor, dict]:
        rollout = batch.get("rollout")
        first = rollout is None
        if first:
            rollout = batch["rollout"] = self.rollout(model, batch)
        labels, rewards, advantages = rollout["labels"], rollout["rewards"], rollout["advantages"]
        # Per update: the sampling's cost is shared by the updates on its samples.
        sample_seconds = rollout["sample_seconds"] / self.updates_per_batch
        train_seconds = rollout["train_seconds"] / self.updates_per_batch
        reward_means = rollout["reward_means"]
        g = self.group_size
        # One encoder pass per prompt, its output repeated for the prompt's G completions.
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels,
                  "encoder_repeats": g}
        # Log-probabilities of the distribution sampled from: the logits over the temperature (as TRL).
        logps = self.token_logps(model(**inputs).logits / self.temperature, labels)
        if first:
            # No update since the sampling: this policy sampled them, so the ratio is 1 (its
            # gradient is the policy gradient) and no second forward is needed. Later updates
            # on the same samples compare with these.
            rollout["old_logps"] = logps.detach()
            if reference is not None and self.beta:
                rollout["ref_logps"] = self.token_logps(reference(**inputs).logits / self.temperature, labels)
        old, ref = rollout["old_logps"], rollout.get("ref_logps")
        mask = labels != LABEL_PAD
        loss, stats = self.policy_loss(logps, old, advantages, mask, ref)
        grouped = rewards.view(-1, g)  # on the host: the rewards were computed there
        self._signal = self._signal or bool((grouped.max(1).values != grouped.min(1).values).any())
        device = loss.device
        tokens = mask.sum()
        values = {"loss": loss.detach(), "reward": rewards.mean(), "reward_std": rewards.std(),
                  "zero_std_groups": (grouped.max(1).values == grouped.min(1).values).float().mean(),
                  "completion_length": mask.sum(1).float().mean(), **stats,
                  "sample_seconds": torch.tensor(sample_seconds), "train_seconds": torch.tensor(train_seconds),
                  "sampled_tokens_per_s": tokens.float() / max(rollout["sample_seconds"], 1e-9)}
        if len(self.rewards) > 1:
            values.update(reward_means)
        return loss, {k: torch.as_tensor(v, dtype=torch.float32).to(device) for k, v in values.items()}


def get_objective(cfg):
    if cfg.objective == "grpo":
        from model.rewards import parse_rewards
        objective = GRPO(parse_rewards(cfg.reward), cfg.grpo_group_size, cfg.grpo_max_new_tokens,
                         cfg.grpo_temperature, cfg.grpo_top_p, cfg.grpo_clip_eps, cfg.grpo_clip_eps_high,
                         cfg.grpo_beta, cfg.grpo_loss_aggregation, cfg.grpo_iterations)
    elif cfg.objective == "dpo":
        objective = DPO(cfg.dpo_beta, cfg.dpo_loss, cfg.dpo_label_smoothing, cfg.dpo_rpo_alpha)
    else:
        objective = Seq2Seq(cfg.kl_beta)
    objective.pad_multiple = cfg.pad_multiple
    return objective
