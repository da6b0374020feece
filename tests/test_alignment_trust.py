"""Alignment that trains against no noise: dropout off against the reference, the reference at the
policy's precision, LoRA with torch.compile, best/ by metrics that do not saturate, rewards that
read order and the one normaliser, LoRA targets checked, GRPO's encoder run once per prompt."""
import json
import math
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import StopAt, as_args, as_dpo_file, cli, tiny_flags, train
from model.objectives import GRPO, LABEL_PAD
from model.rewards import exact_match, lcs_f1, parse_rewards
from utils.errors import UserError
from utils.logging import read_metrics
from utils.metrics import exact_match_by_group


@pytest.fixture(scope="module")
def dropout_model(base_model, tmp_path_factory):
    """The tiny base model with dropout 0.1 in its config, as the `small` preset has."""
    out = tmp_path_factory.mktemp("dropout") / "model"
    shutil.copytree(base_model, out)
    config = json.loads((out / "config.json").read_text())
    config["dropout_rate"] = 0.1
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


class FirstLoss:
    """Runs `check(trainer, batch, loss, values)` on the first micro-batch, before any update."""

    def __init__(self, check):
        self.check, self.result = check, None

    def on_loss(self, trainer, batch, loss, values):
        if self.result is None and trainer.progress.step == 0:
            assert trainer.model.training  # the loop's own mode: train
            self.result = self.check(trainer, batch, loss, values)


def dpo_flags(tmp_path, data_dir, tokenizer_dir, model, **kw):
    os.makedirs(tmp_path, exist_ok=True)
    train_file = as_dpo_file(data_dir / "train.parquet", tmp_path / "pairs.parquet")
    return tiny_flags(tmp_path, data_dir, tokenizer_dir, objective="dpo", init_from=model, train_file=train_file,
                      validation_file="", max_steps=1, **kw)


def dpo_first_step(trainer, batch, loss, values):
    rows = trainer.objective.eval_rows(trainer.model, batch, trainer.reference)  # in the loop's train mode
    return float(loss.detach()), rows["rewards/margin"], rows["rewards/chosen"]


# ---- 1. dropout ------------------------------------------------------------------------------

def test_dpo_at_identical_weights_is_ln2_with_zero_margins_though_the_model_has_dropout(
        tmp_path, data_dir, tokenizer_dir, dropout_model):
    hook = FirstLoss(dpo_first_step)
    train(dpo_flags(tmp_path, data_dir, tokenizer_dir, dropout_model), hooks=[hook])
    loss, margins, chosen = hook.result
    assert loss == pytest.approx(math.log(2), abs=1e-5)
    assert margins.abs().max() < 1e-5 and chosen.abs().max() < 1e-5
    # Keeping dropout (the documented setting) brings the noise back: the check is not vacuous.
    kept = FirstLoss(dpo_first_step)
    train(dpo_flags(tmp_path / "kept", data_dir, tokenizer_dir, dropout_model, disable_dropout=False), hooks=[kept])
    assert abs(kept.result[0] - math.log(2)) > 1e-3 and kept.result[1].abs().max() > 1e-3


def test_kl_beta_is_zero_before_any_update_though_the_model_has_dropout(tmp_path, data_dir, tokenizer_dir,
                                                                        dropout_model):
    kl = {}
    for setting in ("auto", False):
        hook = FirstLoss(lambda trainer, batch, loss, values: float(values["kl"]))
        flags = tiny_flags(tmp_path / str(setting), data_dir, tokenizer_dir, init_from=dropout_model, kl_beta=0.1,
                           max_steps=1, validation_file="", disable_dropout=setting)
        train(flags, hooks=[hook])
        kl[setting] = hook.result
    assert abs(kl["auto"]) < 1e-6
    assert kl[False] > 1e-3


def grpo_ratio(trainer, batch, loss, values):
    """exp(log-prob scored by the loop - log-prob of the same completions by the policy in the
    mode it sampled in, eval): the first update's ratio against the sampling policy."""
    objective = trainer.objective
    rollout = objective.rollout
    labels = rollout["labels"]
    model = trainer.model
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                   encoder_repeats=objective.group_size).logits.detach()
    model.train()
    sampling = objective.token_logps(logits / objective.temperature, labels)
    mask = labels != LABEL_PAD
    return (torch.exp(rollout["old_logps"] - sampling) - 1)[mask].abs().max().item()


def test_grpo_scores_with_the_policy_it_sampled_with_though_the_model_has_dropout(
        tmp_path, data_dir, tokenizer_dir, dropout_model):
    deviation = {}
    for setting in ("auto", False):
        hook = FirstLoss(grpo_ratio)
        flags = tiny_flags(tmp_path / str(setting), data_dir, tokenizer_dir, objective="grpo",
                           init_from=dropout_model, grpo_group_size=4, grpo_max_new_tokens=6, max_steps=1,
                           validation_file="", disable_dropout=setting)
        train(flags, hooks=[hook])
        deviation[setting] = hook.result
    assert deviation["auto"] < 1e-6
    assert deviation[False] > 1e-2


def test_plain_seq2seq_keeps_its_dropout_by_default(tmp_path, data_dir, tokenizer_dir, dropout_model):
    from config import load_config
    assert not load_config(init_from=dropout_model).dropout_off
    assert load_config(init_from=dropout_model, disable_dropout=True).dropout_off
    assert load_config(init_from=dropout_model, objective="dpo").dropout_off
    with pytest.raises(UserError, match="--disable_dropout must be True, False or auto"):
        load_config(disable_dropout="sometimes")


# ---- 2. precision ----------------------------------------------------------------------------

def test_the_reference_runs_under_the_policys_bf16_autocast(tmp_path, data_dir, tokenizer_dir, base_model):
    def log_ratios(trainer, batch, loss, values):
        objective = trainer.objective
        with torch.no_grad():
            return (objective.logps(trainer.model, batch) - objective.logps(trainer.reference, batch)).abs().max()
    hook = FirstLoss(log_ratios)
    trainer = train(dpo_flags(tmp_path, data_dir, tokenizer_dir, base_model, mixed_precision="bf16",
                              trainable="all"), hooks=[hook])
    assert trainer.accelerator.mixed_precision == "bf16"
    assert float(hook.result) < 1e-6


# ---- 3. LoRA with torch.compile --------------------------------------------------------------

def test_lora_with_torch_compile_saves_merged_models_and_states_that_resume_either_way(
        tmp_path, data_dir, tokenizer_dir, base_model):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSeq2SeqLM

    from model.chat_model import TextToTextModel

    def flags(name, compiled, **kw):
        return tiny_flags(tmp_path / name, data_dir, tokenizer_dir, init_from=base_model, trainable="lora", lora_r=4,
                          lora_dropout=0.0, max_steps=6, learn_rate=1e-2, eval_steps=3, torch_compile=compiled,
                          torch_compile_backend="eager", pad_to_multiple_of=8, save_steps=3, **kw)

    straight = train(flags("straight", True))
    out = tmp_path / "straight" / "out"
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8, 1]]), "labels": torch.tensor([[9, 10, 11, 1]])}
    policy = straight.unwrapped().eval()
    for kind in ("best", "final"):
        merged = AutoModelForSeq2SeqLM.from_pretrained(out / kind).eval()
        adapted = PeftModel.from_pretrained(TextToTextModel.from_pretrained(base_model), str(out / kind / "adapter"))
        with torch.no_grad():
            want = adapted.eval()(**inputs).logits
            assert (merged(**inputs).logits - want).abs().max() < 1e-5, kind
    with torch.no_grad():
        assert (AutoModelForSeq2SeqLM.from_pretrained(out / "final").eval()(**inputs).logits
                - policy(**inputs).logits).abs().max() < 1e-5
    state = load_file(out / "state" / "step_00000006" / "model.safetensors")
    assert state and not any("_orig_mod" in k for k in state)
    want = {k: v for k, v in policy.state_dict().items() if "lora_" in k}
    for first, then in ((True, False), (False, True)):
        name = f"{first}-{then}"
        train(flags(name, first), hooks=[StopAt(3)])
        resumed = train(flags(name, then, is_keep_training=True))
        got = resumed.unwrapped().state_dict()
        for k, v in want.items():
            assert torch.equal(got[k], v), (name, k)  # bit-exact


# ---- 4. DPO's best metric --------------------------------------------------------------------

def test_dpo_best_follows_exact_match_after_reward_accuracy_saturates(tmp_path, data_dir, tokenizer_dir, base_model):
    # A new answer to learn (chosen: 一二三, rejected: the model's own kind of answer): the pairs are
    # told apart after a few steps, the answers become the chosen ones only later.
    def pairs(source, out):
        table = pq.read_table(source)
        n = table.num_rows
        pq.write_table(pa.table({"prompt": table.column("prompt"), "chosen": pa.array(["一二三"] * n),
                                 "rejected": table.column("response")}), out)
        return str(out)
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, objective="dpo", init_from=base_model,
                       train_file=pairs(data_dir / "train.parquet", tmp_path / "pairs.parquet"),
                       validation_file=pairs(data_dir / "valid.parquet", tmp_path / "valid_pairs.parquet"),
                       max_steps=30, eval_steps=3, learn_rate=5e-3, dpo_rpo_alpha=1.0, max_eval_rows=24)
    train(flags)
    evals = [r for r in read_metrics(flags["output_dir"]) if "eval/exact_match" in r]
    saturated = next(r for r in evals if r["eval/rewards/accuracy"] == 1.0)
    with open(os.path.join(flags["output_dir"], "summary.json"), encoding="utf-8") as f:
        best = json.load(f)["best"]
    assert best["metric"] == "exact_match"
    assert best["step"] > saturated["step"]  # accuracy was already 1.0; exact match went on improving
    assert best["score"] == max(r["eval/exact_match"] for r in evals) > saturated["eval/exact_match"]


# ---- 5. GRPO evaluates with its reward -------------------------------------------------------

USER_REWARD = '''
def brevity(prompts, completions):
    return [1.0 / (1 + len(c)) for c in completions]
'''


def test_grpo_without_a_response_column_evaluates_and_picks_best_by_its_reward(
        tmp_path, data_dir, tokenizer_dir, base_model, monkeypatch):
    prompts = pq.read_table(data_dir / "train.parquet").column("prompt").to_pylist()
    pq.write_table(pa.table({"prompt": prompts[:96]}), tmp_path / "prompts.parquet")
    pq.write_table(pa.table({"prompt": prompts[-16:]}), tmp_path / "valid.parquet")
    (tmp_path / "short_rewards.py").write_text(USER_REWARD, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, objective="grpo", init_from=base_model,
                       train_file=str(tmp_path / "prompts.parquet"), validation_file=str(tmp_path / "valid.parquet"),
                       reward="short_rewards:brevity", grpo_group_size=4, grpo_max_new_tokens=8, max_steps=8,
                       eval_steps=2, learn_rate=3e-3)
    train(flags)
    evals = [r for r in read_metrics(flags["output_dir"]) if "eval/reward" in r]
    assert len(evals) >= 4 and not any("eval/exact_match" in r or "eval/loss" in r for r in evals)
    with open(os.path.join(flags["output_dir"], "summary.json"), encoding="utf-8") as f:
        best = json.load(f)["best"]
    top = max(r["eval/reward"] for r in evals)
    assert best["metric"] == "reward" and best["score"] == top
    assert best["step"] == next(r["step"] for r in evals if r["eval/reward"] == top)
    assert os.path.isfile(os.path.join(flags["output_dir"], "best", "model.safetensors"))


def test_grpo_reports_each_reward_of_a_weighted_sum(tmp_path, data_dir, tokenizer_dir, base_model):
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, objective="grpo", init_from=base_model,
                       reward="exact_match=1,lcs_f1=0.5", grpo_group_size=2, grpo_max_new_tokens=6, max_steps=2,
                       eval_steps=2, best_metric="reward/lcs_f1")
    train(flags)
    last = [r for r in read_metrics(flags["output_dir"]) if "eval/reward" in r][-1]
    assert last["eval/reward"] == pytest.approx(last["eval/reward/exact_match"] + 0.5 * last["eval/reward/lcs_f1"])
    assert "eval/exact_match" in last  # the rewards read response: it is compared with too
    with pytest.raises(UserError, match="--reward has no char_bag_f1"):
        from config import load_config
        load_config(objective="grpo", init_from=base_model, reward="exact_match=1,lcs_f1=0.5",
                    best_metric="reward/char_bag_f1")


# ---- 6. rewards and the one normaliser -------------------------------------------------------

def test_order_aware_partial_credit_and_one_normaliser_for_rewards_and_evaluation():
    anagrams = lcs_f1([""] * 2, ["九千二百一十六", "6912"], ["六千二百一十九", "6219"])
    assert all(score < 1 for score in anagrams)
    assert lcs_f1([""] * 3, ["一千零五十", "一千零五", "二"], ["一千零五十"] * 3)[:2] == [1.0, pytest.approx(8 / 9)]
    for spaced in ("是 六。", "是\t六。", "是\u3000六。", "是六。\n"):
        assert exact_match([""], [spaced], ["是六。"]) == [1.0]
        assert lcs_f1([""], [spaced], ["是六。"]) == [1.0]
        assert exact_match_by_group(["是六。"], [spaced])["all"] == (1, 1)
    assert exact_match([""], ["１０５０"], ["1050"]) == [1.0]  # full-width digits, as evaluation reads them
    assert exact_match_by_group(["1050"], ["１０５０"])["all"] == (1, 1)
    with pytest.raises(UserError, match="use lcs_f1 .* or char_bag_f1"):
        parse_rewards("char_f1")
    assert parse_rewards("char_bag_f1")[0].fn([""], ["6912"], ["6219"]) == [1.0]  # the old bag, named honestly


# ---- 7. LoRA targets -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gated_model(tokenizer_dir, tmp_path_factory):
    """A tiny T5 v1.1-style model (gated feed-forward: wi_0, wi_1) saved with its tokenizer."""
    import dataclasses

    from config import MODEL_PRESETS
    from model.chat_model import TextToTextModel, get_t5_config
    from utils.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(tokenizer_dir)
    shape = dataclasses.replace(MODEL_PRESETS["tiny"], feed_forward_proj="gated-gelu")
    out = tmp_path_factory.mktemp("gated") / "model"
    torch.manual_seed(0)
    TextToTextModel(get_t5_config(shape, len(tokenizer))).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def test_wi_adapts_both_gated_layers_and_an_unknown_target_is_one_line(tmp_path, data_dir, tokenizer_dir,
                                                                       gated_model, capsys):
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, init_from=gated_model, trainable="lora", lora_r=4,
                       lora_target_modules="wi", max_steps=1, validation_file="")
    trainer = train(flags)
    model = trainer.unwrapped()
    lora = {n: p.numel() for n, p in model.named_parameters() if "lora_" in n}
    config = model.config
    blocks = config.num_layers + config.num_decoder_layers
    assert sum(1 for n in lora if ".wi_0.lora_A" in n) == blocks == sum(1 for n in lora if ".wi_1.lora_A" in n)
    assert sum(lora.values()) == 2 * blocks * 4 * (config.d_model + config.d_ff)
    bad = {**flags, "lora_target_modules": "q,wx", "output_dir": str(tmp_path / "bad")}
    result = cli(capsys, "train", *as_args(bad))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: --lora_target_modules: 'wx' matches no linear layer")
    assert "wi_0, wi_1" in result.stderr and not os.path.exists(tmp_path / "bad")


# ---- 8. GRPO's encoder, once per prompt ------------------------------------------------------

def test_grpo_runs_the_encoder_once_per_prompt_with_the_loss_unchanged(base_model):
    from model.chat_model import TextToTextModel
    from utils.tokenizer import load_tokenizer
    torch.manual_seed(0)
    model = TextToTextModel.from_pretrained(base_model).train()
    tokenizer = load_tokenizer(base_model)
    grpo = GRPO(parse_rewards("lcs_f1"), group_size=4, max_new_tokens=6)
    grpo.tokenizer = tokenizer
    prompts = ["把3771写成中文数字。", "一千零五十是多少？", "把2024-03-05写成中文日期。"]
    enc = tokenizer(prompts, padding=True, return_tensors="pt", return_token_type_ids=False)
    batch = {**enc, "texts": {"prompt": prompts, "response": ["三千七百七十一", "1050", "二〇二四年三月五日"]}}
    rows = []
    handle = model.encoder.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    loss, _ = grpo.loss(model, batch, None)  # samples (generate encodes once), then scores
    handle.remove()
    assert rows == [3, 3]  # sampling's pass and the loss's: one row per prompt each (not 3 x 4)
    rollout = grpo.rollout
    loss.backward()
    reused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    labels = rollout["labels"]
    # The same loss with the prompt repeated and encoded G times, as before.
    logits = model(input_ids=enc["input_ids"].repeat_interleave(4, 0),
                   attention_mask=enc["attention_mask"].repeat_interleave(4, 0), labels=labels).logits
    logps = grpo.token_logps(logits / grpo.temperature, labels)
    recomputed, _ = grpo.policy_loss(logps, logps.detach(), rollout["advantages"], labels != LABEL_PAD)
    assert float(loss.detach()) == pytest.approx(float(recomputed.detach()), abs=1e-6)
    recomputed.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(reused[n], p.grad, atol=1e-6, rtol=1e-5), n
