"""ONNX export of the demo model: the export's time, and greedy answers through onnxruntime against
PyTorch (equality and latency, one prompt at a time and in batches of 32).

    python bench/bench_export.py [--model_dir=model_save/demo/best] [--prompts=300]

The export is `train.py export` (model/export.py) in a child process, timed whole. Then, in this
process, the demo's held-out test prompts are answered greedily by `ChatBot.answer` (PyTorch) and
by the exported graphs in onnxruntime (`OnnxSeq2Seq`), both with the machine's threads; the
answers are compared and the latency per prompt reported (median of single prompts; mean per
prompt in batches).
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time

import fire

from common import ROOT


def main(model_dir: str = os.path.join(ROOT, "model_save", "demo", "best"), prompts: int = 300):
    import pyarrow.parquet as pq
    if not os.path.isdir(model_dir):
        sys.exit(f"no model in {model_dir}: run the Quickstart's first command first")
    sys.path.insert(0, ROOT)
    import torch

    from model.export import OnnxSeq2Seq
    from model.infer import ChatBot
    test = pq.read_table(os.path.join(ROOT, "data", "demo_test.parquet"), columns=["prompt"]).column(0).to_pylist()
    test = test[:prompts]
    with tempfile.TemporaryDirectory() as work:
        out = os.path.join(work, "onnx")
        start = time.perf_counter()
        subprocess.run([sys.executable, "train.py", "export", f"--model_dir={model_dir}", "--format=onnx",
                        f"--output_dir={out}"], cwd=ROOT, check=True, capture_output=True)
        export_seconds = time.perf_counter() - start
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".onnx"))
        bot = ChatBot(model_dir, "cpu")
        ort = OnnxSeq2Seq(out)
        ort.answer(bot.tokenizer, test[:4], bot.max_new_tokens), bot.answer(test[:4])  # warm up

        def single(answer):
            seconds, answers = [], []
            for p in test:
                t = time.perf_counter()
                answers += answer([p])
                seconds.append(time.perf_counter() - t)
            return statistics.median(seconds), answers

        def batched(answer):
            t = time.perf_counter()
            answers = [a for i in range(0, len(test), 32) for a in answer(test[i:i + 32])]
            return (time.perf_counter() - t) / len(test), answers
        with torch.inference_mode():
            torch_single, torch_answers = single(bot.answer)
            torch_batched, _ = batched(bot.answer)
        onnx_single, onnx_answers = single(lambda ps: ort.answer(bot.tokenizer, ps, bot.max_new_tokens))
        onnx_batched, onnx_batched_answers = batched(lambda ps: ort.answer(bot.tokenizer, ps, bot.max_new_tokens))
    same = sum(a == b for a, b in zip(torch_answers, onnx_answers))
    same_batched = sum(a == b for a, b in zip(torch_answers, onnx_batched_answers))
    print(f"model {model_dir}, {len(test)} held-out demo prompts, {torch.get_num_threads()} threads")
    print(f"export: {export_seconds:.1f} s for the whole command (model load, 3 graphs, the check), {size / 1e6:.1f} MB")
    print(f"greedy answers equal to PyTorch's: {same}/{len(test)} one by one, {same_batched}/{len(test)} in batches")
    print(f"latency per prompt, one at a time (median): PyTorch {1000 * torch_single:.1f} ms, onnxruntime "
          f"{1000 * onnx_single:.1f} ms ({torch_single / onnx_single:.2f}x)")
    print(f"latency per prompt in batches of 32 (mean): PyTorch {1000 * torch_batched:.2f} ms, onnxruntime "
          f"{1000 * onnx_batched:.2f} ms ({torch_batched / onnx_batched:.2f}x)")


if __name__ == "__main__":
    fire.Fire(main)
