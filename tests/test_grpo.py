"""GRPO: the formulas against a direct implementation, masking after [EOS], the ratio of the
first update, rewards (built-in and the user's own) and their errors, a short run end to end.
Resume and two processes are in test_trainer.py, parametrised over the modes."""
import json
import os
import textwrap

import pytest
import torch

from conftest import cli, tiny_flags

from model.objectives import GRPO, LABEL_PAD
from model.rewards import lcs_f1, exact_match, parse_rewards


def objective(**kw):
    return GRPO(parse_rewards("exact_match"), **{"group_size": 4, **kw})


def direct_loss(logps, old, rewards, mask, group, eps_low, eps_high, beta=0.0, ref=None, per="token"):
    """The GRPO loss written out row by row and token by token."""
    n = len(rewards)
    adv = []
    for i in range(n):
        g = rewards[(i // group) * group:(i // group + 1) * group]
        mean = sum(g) / group
        std = (sum((x - mean) ** 2 for x in g) / (group - 1)) ** 0.5
        adv.append((rewards[i] - mean) / (std + 1e-4))
    total, count, per_row = 0.0, 0, []
    for i in range(n):
        row, row_n = 0.0, 0
        for t in range(len(mask[i])):
            if not mask[i][t]:
                continue
            ratio = float(torch.exp(torch.tensor(logps[i][t] - old[i][t])))
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            value = -min(ratio * adv[i], clipped * adv[i])
            if beta:
                d = ref[i][t] - logps[i][t]
                value += beta * (float(torch.exp(torch.tensor(d))) - d - 1)
            total, count, row, row_n = total + value, count + 1, row + value, row_n + 1
        per_row.append(row / max(row_n, 1))
    return (total / count if per == "token" else sum(per_row) / n), adv


@pytest.mark.parametrize("per", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_advantages_and_clipped_loss_equal_the_formulas(per, beta):
    torch.manual_seed(0)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.9, 0.5, 0.1])
    logps = -torch.rand(8, 5) * 3
    old = logps + (torch.rand(8, 5) - 0.5) * 0.8  # ratios on both sides of the clip range
    ref = logps + (torch.rand(8, 5) - 0.5)
    mask = torch.rand(8, 5) > 0.2
    grpo = objective(clip_eps=0.2, clip_eps_high=0.28, beta=beta, loss_aggregation=per)
    loss, stats = grpo.policy_loss(logps, old, grpo.advantages(rewards), mask, ref if beta else None)
    expected, adv = direct_loss(logps.tolist(), old.tolist(), rewards.tolist(), mask.tolist(), 4, 0.2, 0.28, beta,
                                ref.tolist(), per)
    assert grpo.advantages(rewards).tolist() == pytest.approx(adv, rel=1e-5)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert 0 < float(stats["clip_fraction"]) < 1


def test_a_group_with_equal_rewards_gives_no_gradient():
    grpo = objective()
    logps = torch.randn(8, 3, requires_grad=True)
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 0.0, 0.0])  # group 0 all equal
    loss, _ = grpo.policy_loss(logps, logps.detach(), grpo.advantages(rewards), torch.ones(8, 3, dtype=torch.bool))
    loss.backward()
    assert torch.all(logps.grad[:4] == 0) and torch.any(logps.grad[4:] != 0)


def test_tokens_after_eos_are_masked_and_carry_no_loss():
    # generate()'s output: the decoder start token, then tokens; row 0 stops at [EOS] (1), then pads.
    sequences = torch.tensor([[0, 5, 6, 1, 0, 0], [0, 7, 1, 8, 1, 9], [0, 5, 5, 5, 5, 5]])
    labels = GRPO.completion_labels(sequences)
    assert labels.tolist() == [[5, 6, 1, LABEL_PAD, LABEL_PAD], [7, 1, LABEL_PAD, LABEL_PAD, LABEL_PAD],
                               [5, 5, 5, 5, 5]]
    grpo = objective(group_size=3)
    logps = torch.randn(3, 5, requires_grad=True)
    loss, _ = grpo.policy_loss(logps, logps.detach(), torch.tensor([1.0, -1.0, 0.5]), labels != LABEL_PAD)
    loss.backward()
    assert torch.all(logps.grad[labels == LABEL_PAD] == 0)
    assert torch.all(logps.grad[labels != LABEL_PAD] != 0)


def test_the_first_update_has_a_ratio_of_exactly_one(base_model, monkeypatch):
    from model.chat_model import TextToTextModel
    from utils.tokenizer import load_tokenizer
    model = TextToTextModel.from_pretrained(base_model).train()
    tokenizer = load_tokenizer(base_model)
    grpo = objective(max_new_tokens=5)
    grpo.tokenizer = tokenizer
    seen = {}
    original = grpo.policy_loss

    def spy(logps, old, advantages, mask, ref=None):
        seen["ratio"] = torch.exp(logps - old)
        return original(logps, old, advantages, mask, ref)
    monkeypatch.setattr(grpo, "policy_loss", spy)
    prompts = ["把3771写成中文数字。", "一千零五十是多少？"]
    enc = tokenizer(prompts, padding=True, return_tensors="pt", return_token_type_ids=False)
    batch = {**enc, "labels": tokenizer(["三千七百七十一", "1050"], padding=True, return_tensors="pt")["input_ids"],
             "texts": {"prompt": prompts, "response": ["三千七百七十一", "1050"]}}
    loss, values = grpo.loss(model, batch, None)
    assert torch.equal(seen["ratio"], torch.ones_like(seen["ratio"]))
    assert float(values["clip_fraction"]) == 0 and loss.requires_grad
    assert {"reward", "reward_std", "zero_std_groups", "completion_length", "sample_seconds",
            "train_seconds", "sampled_tokens_per_s"} <= set(values)


def test_builtin_rewards():
    assert exact_match([""] * 3, [" 1050 ", "105", ""], ["1050", "1050", "1050"]) == [1.0, 0.0, 0.0]
    f1 = lcs_f1([""] * 3, ["一千零五十", "一千零五", "二"], ["一千零五十", "一千零五十", "一千零五十"])
    assert f1[0] == 1.0 and 0.8 < f1[1] < 1.0 and f1[2] == 0.0
    combined = parse_rewards("exact_match=1,lcs_f1=0.5")
    assert [(r.name, r.weight) for r in combined] == [("exact_match", 1.0), ("lcs_f1", 0.5)]


REWARDS = textwrap.dedent('''
    import json, os

    def by_task(prompts, completions, response, task):
        with open(os.environ["REWARD_LOG"], "a", encoding="utf-8") as f:
            f.write(json.dumps({"prompts": prompts, "completions": completions, "response": response,
                                "task": task}) + "\\n")
        return [1.0 if c == r else 0.0 for c, r in zip(completions, response)]

    def broken(prompts, completions, **columns):
        raise ValueError("no score for " + completions[0][:0] + "this")
''')


def test_a_user_reward_gets_the_batch_columns_and_its_errors_are_one_line(tmp_path, data_dir, tokenizer_dir,
                                                                           base_model, capsys, monkeypatch):
    import pyarrow.parquet as pq

    from conftest import write_rows
    rows = pq.read_table(data_dir / "train.parquet").slice(0, 64).to_pylist()
    train = write_rows(tmp_path / "tasks.parquet", [r["prompt"] for r in rows], [r["response"] for r in rows],
                       task=["zh2num" if "是多少" in r["prompt"] else "num2zh" for r in rows])
    (tmp_path / "my_rewards.py").write_text(REWARDS, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REWARD_LOG", str(tmp_path / "calls.jsonl"))
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, objective="grpo", init_from=base_model, train_file=train,
                       validation_file="", max_steps=2, grpo_group_size=3, grpo_max_new_tokens=4,
                       reward="my_rewards:by_task")
    result = cli(capsys, "train", *[f"--{k}={v}" for k, v in flags.items()])
    assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in open(tmp_path / "calls.jsonl", encoding="utf-8")]
    assert len(calls) == 2 and len(calls[0]["completions"]) == 8 * 3
    by_prompt = {r["prompt"]: r for r in pq.read_table(train).to_pylist()}
    for call in calls:  # each completion comes with its own row's columns
        for prompt, response, task in zip(call["prompts"], call["response"], call["task"]):
            assert by_prompt[prompt]["response"] == response and by_prompt[prompt]["task"] == task
    # A function that raises: one line naming it, exit 2.
    result = cli(capsys, "train", *[f"--{k}={v}" for k, v in {**flags, "reward": "my_rewards:broken",
                                                              "output_dir": str(tmp_path / "o2"),
                                                              "train_state_dir": str(tmp_path / "o2" / "s")}.items()])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: --reward=my_rewards:broken raised ValueError: no score for this")
    # A bad path is found at start-up, before anything is read or written.
    for reward, says in (("no_such_module:f", "cannot import no_such_module"),
                         ("my_rewards:missing", "has no function missing"), ("exact", "neither a built-in")):
        result = cli(capsys, "train", *[f"--{k}={v}" for k, v in {**flags, "reward": reward,
                                                                  "output_dir": str(tmp_path / "o3")}.items()])
        assert result.returncode == 2 and says in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert not os.path.exists(tmp_path / "o3")


def test_grpo_needs_a_model_to_start_from(tmp_path, data_dir, tokenizer_dir, capsys):
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, objective="grpo")
    result = cli(capsys, "train", *[f"--{k}={v}" for k, v in flags.items()])
    assert result.returncode == 2 and "--init_from" in result.stderr


def test_more_iterations_reuse_the_samples_and_clip_from_the_second_update(base_model):
    from model.chat_model import TextToTextModel
    from utils.tokenizer import load_tokenizer
    torch.manual_seed(0)
    model = TextToTextModel.from_pretrained(base_model).train()
    tokenizer = load_tokenizer(base_model)
    grpo = GRPO(parse_rewards("lcs_f1"), group_size=4, max_new_tokens=5, iterations=3)
    grpo.tokenizer = tokenizer
    assert grpo.updates_per_batch == 3
    sampled, ratios = [], []
    sample, policy_loss = grpo.sample, grpo.policy_loss
    grpo.sample = lambda m, b: sampled.append(1) or sample(m, b)
    grpo.policy_loss = lambda lp, old, a, m, ref=None: ratios.append(torch.exp(lp - old).detach()) or \
        policy_loss(lp, old, a, m, ref)
    prompts = ["把3771写成中文数字。", "一千零五十是多少？"]
    enc = tokenizer(prompts, padding=True, return_tensors="pt", return_token_type_ids=False)
    batch = {**enc, "texts": {"prompt": prompts, "response": ["三千七百七十一", "1050"]}}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for update in range(3):
        loss, values = grpo.loss(model, batch, None, update)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert len(sampled) == 1  # one batch of samples for the three updates
    assert torch.equal(ratios[0], torch.ones_like(ratios[0])) and not torch.equal(ratios[2], ratios[0])


def test_iterations_multiply_the_steps_of_an_epoch(tmp_path, data_dir, tokenizer_dir, base_model, capsys):
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, objective="grpo", init_from=base_model,
                       validation_file="", grpo_group_size=2, grpo_max_new_tokens=3, grpo_iterations=2,
                       batch_size_per_gpu=100, dataloader_buffer_size=100)
    result = cli(capsys, "train", *[f"--{k}={v}" for k, v in flags.items()])
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "out" / "metrics.jsonl", encoding="utf-8") as f:
        steps = [json.loads(line) for line in f if "train/loss" in line]
    assert [r["step"] for r in steps] == list(range(1, 9))  # 400 rows, 4 batches, 2 updates each
    # The two updates of a batch use the same samples: the same sampling (timed once), the same rewards.
    for first, second in zip(steps[::2], steps[1::2]):
        for key in ("train/sampled_tokens_per_s", "train/reward", "train/completion_length"):
            assert first[key] == second[key], key
    assert len({r["train/sampled_tokens_per_s"] for r in steps}) == 4  # and each batch was sampled anew
    bad = cli(capsys, "train", *[f"--{k}={v}" for k, v in {**flags, "gradient_accumulation_steps": 2}.items()])
    assert bad.returncode == 2 and "--grpo_iterations" in bad.stderr


def test_grpo_with_lora_keeps_to_the_adapters_disabled_model(tmp_path, data_dir, tokenizer_dir, base_model, capsys):
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, objective="grpo", init_from=base_model,
                       validation_file="", max_steps=3, grpo_group_size=2, grpo_max_new_tokens=4, grpo_beta=0.1,
                       trainable="lora", lora_dropout=0.0, reward="lcs_f1")
    result = cli(capsys, "train", *[f"--{k}={v}" for k, v in flags.items()])
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "out" / "metrics.jsonl", encoding="utf-8") as f:
        steps = [json.loads(line) for line in f if "train/loss" in line]
    assert steps[0]["train/kl"] == pytest.approx(0, abs=1e-6)  # before any update the policy is the reference
    assert steps[-1]["train/kl"] > 0
    assert os.path.isdir(tmp_path / "out" / "final" / "adapter")
