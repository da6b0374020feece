"""`train.py export`: a trained model directory as ONNX, for onnxruntime and the tools that run it.

    python train.py export --model_dir=model_save/demo/best --format=onnx --output_dir=model_save/demo/onnx

Three graphs in the layout of optimum's ONNX exports for T5 (the names optimum's
ORTModelForSeq2SeqLM reads), with the model's config, generation config and tokenizer beside them:

    encoder_model.onnx            input_ids, attention_mask -> last_hidden_state
    decoder_model.onnx            input_ids, encoder_hidden_states, encoder_attention_mask
                                  -> logits, present.{i}.{decoder,encoder}.{key,value}
    decoder_with_past_model.onnx  input_ids, encoder_hidden_states, encoder_attention_mask,
                                  past_key_values.{i}.{decoder,encoder}.{key,value}
                                  -> logits, present.{i}.decoder.{key,value}

The exporter is torch's own (torch.onnx, tracing the model's forward), not optimum's: optimum's
ONNX exporter (optimum-onnx 0.1, the latest) requires transformers < 4.58 and fails to import
with the transformers 5 this project runs on. Nothing of the graphs is written by hand: each is
T5's own forward with its cache, traced. The export is checked before it is kept: greedy answers
to three prompts through onnxruntime equal PyTorch's (a failed check is one error line and
nothing is written).
"""
import os

import numpy as np
import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from model.chat_model import EOS_ID, PAD_ID
from utils.errors import UserError

OPSET = 17
FORMATS = ("onnx",)


class Encoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.encoder = model.get_encoder()

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def flatten(cache: EncoderDecoderCache, cross: bool = True) -> list[torch.Tensor]:
    out = []
    for own, other in zip(cache.self_attention_cache.layers, cache.cross_attention_cache.layers):
        out += [own.keys, own.values] + ([other.keys, other.values] if cross else [])
    return out


class Decoder(torch.nn.Module):
    """One decoder step through T5's own forward: the first (no past), or a later one (`past`:
    every layer's self-attention and cross-attention keys and values)."""

    def __init__(self, model, with_past: bool):
        super().__init__()
        self.model, self.with_past = model, with_past
        self.layers = model.config.num_decoder_layers

    def forward(self, input_ids, encoder_hidden_states, encoder_attention_mask, *past):
        if self.with_past:
            cache = EncoderDecoderCache(
                DynamicCache([(past[4 * i], past[4 * i + 1]) for i in range(self.layers)]),
                DynamicCache([(past[4 * i + 2], past[4 * i + 3]) for i in range(self.layers)]))
        else:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        out = self.model(encoder_outputs=(encoder_hidden_states,), attention_mask=encoder_attention_mask,
                         decoder_input_ids=input_ids, cache=cache, use_cache=True)
        return (out.logits, *flatten(cache, cross=not self.with_past))


def names(layers: int, prefix: str, cross: bool = True) -> list[str]:
    parts = ("decoder.key", "decoder.value") + (("encoder.key", "encoder.value") if cross else ())
    return [f"{prefix}.{i}.{p}" for i in range(layers) for p in parts]


def export(model_dir: str, output_dir: str, overwrite: bool = False, log=print) -> dict:
    """Write the ONNX graphs of `model_dir` to `output_dir` (whole or not at all); the checks' figures."""
    import time

    from model.infer import ChatBot
    from utils.files import atomic_dir, refuse_to_replace
    out, src = os.path.realpath(output_dir), os.path.realpath(model_dir)
    if src == out or src.startswith(out + os.sep):
        raise UserError(f"--output_dir={output_dir} is the model directory itself or holds it; write the export "
                        "elsewhere")
    refuse_to_replace(output_dir, "output_dir", overwrite)
    bot = ChatBot(model_dir, "cpu")
    model = bot.model.eval()
    model.config.use_cache = True
    layers = model.config.num_decoder_layers
    started = time.perf_counter()
    sample = bot.tokenizer(["把3771写成中文数字。", "你好"], padding=True, return_tensors="pt",
                           return_token_type_ids=False)
    ids, mask = sample["input_ids"], sample["attention_mask"]
    with atomic_dir(output_dir) as tmp, torch.no_grad():
        hidden = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        start = torch.full((ids.shape[0], 1), PAD_ID, dtype=torch.long)
        first = Decoder(model, with_past=False)(start, hidden, mask)
        try:
            write_graphs(model, tmp, ids, mask, hidden, start, first, layers)
        except OSError:
            raise  # a full disk or a lost mount: atomic_dir says so
        except Exception as err:  # noqa: BLE001 (the tracer raises whatever the model's code raises)
            raise UserError(f"torch.onnx could not export {model_dir} ({str(err).splitlines()[0][:300]}); the export "
                            "takes T5 models written by `train`: report this with the model's config.json") from None
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        bot.tokenizer.save_pretrained(tmp)
        seconds = time.perf_counter() - started
        prompts = ["把3771写成中文数字。", "一千零五十是多少？", "把2024-03-05写成中文日期。"]
        onnx_answers = OnnxSeq2Seq(tmp).answer(bot.tokenizer, prompts, bot.max_new_tokens)
        torch_answers = bot.answer(prompts)
        if onnx_answers != torch_answers:
            raise UserError(f"the ONNX export of {model_dir} answers {onnx_answers!r} where the model answers "
                            f"{torch_answers!r}; report this with the model's config.json")
    log(f"exported {model_dir} to {output_dir} in {seconds:.1f} s (greedy answers checked equal to PyTorch's)")
    return {"seconds": seconds}


def write_graphs(model, out: str, ids, mask, hidden, start, first, layers: int) -> None:
    """The three graphs into `out`, traced on a sample batch (every size but the model's own is dynamic)."""
    batch, source, step = {0: "batch"}, {0: "batch", 1: "source"}, {0: "batch", 2: "past"}
    onnx(Encoder(model), (ids, mask), os.path.join(out, "encoder_model.onnx"), ["input_ids", "attention_mask"],
         ["last_hidden_state"], {"input_ids": source, "attention_mask": source, "last_hidden_state": source})
    onnx(Decoder(model, with_past=False), (start, hidden, mask), os.path.join(out, "decoder_model.onnx"),
         ["input_ids", "encoder_hidden_states", "encoder_attention_mask"], ["logits"] + names(layers, "present"),
         {"input_ids": batch, "encoder_hidden_states": source, "encoder_attention_mask": source, "logits": batch,
          **{n: ({0: "batch", 2: "source"} if ".encoder." in n else step) for n in names(layers, "present")}})
    past_names = names(layers, "past_key_values")
    onnx(Decoder(model, with_past=True), (start, hidden, mask, *first[1:]),
         os.path.join(out, "decoder_with_past_model.onnx"),
         ["input_ids", "encoder_hidden_states", "encoder_attention_mask", *past_names],
         ["logits"] + names(layers, "present", cross=False),
         {"input_ids": batch, "encoder_hidden_states": source, "encoder_attention_mask": source, "logits": batch,
          **{n: ({0: "batch", 2: "source"} if ".encoder." in n else step) for n in past_names},
          **{n: step for n in names(layers, "present", cross=False)}})


def onnx(module, args, path, input_names, output_names, dynamic_axes) -> None:
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values it records as constants
        torch.onnx.export(module, args, path, input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)


class OnnxSeq2Seq:
    """The exported graphs in onnxruntime: greedy answers, as `ChatBot.answer` gives them."""

    def __init__(self, directory: str, threads: int = 0):
        import onnxruntime as ort
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        load = lambda name: ort.InferenceSession(os.path.join(directory, name), options,  # noqa: E731
                                                 providers=["CPUExecutionProvider"])
        self.encoder, self.first, self.later = (load("encoder_model.onnx"), load("decoder_model.onnx"),
                                                load("decoder_with_past_model.onnx"))
        self.past_names = [i.name for i in self.later.get_inputs() if i.name.startswith("past_key_values")]

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """(batch, new tokens) greedy ids; rows that said [EOS] are padded after it."""
        hidden = self.encoder.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]
        tokens = np.full((len(input_ids), 1), PAD_ID, dtype=np.int64)
        out = self.first.run(None, {"input_ids": tokens, "encoder_hidden_states": hidden,
                                    "encoder_attention_mask": attention_mask})
        cross = out[1:]  # every layer's (self key, self value, cross key, cross value)
        past = list(cross)
        generated, done = [], np.zeros(len(input_ids), dtype=bool)
        for _ in range(max_new_tokens):
            nxt = np.where(done, PAD_ID, out[0][:, -1].argmax(-1))
            generated.append(nxt)
            done |= nxt == EOS_ID
            if done.all():
                break
            out = self.later.run(None, {"input_ids": nxt[:, None].astype(np.int64), "encoder_hidden_states": hidden,
                                        "encoder_attention_mask": attention_mask, **dict(zip(self.past_names, past))})
            for i in range(len(past) // 4):  # the new self-attention keys and values; the cross ones stay
                past[4 * i], past[4 * i + 1] = out[1 + 2 * i], out[2 + 2 * i]
        return np.stack(generated, 1)

    def answer(self, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
        inputs = tokenizer(prompts, padding=True, return_tensors="np", return_token_type_ids=False)
        out = self.generate(inputs["input_ids"].astype(np.int64), inputs["attention_mask"].astype(np.int64),
                            max_new_tokens)
        return tokenizer.batch_decode(out, skip_special_tokens=True)
