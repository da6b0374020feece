"""Token-budget batches, the loss weighting of uneven micro-batches, compilation and attention kernels."""
import json
import os
import re

import numpy as np
import pytest
import torch

from config import load_config
from conftest import StopAt, demo_rows, tiny_flags, train, write_rows
from model.dataset import TrainStream, get_train_loader
from model.objectives import Seq2Seq
from utils.errors import UserError
from utils.logging import read_metrics
from utils.tokenizer import load_tokenizer




def padded_tokens(batch):
    return batch["input_ids"].numel() + batch["labels"].numel()


@pytest.mark.parametrize("multiple", [1, 8])
def test_token_budget_batches_stay_within_it_and_cover_every_row_once(data_dir, tokenizer_dir, multiple):
    tok = load_tokenizer(tokenizer_dir)
    objective = Seq2Seq()
    objective.pad_multiple = multiple
    seen, sizes = [], set()
    for rank in (0, 1):
        stream = TrainStream([str(data_dir / "train.parquet")], tok, 8, 32, 64, 7, rank, 2, 2, objective=objective,
                             max_tokens_per_batch=160)
        for batch in get_train_loader(stream, 2):
            assert padded_tokens(batch) <= 160
            assert batch["input_ids"].shape[1] % multiple == 0 and batch["labels"].shape[1] % multiple == 0
            sizes.add(len(batch["row_index"]))
            seen += batch["row_index"].tolist()
    assert sorted(seen) == list(range(400))  # every row once, over 2 processes x 2 workers
    assert len(sizes) > 2  # batches of many sizes: short rows in large ones, long rows in small ones


def test_uneven_micro_batches_weigh_like_one_batch_of_their_rows(tmp_path, tokenizer_dir):
    # 6 short rows and 2 long ones in one window: the budget of 64 padded tokens makes a batch of
    # the 6 short and one of the 2 long rows, one optimizer step of 2 micro-batches. Its gradient
    # must be that of one batch of all 8 rows: the mean over the step's target tokens (a mean of
    # the two micro-batch means would weigh each long row's tokens 3 times as much).
    prompts = ["1"] * 6 + ["一千二百三十四"] * 2
    responses = ["2"] * 6 + ["九千九百九十九"] * 2
    path = write_rows(tmp_path / "uneven.parquet", prompts, responses)
    common = dict(train_file=path, validation_file="", max_steps=1, epochs=1, dataloader_buffer_size=8,
                  warmup_steps=0, max_grad_norm=1e9, optimizer="adafactor", learn_rate=1e-2)
    micro = train(tiny_flags(tmp_path / "micro", tmp_path, tokenizer_dir, max_tokens_per_batch=64,
                             gradient_accumulation_steps=2, **common))
    whole = train(tiny_flags(tmp_path / "whole", tmp_path, tokenizer_dir, batch_size_per_gpu=8,
                             gradient_accumulation_steps=1, **common))
    assert micro.progress.micro_step == 2 and whole.progress.micro_step == 1 and micro.progress.step == 1
    norms = [read_metrics(t.cfg.output_dir)[0]["train/grad_norm"] for t in (micro, whole)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)
    a, b = (t.accelerator.unwrap_model(t.model).state_dict() for t in (micro, whole))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_resume_with_a_token_budget_matches_an_uninterrupted_run(tmp_path, data_dir, tokenizer_dir):
    common = dict(max_tokens_per_batch=200, gradient_accumulation_steps=2, epochs=2, trace_samples=True,
                  validation_file="", pad_to_multiple_of=8)
    straight = train(tiny_flags(tmp_path / "a", data_dir, tokenizer_dir, **common))
    flags = tiny_flags(tmp_path / "b", data_dir, tokenizer_dir, **common)
    assert train(flags, hooks=[StopAt(9)]).progress.step == 9
    resumed = train({**flags, "is_keep_training": True})
    traces = []
    for t in (straight, resumed):
        with open(os.path.join(t.cfg.output_dir, "samples.rank0.jsonl"), encoding="utf-8") as f:
            traces.append([json.loads(line)["rows"] for line in f])
    assert traces[0] == traces[1] and resumed.progress.step == straight.progress.step
    assert sorted(r for rows in traces[0][:len(traces[0]) // 2] for r in rows) != []  # not empty
    a, b = (t.accelerator.unwrap_model(t.model).state_dict() for t in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The step count was estimated ahead from the first windows: near what the run made.
    assert abs(straight.total_steps - straight.progress.step) <= 0.1 * straight.progress.step
    with pytest.raises(UserError, match="below 2 x --max_seq_len"):
        load_config(max_tokens_per_batch=100, max_seq_len=256)


def test_torch_compile_trains_and_compiles_a_bounded_number_of_shapes(tmp_path, data_dir, tokenizer_dir, capsys):
    import torch._dynamo
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    trainer = train(tiny_flags(tmp_path, data_dir, tokenizer_dir, max_steps=12, validation_file="",
                               torch_compile=True, torch_compile_backend="eager"))
    losses = [r["train/loss"] for r in read_metrics(trainer.cfg.output_dir)]
    assert len(losses) == 12 and all(np.isfinite(losses))
    graphs = int(counters["stats"]["unique_graphs"])
    # Padded to multiples of 64 (the default when compiling), max_seq_len 32: one shape.
    assert 1 <= graphs <= 4, graphs
    with open(os.path.join(trainer.cfg.output_dir, "train.log"), encoding="utf-8") as f:
        assert re.search(r"torch.compile \(eager\): \d+ graphs compiled, padded lengths rounded up to multiples "
                         r"of 64", f.read())
    with open(os.path.join(trainer.cfg.output_dir, "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["compiled_graphs"] == graphs
    from transformers import AutoModelForSeq2SeqLM
    AutoModelForSeq2SeqLM.from_pretrained(os.path.join(trainer.cfg.output_dir, "final"))  # saved uncompiled


@pytest.mark.parametrize("head", ["nll", "logps"])
def test_the_chunked_head_stays_out_of_compiled_graphs(head):
    """The chunked head's loop runs once per chunk; traced, each new chunk count would be a new
    graph. Kept out, batches of six target lengths (2 to 8 chunks) make two graphs (the first
    shape, then the dynamic one)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from config import T5ModelConfig
    from model.chat_model import TextToTextModel, get_t5_config
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    shape = T5ModelConfig(d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=1, num_decoder_layers=1)
    compiled = torch.compile(TextToTextModel(get_t5_config(shape, 512)), backend="eager")
    for length in (20, 40, 60, 80, 100, 120):
        ids, labels = torch.randint(5, 500, (4, 30)), torch.randint(5, 500, (4, length))
        out = compiled(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, head=head, chunk=64)
        (out.summed_nll if head == "nll" else out.token_logps.sum()).backward()
    assert int(counters["stats"]["unique_graphs"]) == 2
    torch._dynamo.reset()


def attention_kernels(model) -> set:
    """The attention implementations the model's attention modules will call."""
    from transformers.models.t5.modeling_t5 import T5Attention
    return {m.config._attn_implementation for m in model.modules() if isinstance(m, T5Attention)}


def test_sdpa_attention_gives_the_eager_loss(data_dir, tokenizer_dir):
    from config import T5ModelConfig
    from model.chat_model import TextToTextModel, get_t5_config
    tok = load_tokenizer(tokenizer_dir)
    prompts, responses = demo_rows(8)
    batch = Seq2Seq().collate({"prompt": [tok(p)["input_ids"] for p in prompts],
                               "response": [tok(r)["input_ids"] for r in responses]})
    torch.manual_seed(0)
    model = TextToTextModel(get_t5_config(T5ModelConfig.preset("tiny"), len(tok))).eval()
    model.set_attn_implementation("eager")  # a new model gets sdpa from transformers
    assert attention_kernels(model) == {"eager"}
    eager = model(**batch).loss
    model.set_attn_implementation("sdpa")
    assert attention_kernels(model) == {"sdpa"}
    assert float(model(**batch).loss) == pytest.approx(float(eager), abs=1e-5)


def attention_step(model, autocast: bool = False, grad: bool = True) -> tuple:
    """One forward (and backward) of `model` on padded prompts and -100 labels: the loss, the
    gradients, and the ATen operators dispatched."""
    from utils.syncs import Operators
    torch.manual_seed(1)
    ids = torch.randint(5, 500, (4, 30))
    mask = torch.ones_like(ids)
    mask[1, 20:], mask[3, 5:] = 0, 0
    labels = torch.randint(5, 500, (4, 25))
    labels[2, 10:] = -100
    model.zero_grad()
    with Operators() as ops, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            torch.set_grad_enabled(grad):
        loss = model(input_ids=ids * mask, attention_mask=mask, labels=labels, head="nll").summed_nll
        if grad:
            loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()]) if grad else None
    return loss.detach(), grads, ops.names


@pytest.mark.parametrize("autocast", [False, True])
def test_auto_attention_gives_the_eager_loss_and_gradients_without_sdpas_math_kernel(autocast):
    # T5's trained position bias is an attention mask that needs a gradient: sdpa's CPU flash
    # kernel takes none, so sdpa falls back to its math kernel and its safe softmax; "auto" folds
    # the bias into the scores' matmul instead, where sdpa would take that fallback.
    from config import T5ModelConfig
    from model.chat_model import ATTENTION_KERNELS, TextToTextModel, get_t5_config
    torch.manual_seed(0)
    model = TextToTextModel(get_t5_config(T5ModelConfig.preset("tiny"), 512)).train()
    got = {}
    for kernel in ("eager", "sdpa", "auto"):
        model.set_attn_implementation(ATTENTION_KERNELS[kernel])
        got[kernel] = attention_step(model, autocast)
    assert got["sdpa"][2]["_safe_softmax"] > 0  # what "auto" spares
    assert got["auto"][2]["_safe_softmax"] == 0
    assert got["auto"][2]["baddbmm"] == (6 if not autocast else 0)  # 3 + 3 self-attentions
    assert got["auto"][2]["_scaled_dot_product_flash_attention_for_cpu"] == 3  # the cross ones
    (loss, grads, _), (eager_loss, eager_grads, _) = got["auto"], got["eager"]
    tol = 1e-2 if autocast else 1e-5  # bf16 differs from eager in the cross-attention's sdpa
    assert float(loss) == pytest.approx(float(eager_loss), rel=tol)
    assert float((grads - eager_grads).norm() / eager_grads.norm()) < (5e-2 if autocast else 1e-5)


def test_auto_attention_is_sdpas_flash_kernel_where_no_bias_trains():
    from config import T5ModelConfig
    from model.chat_model import ATTENTION_KERNELS, TextToTextModel, get_t5_config
    model = TextToTextModel(get_t5_config(T5ModelConfig.preset("tiny"), 512))
    model.set_attn_implementation(ATTENTION_KERNELS["auto"])
    for grad in (False, True):  # scoring and generation; the reference, or a frozen encoder
        model.requires_grad_(grad)
        ops = attention_step(model.eval(), grad=False)[2]
        assert ops["_scaled_dot_product_flash_attention_for_cpu"] == 9
        assert ops["baddbmm"] == 0


@pytest.mark.parametrize("kernel", ["eager", "sdpa", "auto", None])  # None: the default, auto
def test_the_attention_setting_reaches_every_attention_module(tmp_path, data_dir, tokenizer_dir, base_model,
                                                              kernel):
    from model.chat_model import ATTENTION_KERNELS
    seen = []

    class Look:
        def on_step_end(self, trainer):
            seen.append(attention_kernels(trainer.unwrapped()))
            seen.append(attention_kernels(trainer.policy.reference.model))

    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, max_steps=1, validation_file="", init_from=base_model,
                       kl_beta=0.1)
    train({**flags, "attn_implementation": kernel} if kernel else flags, hooks=[Look()])
    kernel = ATTENTION_KERNELS[kernel or "auto"]
    assert seen == [{kernel}, {kernel}]  # the loaded policy's and its frozen reference's


def test_scoring_builds_no_key_value_cache(monkeypatch):
    """Given labels, every head runs the decoder without a cache (a cache serves generation only:
    building one is host work in every training step); generating still uses one."""
    from transformers.cache_utils import DynamicCache

    from config import T5ModelConfig
    from model.chat_model import TextToTextModel, get_t5_config
    shape = T5ModelConfig(d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=1, num_decoder_layers=1)
    model = TextToTextModel(get_t5_config(shape, 512))
    ids, labels = torch.randint(5, 500, (2, 6)), torch.randint(5, 500, (2, 5))
    built = []
    real = DynamicCache.__init__
    monkeypatch.setattr(DynamicCache, "__init__", lambda *a, **k: built.append(1) or real(*a, **k))
    for head in ("logits", "hidden", "nll", "logps"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, head=head)
    assert built == []
    model.my_generate(ids, torch.ones_like(ids), max_seq_len=3)
    assert built


@pytest.mark.parametrize("max_norm", [0.5, 1e3, 0.0])  # clipping at work, a norm under the limit, none
def test_the_units_scale_and_clipping_are_fused_adamws_own_division(max_norm):
    """Fused AdamW divides each gradient by `step_divisor` as it reads it: the same step as
    multiplying the gradients by the units' scale, clipping them and stepping (three passes over
    the gradients made two); a non-finite norm skips the step."""
    from model.policy import step_divisor
    torch.manual_seed(0)
    shapes = [(40, 8), (8,), (3, 5, 2)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) * 3 for s in shapes] for _ in range(3)]
    grads[2][1][0] = float("nan")
    old = [p.clone().requires_grad_() for p in start]
    new = [p.clone().requires_grad_() for p in start]
    adam_old, adam_new = (torch.optim.AdamW(ps, lr=0.1, weight_decay=0.01, fused=True) for ps in (old, new))
    scale = 0.37
    for step in range(3):
        for p, g in zip(old, grads[step]):
            p.grad = g.clone()
        torch._foreach_mul_([p.grad for p in old], scale)
        norm_old = torch.nn.utils.clip_grad_norm_(old, max_norm or float("inf"))
        adam_old.found_inf = norm_old.mul(0).ne(0).float()
        adam_old.step()
        for p, g in zip(new, grads[step]):
            p.grad = g.clone()
        norm = torch.nn.utils.get_total_norm([p.grad for p in new]) * scale
        adam_new.grad_scale = step_divisor(norm, max_norm, scale)
        adam_new.found_inf = norm.mul(0).ne(0).float()
        adam_new.step()
        if step < 2:
            assert float(norm) == pytest.approx(float(norm_old), rel=1e-6)
        else:
            assert norm.isnan() and (adam_new.grad_scale.isnan() or not max_norm)
        for a, b in zip(old, new):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert {float(adam_new.state[p]["step"]) for p in new} == {2.0}  # the NaN step was skipped


def test_an_optimizer_step_makes_no_pass_over_the_gradients_of_its_own(tmp_path, data_dir, tokenizer_dir):
    """Between backward and the step's end, the loop scales and clips the gradients through fused
    AdamW's `grad_scale`: no multi-tensor multiply of its own (on a GPU each reads and writes every
    gradient). The step still clips: the logged norm is over the limit and the weights moved no
    more than lr allows."""
    from utils.syncs import Operators

    class Count:
        def __init__(self):
            self.ops, self.names = None, []

        def on_backward(self, trainer):
            self.ops = Operators().__enter__()

        def on_update(self, trainer):
            self.ops.__exit__(None, None, None)
            self.names.append(self.ops.names)

    count = Count()
    flags = tiny_flags(tmp_path, data_dir, tokenizer_dir, max_steps=3, logging_steps=1, eval_steps=0,
                       validation_file="", max_grad_norm=1e-3)
    train(flags, hooks=[count])
    assert len(count.names) == 3
    for names in count.names:
        assert names["_fused_adamw_"]  # one a parameter group
        assert not {n for n in names if n.startswith("_foreach_mul")}, names
    logged = [r["train/grad_norm"] for r in read_metrics(flags["output_dir"]) if "train/grad_norm" in r]
    assert logged and min(logged) > 1e-3  # the limit was at work on every step
