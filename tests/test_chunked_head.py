"""The output head and loss in chunks of tokens (model/chunked.py): the same losses and gradients
as from the full logits, for every objective, and far less memory."""
import copy
import threading
import time

import psutil
import pytest
import torch
from transformers import AutoTokenizer, T5Config

from model.chat_model import TextToTextModel
from model.objectives import DPO, GRPO, LABEL_PAD, Seq2Seq
from model.policy import Reference


def tiny_model(vocab=128, d_model=32, layers=2, seed=0):
    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab, d_model=d_model, d_ff=2 * d_model, d_kv=8, num_heads=4, num_layers=layers,
                      num_decoder_layers=layers, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                      eos_token_id=1)
    return TextToTextModel(config)


def padded_batch(rows=6, vocab=128, seed=1):
    """Prompts and labels of unequal lengths: padding in both, -100 labels after each answer."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab, (rows, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(2, vocab, (rows, 11), generator=g)
    for i in range(rows):
        attention_mask[i, 9 - i % 4:] = 0
        input_ids[i, 9 - i % 4:] = 0
        labels[i, 11 - 2 * (i % 5):] = LABEL_PAD
        labels[i, 10 - 2 * (i % 5)] = 1  # [EOS] ends each answer
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(objective, model, batch, reference, chunk, seed=5):
    objective.chunk = chunk
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # GRPO samples: the same completions both ways
    loss, values = objective.loss(model, batch, reference)
    loss.backward()
    return loss.detach(), values, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def objectives(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    from model.rewards import parse_rewards
    grpo = GRPO(parse_rewards("lcs_f1"), group_size=3, max_new_tokens=6, temperature=0.8, beta=0.05)
    grpo.set_tokenizer(tokenizer)
    return {"seq2seq": Seq2Seq(), "kl_beta": Seq2Seq(kl_beta=0.3), "dpo": DPO(beta=0.1, rpo_alpha=0.5), "grpo": grpo}


@pytest.mark.parametrize("frozen_head", [False, True], ids=["head_trains", "head_frozen"])
@pytest.mark.parametrize("name", ["seq2seq", "kl_beta", "dpo", "grpo"])
def test_chunked_losses_and_gradients_equal_the_full_logits_ones(tokenizer_dir, name, frozen_head):
    """Every objective, with the head (the shared embedding) training, and frozen as SFT and LoRA
    keep it (then the hidden states' gradients are made in forward)."""
    objective = objectives(tokenizer_dir)[name]
    model = tiny_model()
    model.shared.requires_grad_(not frozen_head)
    reference_model = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():  # a reference that differs: KL and log-ratios are not 0
        for p in reference_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = padded_batch()
    if name == "dpo":  # chosen (rows 0-2) and rejected (3-5) of three prompts
        batch = {"input_ids": batch["input_ids"][:3], "attention_mask": batch["attention_mask"][:3],
                 "labels": batch["labels"]}
    if name == "grpo":
        batch = {k: v for k, v in batch.items() if k != "labels"}
        batch["texts"] = {"prompt": ["一"] * 6, "response": ["二三", "四", "五六七", "八", "九十", "百"]}
    reference = Reference(reference_model)
    full = loss_and_grads(objective, model, batch, reference, chunk=0)
    # 7 tokens a chunk: chunks end mid-answer and mid-padding; 10_000: one chunk.
    for chunk in (7, 10_000):
        chunked = loss_and_grads(objective, model, batch, reference, chunk=chunk)
        assert float(chunked[0]) == pytest.approx(float(full[0]), rel=1e-5, abs=1e-7)
        for key, value in full[1].items():
            if key.endswith("seconds") or key.endswith("per_s"):
                continue  # clocks
            assert float(chunked[1][key]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), key
        assert full[2].keys() == chunked[2].keys() and ("shared.weight" in full[2]) != frozen_head
        for n, g in full[2].items():
            scale = float(g.abs().max()) + 1e-12
            assert float((chunked[2][n] - g).abs().max()) <= 1e-5 * scale, n


class PeakRSS:
    """The process's largest resident memory above where it stood at entry, sampled every 2 ms
    (large tensors are mapped and unmapped whole, so RSS follows them)."""

    def __enter__(self):
        self.process, self.done = psutil.Process(), False
        self.base = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.done:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()
        self.growth = self.peak - self.base


def test_a_training_step_at_the_real_vocabulary_holds_no_full_logits(tokenizer_dir):
    """Vocabulary 29,298 and a micro-batch of 16k target tokens: one full-logits tensor is 1.9 GB."""
    vocab, rows, length = 29_298, 64, 256
    model = tiny_model(vocab=vocab, d_model=32, layers=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(2, vocab, (rows, 32), generator=g),
             "attention_mask": torch.ones(rows, 32, dtype=torch.long),
             "labels": torch.randint(2, vocab, (rows, length), generator=g)}
    assert int((batch["labels"] != LABEL_PAD).sum()) == 16_384
    growth = {}
    for chunk in (1024, 0):
        objective = Seq2Seq()
        objective.chunk = chunk
        with PeakRSS() as peak:
            loss, _ = objective.loss(model, batch, None)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        growth[chunk] = peak.growth
        del loss
    saved = growth[0] - growth[1024]
    print(f"peak RSS growth of one step: full logits {growth[0] / 2**30:.2f} GiB, "
          f"chunks of 1024 {growth[1024] / 2**30:.2f} GiB")
    assert saved >= 2**30, growth


def test_each_chunk_of_the_cross_entropy_launches_few_operators():
    """Each operator is a kernel launch on a GPU, where a small model waits on the host: a chunk
    of the cross-entropy (forward and backward) takes 15 (26 when the mask, the label picks' sum
    and the -1 at each label were made a chunk at a time)."""
    from model.chunked import summed_nll
    from utils.syncs import Operators

    hidden, head = torch.randn(4, 16, 8, requires_grad=True), torch.randn(32, 8, requires_grad=True)
    labels = torch.randint(0, 32, (4, 16))
    labels[:, -2:] = LABEL_PAD
    counts = []
    for chunk in (16, 8):  # 4 chunks, then 8
        with Operators() as ops:
            summed_nll(hidden, head, labels, chunk).backward()
        counts.append(ops.count)
    assert (counts[1] - counts[0]) / 4 <= 16
