"""What differs between training objectives, in one small object the trainer calls.

The contract, `Objective` below, is all the loop, the data stream and evaluation know of an
objective; they never ask which one they run. An objective is one class and a line in
`OBJECTIVES`; it touches no other module. The classes share tensor helpers (the functions at the
top), never an implementation by inheritance.

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
import math
import time
from typing import ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from model.chunked import use_chunks
from utils.errors import UserError
from utils.metrics import normalise

LABEL_PAD = -100  # ignored by the loss
EOS = 1  # [EOS]; [PAD] = 0 is also T5's decoder start token


class Objective(Protocol):
    """The members every objective has (the loop, the stream, evaluation and config use these)."""
    name: ClassVar[str]
    columns: tuple[str, ...]  # text columns, tokenized; the first is the encoder's input
    target: str | None  # the column greedy answers are compared with (None: none)
    text_columns: tuple[str, ...]  # raw columns travelling with each batch as batch["texts"] ("*": all)
    pad_multiple: int  # padded lengths are rounded up to this
    chunk: int  # tokens per chunk of the output head and loss (0: from the full logits); loss_chunk_tokens
    vocab: int  # the vocabulary's size, which decides with a batch's shape whether -1 chunks it
    updates_per_batch: int  # optimizer updates made on each batch (GRPO's iterations)
    needs_reference: bool
    dropout_free: bool  # compares the policy with a reference or itself: dropout would be noise
    metric_names: tuple[str, ...]  # what `loss` returns in its values, logged as train/NAME
    unit_scale: int  # about how many loss units a row holds (the micro-batch weights' fixed scale)
    no_usable_row: ClassVar[str | None]  # why a file has no row to train on beyond empty texts
    default_best_metric: ClassVar[str]
    eval_metric_names: ClassVar[tuple[str, ...]]  # what evaluation reports (exact_match/TASK, reward/NAME too)

    @classmethod
    def from_config(cls, cfg) -> "Objective": ...
    @staticmethod
    def check_settings(cfg) -> None: ...  # the settings' rules for this objective: UserError at start-up
    @staticmethod
    def dropout_free_for(cfg) -> bool: ...
    def set_tokenizer(self, tokenizer) -> None: ...
    def usable_rows(self, texts: dict) -> np.ndarray: ...  # which rows of {column: texts} train
    def collate(self, rows: dict) -> dict: ...  # {column: [token ids]} -> padded tensors
    # Counted from the token id arrays where the batch is built (the DataLoader workers), never
    # from its tensors: the loop reads no tensor on the host between log steps.
    def count_tokens(self, rows: dict) -> int: ...  # {column: [token ids]} -> tokens, for throughput
    def loss_units(self, rows: dict) -> int: ...  # what the loss is a mean over (tokens, pairs, prompts)
    def loss(self, model, batch: dict, reference, update: int = 0) -> tuple[torch.Tensor, dict]: ...
    def take_signal(self) -> bool | None: ...  # whether the micro-batches since the last call could teach
    def eval_rows(self, model, batch: dict, reference) -> dict: ...  # per-row sums, gathered
    def eval_metrics(self, sums: dict) -> dict: ...
    def answer_metrics(self, prompts: list[str], answers: list[str], columns: dict) -> dict: ...


# ---- shared tensor helpers -----------------------------------------------------------------------

def non_empty(*columns: list) -> np.ndarray:
    """Rows whose every text is non-null and not only whitespace."""
    return np.array([all(t and t.strip() for t in texts) for texts in zip(*columns)], dtype=bool)


def pad(rows: list, value: int, multiple: int = 1) -> torch.Tensor:
    """Token id arrays -> (len(rows), longest rounded up to `multiple`) tensor padded with `value`:
    one scatter of all rows' ids at once, not a copy per row."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    out = np.full((len(rows), -(-int(lengths.max()) // multiple) * multiple), value, dtype=np.int64)
    out[np.arange(out.shape[1]) < lengths[:, None]] = np.concatenate(rows) if len(rows) else []
    return torch.from_numpy(out)


def encoder_inputs(prompts: list, multiple: int = 1) -> dict:
    input_ids = pad(prompts, 0, multiple)
    lengths = np.fromiter(map(len, prompts), dtype=np.int64, count=len(prompts))
    attention_mask = torch.from_numpy((np.arange(input_ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64))
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def prompt_response_batch(rows: dict, multiple: int = 1) -> dict:
    """{"prompt": [ids], "response": [ids]} -> padded encoder inputs and labels."""
    return {**encoder_inputs(rows["prompt"], multiple), "labels": pad(rows["response"], LABEL_PAD, multiple)}


def row_tokens(rows: dict, *columns: str) -> int:
    """Tokens of `columns` (all: none given) in {column: [token ids]}, as collate pads them."""
    return sum(len(ids) for c in columns or rows for ids in rows[c])


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) log-probability of each label (B, T; -100 = padding) under `logits` (B, T, V)."""
    return torch.gather(logits.float().log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-sequence log-probability of `labels` (B, T; -100 = padding) under `logits` (B, T, V).

    An encoder-decoder scores its labels at their own positions (the decoder input is the
    labels shifted right inside the model): no shift here. `average` divides by the length.
    """
    mask = labels != LABEL_PAD
    summed = (token_logps(logits, labels) * mask).sum(-1)
    return summed / mask.sum(-1).clamp(min=1) if average else summed


def label_logps(model, batch: dict, chunk: int, vocab: int, temperature: float = 1.0, **inputs) -> torch.Tensor:
    """(B, T) log-probability of each label of `batch` at `temperature` (0 at padding): through
    the head in chunks of `chunk` tokens (model/chunked.py), or from the full logits (`chunk` 0,
    or -1 on a batch whose logits are small: use_chunks)."""
    if use_chunks(chunk, batch["labels"], vocab):
        return model(**batch, **inputs, head="logps", chunk=chunk, temperature=temperature).token_logps
    logits = model(**batch, **inputs).logits
    return token_logps(logits / temperature if temperature != 1.0 else logits, batch["labels"]) * \
        (batch["labels"] != LABEL_PAD)


def per_token_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """(B, T) KL(policy || reference) over the whole vocabulary at each position."""
    logp, logq = policy_logits.float().log_softmax(-1), reference_logits.float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def cross_entropy_rows(model, batch: dict) -> tuple[dict, torch.Tensor]:
    """Per-row summed token loss and target tokens of `batch`, and the logits."""
    logits = model(**batch).logits
    mask = batch["labels"] != LABEL_PAD
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), batch["labels"], ignore_index=LABEL_PAD,
                                 reduction="none")
    return {"loss_sum": (token_loss * mask).sum(1), "tokens": mask.sum(1).float()}, logits


def cross_entropy_metrics(sums: dict) -> dict:
    """Loss per target token and perplexity (and KL per token) from gathered per-row sums."""
    tokens = max(1.0, float(sums["tokens"].sum()))
    loss = float(sums["loss_sum"].sum()) / tokens
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
    if "kl_sum" in sums:
        metrics["kl"] = float(sums["kl_sum"].sum()) / tokens
    return metrics


# ---- the objectives --------------------------------------------------------------------------------

class Seq2Seq:
    name = "seq2seq"
    columns = ("prompt", "response")
    target = "response"
    text_columns = ()
    updates_per_batch = 1
    pad_multiple = 1
    chunk = 0
    vocab = 0  # the model's, set by the trainer: use_chunks weighs a batch's logits by it
    unit_scale = 32  # target tokens per row, about
    no_usable_row = None
    default_best_metric = "bleu4"
    eval_metric_names = ("loss", "perplexity", "bleu4", "exact_match", "kl")

    def __init__(self, kl_beta: float = 0.0):
        self.kl_beta = kl_beta
        self.needs_reference = self.dropout_free = kl_beta > 0
        self.metric_names = ("loss", "ce", "kl") if kl_beta > 0 else ("loss",)

    @classmethod
    def from_config(cls, cfg) -> "Seq2Seq":
        return cls(cfg.kl_beta)

    @staticmethod
    def check_settings(cfg) -> None:
        if cfg.kl_beta and not cfg.start_from:
            raise UserError("--kl_beta needs --init_from=DIR: the KL is taken to the model training starts from")

    @staticmethod
    def dropout_free_for(cfg) -> bool:
        return cfg.kl_beta > 0

    def set_tokenizer(self, tokenizer) -> None:
        pass

    def usable_rows(self, texts: dict) -> np.ndarray:
        """Which rows of {column: texts} train (the others are skipped and counted): no text empty."""
        return non_empty(*(texts[c] for c in self.columns))

    def collate(self, rows: dict) -> dict:
        return prompt_response_batch(rows, self.pad_multiple)

    def count_tokens(self, rows: dict) -> int:
        return row_tokens(rows)

    def loss_units(self, rows: dict) -> int:
        """What the loss is a mean over, counted in a batch: the target tokens. The loop weights
        each micro-batch by it, so an optimizer step's loss is the mean over all its units."""
        return row_tokens(rows, "response")

    def loss(self, model, batch: dict, reference, update: int = 0) -> tuple[torch.Tensor, dict]:
        # The plain cross-entropy in chunks (ChunkedNLL) takes the full logits' three head matmuls
        # and was as fast or faster at every size measured: -1 chunks it always. With kl_beta,
        # chunks recompute the logits in backward, and -1 keeps small batches' full logits.
        chunked = use_chunks(self.chunk, batch["labels"], self.vocab) if self.kl_beta else self.chunk != 0
        if chunked:
            return self.chunked_loss(model, batch, reference)
        out = model(**batch)
        if not self.kl_beta:
            return out.loss, {"loss": out.loss.detach()}
        kl = self.token_kl(out.logits, reference(**batch).logits, batch["labels"])
        loss = out.loss + self.kl_beta * kl
        return loss, {"loss": loss.detach(), "ce": out.loss.detach(), "kl": kl.detach()}

    def chunked_loss(self, model, batch: dict, reference) -> tuple[torch.Tensor, dict]:
        """The same loss with no (tokens, vocabulary) tensor kept (model/chunked.py)."""
        tokens = (batch["labels"] != LABEL_PAD).sum().clamp(min=1)
        if not self.kl_beta:
            ce = model(**batch, head="nll", chunk=self.chunk).summed_nll / tokens
            return ce, {"loss": ce.detach()}
        kl_to = (reference(**batch, head="hidden").hidden, reference.head_weight())
        out = model(**batch, head="logps", chunk=self.chunk, kl_to=kl_to)
        ce, kl = -out.token_logps.sum() / tokens, out.token_kl.sum() / tokens
        loss = ce + self.kl_beta * kl
        return loss, {"loss": loss.detach(), "ce": ce.detach(), "kl": kl.detach()}

    @staticmethod
    def token_kl(policy_logits, reference_logits, labels) -> torch.Tensor:
        """Mean over response tokens of KL(policy || reference) over the whole vocabulary."""
        mask = labels != LABEL_PAD
        return (per_token_kl(policy_logits, reference_logits) * mask).sum() / mask.sum().clamp(min=1)

    def take_signal(self) -> bool | None:
        return None

    @torch.no_grad()
    def eval_rows(self, model, batch: dict, reference) -> dict:
        """Per-row sums for evaluation: summed token loss and target tokens (and KL)."""
        rows, logits = cross_entropy_rows(model, batch)
        if reference is not None and self.kl_beta:
            mask = batch["labels"] != LABEL_PAD
            rows["kl_sum"] = (per_token_kl(logits, reference(**batch).logits) * mask).sum(1)
        return rows

    def eval_metrics(self, sums: dict) -> dict:
        return cross_entropy_metrics(sums)

    def answer_metrics(self, prompts: list[str], answers: list[str], columns: dict) -> dict:
        """Metrics of the greedy answers beyond BLEU and exact match: none."""
        return {}


class DPO:
    name = "dpo"
    columns = ("prompt", "chosen", "rejected")
    target = "chosen"
    text_columns = ()
    updates_per_batch = 1
    pad_multiple = 1
    chunk = 0
    vocab = 0  # the model's, set by the trainer: use_chunks weighs a batch's logits by it
    unit_scale = 1  # the loss is a mean over pairs
    needs_reference = True
    dropout_free = True
    no_usable_row = ("in every row chosen equals rejected (whitespace and full-width forms ignored) or a text is "
                     "empty: identical answers carry no preference; give pairs whose answers differ")
    # rewards/accuracy saturates at 1.0 long before the answers are good (pure DPO reaches 100%
    # with 0% exact match): best/ follows the greedy answers against chosen instead.
    default_best_metric = "exact_match"
    eval_metric_names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "bleu4",
                         "exact_match")
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

    @classmethod
    def from_config(cls, cfg) -> "DPO":
        return cls(cfg.dpo_beta, cfg.dpo_loss, cfg.dpo_label_smoothing, cfg.dpo_rpo_alpha)

    @staticmethod
    def check_settings(cfg) -> None:
        if not cfg.start_from:
            raise UserError("--objective=dpo needs --init_from=DIR (the model to improve, e.g. model_save/best): "
                            "it is also the reference")
        if cfg.kl_beta:
            raise UserError("--kl_beta is for --objective=seq2seq; DPO keeps to its reference through --dpo_beta")

    @staticmethod
    def dropout_free_for(cfg) -> bool:
        return True

    def set_tokenizer(self, tokenizer) -> None:
        pass

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

    def count_tokens(self, rows: dict) -> int:
        return row_tokens(rows)

    def loss_units(self, rows: dict) -> int:
        """The loss is a mean over pairs."""
        return len(rows["prompt"])

    def logps(self, model, batch: dict, nll: bool = False):
        """(2B,) log-probs of chosen then rejected: one forward over the stacked batch. With
        `nll`, also the mean negative log-likelihood per chosen token."""
        labels = batch["labels"]
        stacked = {"input_ids": batch["input_ids"].repeat(2, 1), "attention_mask": batch["attention_mask"].repeat(2, 1),
                   "labels": labels}
        summed = label_logps(model, stacked, self.chunk, self.vocab).sum(-1)
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

    def loss(self, model, batch: dict, reference, update: int = 0) -> tuple[torch.Tensor, dict]:
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
    def eval_rows(self, model, batch: dict, reference) -> dict:
        losses, rewards = self.losses(self.logps(model, batch), self.logps(reference, batch))
        return {"loss": losses, **rewards}

    def eval_metrics(self, sums: dict) -> dict:
        return {k: float(v.mean()) if len(v) else 0.0 for k, v in sums.items()}

    def answer_metrics(self, prompts: list[str], answers: list[str], columns: dict) -> dict:
        return {}

    def take_signal(self) -> bool | None:
        return None


class GRPO:
    """Samples `group_size` completions per prompt, rewards them, and pushes up the log-probability
    of those better than their group's mean (a clipped ratio objective, as PPO's), optionally
    held to the reference by the k3 estimator of KL(policy || reference).

    `grpo_iterations` updates are made on each batch of samples: the first samples and keeps the
    rollout (completions, rewards, log-probabilities) on the objective, the later ones reuse it.
    Evaluation scores the greedy answers to the held-out prompts with the rewards it trains on
    (`reward`, and `reward/NAME` for each of a weighted sum), which picks best/ by default; where
    the rows have a `response` (a reward reads it), also the loss and exact match against it.
    Sampling uses the process's torch RNG, which the train state saves, so a resumed run samples
    what the uninterrupted one would have.
    """
    name = "grpo"
    pad_multiple = 1
    chunk = 0
    vocab = 0  # the model's, set by the trainer: use_chunks weighs a batch's logits by it
    unit_scale = 1  # batches weigh by prompts
    no_usable_row = None
    default_best_metric = "reward"
    eval_metric_names = ("reward", "loss", "perplexity", "bleu4", "exact_match")
    # Sampling runs in eval mode and scoring in train mode: with dropout they would be two
    # different policies, and the ratio of the first update would not be 1.
    dropout_free = True

    def __init__(self, rewards: list, group_size: int = 8, max_new_tokens: int = 32, temperature: float = 1.0,
                 top_p: float = 1.0, clip_eps: float = 0.2, clip_eps_high: float = 0.0, beta: float = 0.0,
                 loss_aggregation: str = "token", iterations: int = 1):
        self.updates_per_batch = iterations
        self.rewards, self.group_size, self.max_new_tokens = rewards, group_size, max_new_tokens
        self.temperature, self.top_p = temperature, top_p
        self.clip_low, self.clip_high = clip_eps, clip_eps_high or clip_eps
        self.beta, self.loss_aggregation = beta, loss_aggregation
        self.needs_reference = beta > 0
        self.tokenizer = None  # completions are decoded for the rewards (set_tokenizer)
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
        self.rollout = None  # the samples of the batch being updated on
        self._last_call = None  # when the previous micro-step's sampling ended
        self._signal = False  # a group with unequal rewards since take_signal (read on the host: no sync)

    @classmethod
    def from_config(cls, cfg) -> "GRPO":
        from model.rewards import parse_rewards
        return cls(parse_rewards(cfg.reward), cfg.grpo_group_size, cfg.grpo_max_new_tokens, cfg.grpo_temperature,
                   cfg.grpo_top_p, cfg.grpo_clip_eps, cfg.grpo_clip_eps_high, cfg.grpo_beta,
                   cfg.grpo_loss_aggregation, cfg.grpo_iterations)

    @staticmethod
    def check_settings(cfg) -> None:
        if not cfg.start_from:
            raise UserError("--objective=grpo needs --init_from=DIR (the model to improve, e.g. model_save/best): "
                            "sampling from an untrained model earns no reward")
        if cfg.kl_beta:
            raise UserError("--kl_beta is for --objective=seq2seq; GRPO keeps to its reference through --grpo_beta")
        if cfg.grpo_group_size < 2:
            raise UserError(f"--grpo_group_size must be at least 2 (advantages compare a group's completions), "
                            f"got {cfg.grpo_group_size}")
        if not 0 < cfg.grpo_top_p <= 1:
            raise UserError(f"--grpo_top_p must be in (0, 1], got {cfg.grpo_top_p}")
        if cfg.grpo_iterations > 1 and cfg.gradient_accumulation_steps > 1:
            raise UserError("--grpo_iterations > 1 needs --gradient_accumulation_steps=1: each update reuses one "
                            "batch of samples; give a larger --batch_size_per_gpu instead")
        from model.rewards import parse_rewards
        rewards = parse_rewards(cfg.reward)  # imports the user's function now, not at the first step
        if cfg.best.startswith("reward/") and cfg.best[7:] not in [r.name for r in rewards]:
            raise UserError(f"--best_metric={cfg.best}: --reward has no {cfg.best[7:]}; choose reward or one of "
                            + ", ".join(f"reward/{r.name}" for r in rewards))
        reads_response = any("response" in r.columns for r in rewards)
        if cfg.best.split("/")[0] in ("loss", "perplexity", "bleu4", "exact_match") and not reads_response:
            raise UserError(f"--best_metric={cfg.best} compares with a response column, which no reward reads "
                            "here; pick best/ by --best_metric=reward")

    @staticmethod
    def dropout_free_for(cfg) -> bool:
        return True

    def set_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def usable_rows(self, texts: dict) -> np.ndarray:
        return non_empty(*(texts[c] for c in self.columns))

    def collate(self, rows: dict) -> dict:
        if "response" in rows:
            return prompt_response_batch(rows, self.pad_multiple)
        return encoder_inputs(rows["prompt"], self.pad_multiple)

    def count_tokens(self, rows: dict) -> int:
        return row_tokens(rows)

    def loss_units(self, rows: dict) -> int:
        """Prompts: the loss is a mean within the batch's samples, and batches weigh by prompts."""
        return len(rows["prompt"])

    @torch.no_grad()
    def eval_rows(self, model, batch: dict, reference) -> dict:
        return cross_entropy_rows(model, batch)[0] if "labels" in batch else {}

    def eval_metrics(self, sums: dict) -> dict:
        return cross_entropy_metrics(sums) if "loss_sum" in sums else {}

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

    token_logps = staticmethod(token_logps)

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

    def make_rollout(self, model, batch: dict) -> dict:
        """Sample and score the batch's groups: completions, rewards, advantages, seconds."""
        started = time.perf_counter()
        train_seconds = started - self._last_call if self._last_call is not None else 0.0
        labels = self.sample(model, batch)
        sample_seconds = time.perf_counter() - started
        self._last_call = time.perf_counter()
        rewards, reward_means = self.score(batch, labels)
        grouped = rewards.numpy().reshape(-1, self.group_size)  # on the host: the rewards were computed there
        return {"labels": labels, "rewards": rewards, "reward_means": reward_means,
                "signal": bool((grouped.max(1) != grouped.min(1)).any()),
                "advantages": self.advantages(rewards).to(labels.device), "old_logps": None,
                "sample_seconds": sample_seconds, "train_seconds": train_seconds}

    def loss(self, model, batch: dict, reference, update: int = 0) -> tuple[torch.Tensor, dict]:
        """Update `update` (0-based) of grpo_iterations on this batch: the first samples."""
        first = update == 0 or self.rollout is None
        if first:
            self.rollout = self.make_rollout(model, batch)
        rollout = self.rollout
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
        logps = label_logps(model, inputs, self.chunk, self.vocab, self.temperature)
        if first:
            # No update since the sampling: this policy sampled them, so the ratio is 1 (its
            # gradient is the policy gradient) and no second forward is needed. Later updates
            # on the same samples compare with these.
            rollout["old_logps"] = logps.detach()
            if reference is not None and self.beta:
                rollout["ref_logps"] = label_logps(reference, inputs, self.chunk, self.vocab, self.temperature)
        old, ref = rollout["old_logps"], rollout.get("ref_logps")
        mask = labels != LABEL_PAD
        loss, stats = self.policy_loss(logps, old, advantages, mask, ref)
        self._signal = self._signal or rollout["signal"]
        grouped = rewards.view(-1, g)
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


# The objectives by name: a new one is a class above (or anywhere) and a line here.
OBJECTIVES: dict[str, type] = {"seq2seq": Seq2Seq, "dpo": DPO, "grpo": GRPO}


def objective_class(name: str) -> type:
    if name not in OBJECTIVES:
        raise UserError(f"--objective={name!r} is not one of {list(OBJECTIVES)}")
    return OBJECTIVES[name]


def get_objective(cfg) -> Objective:
    objective = objective_class(cfg.objective).from_config(cfg)
    objective.pad_multiple = cfg.pad_multiple
    objective.chunk = cfg.loss_chunk_tokens
    return objective
