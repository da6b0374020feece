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
"""
import torch
import torch.nn.functional as F

LABEL_PAD = -100  # ignored by the loss


def pad(rows: list, value: int) -> torch.Tensor:
    """Token id arrays -> (len(rows), longest) tensor padded with `value`."""
    out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
    for i, ids in enumerate(rows):
        out[i, :len(ids)] = torch.as_tensor(ids)
    return out


def encoder_inputs(prompts: list) -> dict:
    input_ids = pad(prompts, 0)
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
    columns = ("prompt", "response")
    target = "response"  # what greedy answers are compared with
    default_best_metric = "bleu4"

    def __init__(self, kl_beta: float = 0.0):
        self.kl_beta = kl_beta
        self.needs_reference = kl_beta > 0
        self.metric_names = ("loss", "ce", "kl") if kl_beta > 0 else ("loss",)

    def collate(self, rows: dict) -> dict:
        """{"prompt": [ids], "response": [ids]} -> padded encoder inputs and labels."""
        return {**encoder_inputs(rows["prompt"]), "labels": pad(rows["response"], LABEL_PAD)}

    def count_tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum()) + int((batch["labels"] != LABEL_PAD).sum())

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

    def eval_metrics(self, sums: dict) -> dict:
        import math
        loss = float(sums["loss_sum"].sum()) / max(1.0, float(sums["tokens"].sum()))
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
        if "kl_sum" in sums:
            metrics["kl"] = float(sums["kl_sum"].sum()) / max(1.0, float(sums["tokens"].sum()))
        return metrics


class DPO:
    name = "dpo"
    columns = ("prompt", "chosen", "rejected")
    target = "chosen"
    default_best_metric = "rewards/accuracy"
    needs_reference = True
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

    def collate(self, rows: dict) -> dict:
        """Prompts once; chosen (rows 0..B-1) and rejected (B..2B-1) labels stacked, one padding."""
        return {**encoder_inputs(rows["prompt"]), "labels": pad(rows["chosen"] + rows["rejected"], LABEL_PAD)}

    def count_tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum()) + int((batch["labels"] != LABEL_PAD).sum())

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


def get_objective(cfg):
    if cfg.objective == "dpo":
        return DPO(cfg.dpo_beta, cfg.dpo_loss, cfg.dpo_label_smoothing, cfg.dpo_rpo_alpha)
    return Seq2Seq(cfg.kl_beta)
