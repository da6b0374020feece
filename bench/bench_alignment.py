"""Cost of the alignment objectives, and the size of a LoRA adapter for the `small` preset.

    python bench/bench_alignment.py [--steps=60]

1. Seconds per optimizer step and peak RSS of `train.py train` from the demo model
   (model_save/demo/best, run the Quickstart first) on the same rows, batch 32, for seq2seq,
   seq2seq + kl_beta (a frozen reference), DPO, and LoRA; one run each, in a fresh process.
   Step time is the median gap between consecutive log records (logging every step, no evaluation).
2. LoRA on the `small` preset (the 0.2B original): trainable parameters and the size of the
   adapter directory peft writes, for the default target modules and r=16.
"""
import json
import os
import shutil
import statistics
import sys
import tempfile

import fire

from common import ROOT, measure

DEMO = os.path.join(ROOT, "model_save", "demo", "best")


def step_seconds(out: str) -> float:
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        times = [json.loads(line)["time"] for line in f if "train/loss" in line]
    return statistics.median(b - a for a, b in zip(times[5:], times[6:]))


def main(steps: int = 60):
    work = tempfile.mkdtemp(prefix="chatlm_align_")
    common = [f"--init_from={DEMO}", f"--tokenizer_dir={DEMO}", "--model_size=tiny", "--max_seq_len=32",
              "--batch_size_per_gpu=32", "--gradient_accumulation_steps=1", "--validation_file=", "--log_with=none",
              "--logging_steps=1", f"--max_steps={steps}", "--group_by_length=false", "--learn_rate=5e-4",
              "--warmup_steps=5", "--save_steps=100000"]
    runs = {
        "seq2seq": ["--train_file=data/demo_style_train.parquet"],
        "seq2seq + kl_beta=0.1": ["--train_file=data/demo_style_train.parquet", "--kl_beta=0.1"],
        "dpo": ["--train_file=data/demo_dpo_train.parquet", "--objective=dpo"],
        "lora (seq2seq)": ["--train_file=data/demo_style_train.parquet", "--trainable=lora"],
    }
    try:
        print(f"| run (tiny preset, batch 32, {steps} steps) | s per step | peak RSS GB |\n| --- | ---: | ---: |")
        for name, flags in runs.items():
            out = os.path.join(work, name.split()[0])
            result = measure([sys.executable, "train.py", "train", *common, *flags, f"--output_dir={out}",
                              f"--train_state_dir={out}/state", "--overwrite=True"])
            assert result["returncode"] == 0, result["output"][-3000:]
            print(f"| {name} | {step_seconds(out):.3f} | {result['peak_rss_gb']:.2f} |", flush=True)
        lora = measure([sys.executable, "-c", f"""
import os, torch
from peft import LoraConfig, get_peft_model
from config import T5ModelConfig, TrainConfig
from model.chat_model import TextToTextModel, get_t5_config
cfg = TrainConfig()
model = TextToTextModel(get_t5_config(T5ModelConfig.preset("small"), cfg.vocab_size))
total = sum(p.numel() for p in model.parameters())
model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules,
                                         task_type="SEQ_2_SEQ_LM"))
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
model.save_pretrained({os.path.join(work, 'adapter')!r})
size = sum(os.path.getsize(os.path.join({os.path.join(work, 'adapter')!r}, f)) for f in os.listdir({os.path.join(work, 'adapter')!r}))
print(f"LoRA on small (r={{cfg.lora_r}}, {{','.join(cfg.lora_target_modules)}}): {{trainable:,}} trainable of {{total:,}} "
      f"parameters ({{trainable / total:.2%}}), adapter directory {{size / 2**20:.1f}} MiB")
"""])
        print(lora["output"].strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    fire.Fire(main)
