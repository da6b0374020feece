"""Alignment on the one loop: DPO, LoRA, KL-regularised finetuning, pairs from a model's answers."""
import math
import os

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from config import load_config
from conftest import as_dpo_file, run_cli, tiny_flags, write_rows
from model.objectives import DPO, Seq2Seq, sequence_logps
from model.trainer import ChatTrainer
from utils.errors import UserError
from utils.logging import read_metrics


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield


def train(flags) -> ChatTrainer:
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    trainer = ChatTrainer(load_config(**flags))
    trainer.train()
    return trainer


# ---- the losses, against their formulas ----------------------------------------------------

@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_losses_equal_their_formulas(loss_type, smoothing):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    beta = 0.3
    losses, rewards = DPO(beta, loss_type, smoothing).losses(torch.cat([pc, pr]), torch.cat([rc, rr]))
    for i in range(6):
        h = (pc[i].item() - pr[i].item()) - (rc[i].item() - rr[i].item())
        if loss_type == "sigmoid":
            expected = (-(1 - smoothing) * math.log(1 / (1 + math.exp(-beta * h)))
                        - smoothing * math.log(1 / (1 + math.exp(beta * h))))
        elif loss_type == "ipo":
            expected = (h - 1 / (2 * beta)) ** 2
        else:
            expected = max(0.0, 1 - beta * h)
        assert losses[i].item() == pytest.approx(expected, abs=1e-6)
        chosen, rejected = beta * (pc[i] - rc[i]).item(), beta * (pr[i] - rr[i]).item()
        assert rewards["rewards/chosen"][i].item() == pytest.approx(chosen, abs=1e-9)
        assert rewards["rewards/rejected"][i].item() == pytest.approx(rejected, abs=1e-9)
        assert rewards["rewards/margin"][i].item() == pytest.approx(chosen - rejected, abs=1e-9)
        assert rewards["rewards/accuracy"][i].item() == float(chosen > rejected)


def test_sequence_logp_is_the_sum_of_token_log_softmax_over_the_response():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.tensor([[3, 4, 1, -100, -100], [7, 1, -100, -100, -100], [2, 2, 2, 2, 1]])
    got = sequence_logps(logits, labels)
    for b in range(3):
        expected = sum(torch.log_softmax(logits[b, t], -1)[labels[b, t]].item()
                       for t in range(5) if labels[b, t] != -100)
        assert got[b].item() == pytest.approx(expected, abs=1e-5)
    lengths = (labels != -100).sum(1)
    assert torch.allclose(sequence_logps(logits, labels, average=True), got / lengths)


def test_kl_beta_zero_is_todays_seq2seq_loss_exactly(base_model, tokenizer_dir):
    from model.chat_model import TextToTextModel
    from model.dataset import collate
    model = TextToTextModel.from_pretrained(base_model)
    batch = collate([[5, 6, 7, 1], [8, 1]], [[9, 10, 1], [11, 12, 13, 1]])
    loss, values = Seq2Seq(0.0).loss(model, batch, None)
    assert torch.equal(loss, model(**batch).loss) and set(values) == {"loss"}


# ---- DPO through the trainer ---------------------------------------------------------------

@pytest.fixture
def pairs(tmp_path, data_dir):
    return (as_dpo_file(data_dir / "train.parquet", tmp_path / "pairs.parquet"),
            as_dpo_file(data_dir / "valid.parquet", tmp_path / "valid_pairs.parquet"))


def test_dpo_trains_only_trainable_weights_and_never_the_reference(tmp_path, data_dir, tokenizer_dir, base_model,
                                                                   pairs):
    start = load_file(os.path.join(base_model, "model.safetensors"))
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, objective="dpo", init_from=base_model, trainable="decoder",
                       train_file=pairs[0], validation_file=pairs[1], max_steps=6, learn_rate=3e-3, eval_steps=3)
    trainer = train(flags)
    reference = trainer.reference.model
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, start[name] if name in start else start["shared.weight"]), name  # bitwise
    model = trainer.accelerator.unwrap_model(trainer.model)
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(id(p) in in_optimizer for p in reference.parameters())
    after = model.state_dict()
    assert all(torch.equal(after[k], start[k]) for k in after if k.startswith("encoder.") and k in start)
    assert not torch.equal(after["decoder.block.0.layer.0.SelfAttention.q.weight"],
                           start["decoder.block.0.layer.0.SelfAttention.q.weight"])
    records = read_metrics(flags["output_dir"])
    train_keys = {k for r in records for k in r if k.startswith("train/")}
    assert {"train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/accuracy",
            "train/rewards/margin"} <= train_keys
    evals = [r for r in records if "eval/rewards/accuracy" in r]
    assert evals and all("eval/exact_match" in r and "eval/loss" in r for r in evals)
    margins = [r["train/rewards/margin"] for r in records if "train/rewards/margin" in r]
    assert margins[-1] > margins[0]  # chosen pulls away from rejected


def test_start_up_errors_of_the_alignment_settings(tmp_path, data_dir, tokenizer_dir, base_model):
    with pytest.raises(UserError, match="--objective=dpo needs --init_from"):
        load_config(objective="dpo")
    with pytest.raises(UserError, match="trains the decoder, not LoRA"):
        load_config(is_finetune=True, finetune_from_ckp_file=base_model, trainable="lora")
    with pytest.raises(UserError, match="--kl_beta needs --init_from"):
        load_config(kl_beta=0.1)
    with pytest.raises(UserError, match="best_metric"):
        load_config(objective="dpo", init_from=base_model, best_metric="bleu5")
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, objective="dpo", init_from=base_model)
    with pytest.raises(UserError, match="has no column chosen, rejected"):  # a prompt/response file
        train(flags)
    assert not os.path.exists(flags["output_dir"])


def test_the_old_finetune_flags_mean_init_from_and_decoder():
    cfg = load_config(is_finetune=True, finetune_from_ckp_file="m")
    assert (cfg.start_from, cfg.trains) == ("m", "decoder")
    cfg = load_config(init_from="m", trainable="lora")
    assert (cfg.start_from, cfg.trains) == ("m", "lora")


# ---- LoRA --------------------------------------------------------------------------------

def test_lora_trains_only_adapters_and_saves_a_merged_model_and_the_adapter(tmp_path, data_dir, tokenizer_dir,
                                                                            base_model):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    from model.chat_model import TextToTextModel
    start = load_file(os.path.join(base_model, "model.safetensors"))
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, init_from=base_model, trainable="lora", lora_r=4,
                       max_steps=8, learn_rate=1e-2, gradient_checkpointing=True, eval_steps=4)
    trainer = train(flags)
    model = trainer.accelerator.unwrap_model(trainer.model)
    for name, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in name), name
        if "lora_" not in name:
            base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, start.get(base_name, start["shared.weight"])), name  # the base is untouched
    assert any(float(p.abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)  # adapters learned
    in_optimizer = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    assert in_optimizer == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    final = os.path.join(flags["output_dir"], "final")
    merged = AutoModelForSeq2SeqLM.from_pretrained(final).eval()
    adapted = PeftModel.from_pretrained(TextToTextModel.from_pretrained(base_model), os.path.join(final, "adapter"))
    model.eval()
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8, 1]]), "labels": torch.tensor([[9, 10, 11, 1]])}
    with torch.no_grad():
        ours = model(**inputs).logits
        assert (merged(**inputs).logits - ours).abs().max() < 1e-5
        assert (adapted.eval()(**inputs).logits - ours).abs().max() < 1e-5
    assert os.path.isfile(os.path.join(flags["output_dir"], "best", "adapter", "adapter_model.safetensors"))


def test_kl_is_zero_at_the_first_step_and_grows(tmp_path, data_dir, tokenizer_dir, base_model):
    for trainable in ("all", "lora"):
        flags = tiny_flags(tmp_path / trainable, data_dir, tokenizer_dir, init_from=base_model, trainable=trainable,
                           kl_beta=0.1, max_steps=10, learn_rate=1e-2, validation_file="")
        train(flags)
        records = [r for r in read_metrics(flags["output_dir"]) if "train/kl" in r]
        assert records[0]["step"] == 1 and records[0]["train/kl"] == pytest.approx(0.0, abs=1e-7), trainable
        assert records[-1]["train/kl"] > 1e-4, trainable
        for r in records:  # cross-entropy and KL are logged apart, the loss is their sum
            assert r["train/loss"] == pytest.approx(r["train/ce"] + 0.1 * r["train/kl"], rel=1e-4)


# ---- pairs from the model's own answers ----------------------------------------------------

class ScriptedBot:
    """Answers from a table: which rows equal their reference is then known exactly."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def answer(self, prompts, search_type="greedy", batch_size=32):
        self.calls.append(len(prompts))
        return [self.answers[p] for p in prompts]


def test_make_dpo_pairs_writes_pairs_and_drops_identical_ones(tmp_path, base_model):
    from model.infer import make_dpo_pairs
    prompts = [f"把{n}写成中文数字。" for n in range(7)]
    responses = ["零", "一", "二", "三", "四", "五", "六"]
    answers = {p: (r if i in (1, 4) else r + "十") for i, (p, r) in enumerate(zip(prompts, responses))}
    answers[prompts[5]] = " 五 "  # equal to the reference once whitespace is ignored
    source = write_rows(tmp_path / "sft.parquet", prompts + [""], responses + ["x"], row_group_size=3,
                        task=list("abababab"))
    out = tmp_path / "pairs.parquet"
    counts = make_dpo_pairs(ScriptedBot(answers), source, str(out), batch_size=2, log=lambda _: None)
    assert counts == {"read": 8, "kept": 4, "same_as_reference": 3, "empty": 1}
    table = pq.read_table(out)
    assert table.column_names == ["prompt", "chosen", "rejected", "task"]
    assert table.to_pylist() == [{"prompt": prompts[i], "chosen": responses[i], "rejected": answers[prompts[i]],
                                  "task": "ab"[i % 2]} for i in (0, 2, 3, 6)]
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    # Through the command line with the real model: the same columns, every pair differing.
    proc = run_cli("train.py", "make_dpo_pairs", f"--model_dir={base_model}", f"--input={source}",
                   f"--output={tmp_path / 'real.parquet'}", "--batch_size=3")
    real = pq.read_table(tmp_path / "real.parquet")
    assert real.column_names == ["prompt", "chosen", "rejected", "task"] and "8 rows read" in proc.stdout
    assert all(r["chosen"] != r["rejected"] for r in real.to_pylist())
    refused = run_cli("train.py", "make_dpo_pairs", f"--model_dir={base_model}", f"--input={source}",
                      f"--output={source}", check=False)
    assert refused.returncode == 2 and "is the input" in refused.stderr
