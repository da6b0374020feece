"""kill -9 at random moments, some during saves; then one resume: does it finish the run, and exactly?

    python bench/bench_kill_resume.py [--trials=24] [--seed=0]

A reference run (tiny model, 400 demo rows, 2 epochs, accumulation 2, a train state every
4 steps, evaluation and best/ every 10 steps, a test report at the end) runs uninterrupted.
Each trial starts the same run and kills it with SIGKILL: at a random moment (a quarter of the
trials), or the moment a save is under way, the first from a random step on: a train state
(`step_N.tmp` appears), best/ (`best.tmp`) or final/ (`final.tmp`). Then the same command runs once more, as
a scheduler would restart it: every run has `--is_keep_training=auto` (resume from the newest
intact state, or start over when there is none).
Printed per trial: where it was killed, the step it resumed from, whether that one command
finished the run (exit 0, final/ written, test report printed), and the largest difference
of final/'s weights from the reference run's.
"""
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

import fire

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data"))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def flags(work, data, tokenizer, name):
    out = os.path.join(work, name)
    return [f"--train_file={data}/train.parquet", f"--validation_file={data}/valid.parquet",
            f"--test_file={data}/valid.parquet", f"--tokenizer_dir={tokenizer}", f"--output_dir={out}/out",
            f"--train_state_dir={out}/state", "--model_size=tiny", "--max_seq_len=32", "--batch_size_per_gpu=8",
            "--gradient_accumulation_steps=2", "--learn_rate=3e-3", "--warmup_steps=5", "--epochs=2",
            "--save_steps=4", "--keep_latest_n_ckp=2", "--eval_steps=10", "--max_eval_rows=24", "--logging_steps=1",
            "--dataloader_buffer_size=64", "--log_with=none", "--seed=7", "--is_keep_training=auto"], out


def start(args):
    return subprocess.Popen([sys.executable, "train.py", "train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def finish(args):
    return subprocess.run([sys.executable, "train.py", "train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def weights(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "out", "final", "model.safetensors"))


def newest_step(out) -> int:
    """The highest step of a train state directory (complete or being written)."""
    folder = os.path.join(out, "state")
    steps = [int(m.group(1)) for n in (os.listdir(folder) if os.path.isdir(folder) else [])
             if (m := re.fullmatch(r"step_(\d+)(\.tmp|\.old)?", n))]
    return max(steps, default=-1)


def kill_when(proc, out, moment, delay, after_step):
    """SIGKILL `proc` at `moment` (for saves: the first one from `after_step` on); returns what
    was under way, or None if the run finished first."""
    began = time.perf_counter()
    patterns = {"state": ("state", ".tmp"), "best": ("out", "best.tmp"), "final": ("out", "final.tmp")}
    while proc.poll() is None:
        if moment == "random":
            if time.perf_counter() - began >= delay:
                break
        else:
            where, suffix = patterns[moment]
            folder = os.path.join(out, where)
            if os.path.isdir(folder) and any(n.endswith(suffix) for n in os.listdir(folder)) \
                    and newest_step(out) >= after_step:
                break
        time.sleep(0.001)
    if proc.poll() is not None:
        return None
    proc.kill()
    proc.wait()
    folder = os.path.join(out, "state")
    saving = [n for n in os.listdir(folder) if n.endswith(".tmp")] if os.path.isdir(folder) else []
    return f"{moment}{' (a state save under way)' if saving and moment != 'state' else ''}"


def main(trials: int = 24, seed: int = 0, keep: bool = False):
    from conftest import demo_rows, write_rows
    from utils.tokenizer import train_tokenizer
    work = tempfile.mkdtemp(prefix="chatlm_kill_")
    try:
        data = os.path.join(work, "data")
        os.makedirs(data)
        p, r = demo_rows(400)
        write_rows(os.path.join(data, "train.parquet"), p, r, row_group_size=150)
        p, r = demo_rows(24, seed=1)
        write_rows(os.path.join(data, "valid.parquet"), p, r)
        tokenizer = os.path.join(work, "tokenizer")
        train_tokenizer(os.path.join(data, "train.parquet"), tokenizer, vocab_size=128, model_max_length=32)
        ref_args, ref_out = flags(work, data, tokenizer, "reference")
        began = time.perf_counter()
        ref = finish(ref_args)
        assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
        wall = time.perf_counter() - began
        reference = weights(ref_out)
        steps = int(re.search(r"training: (\d+) optimizer steps", ref.stdout).group(1))
        print(f"reference run: {steps} steps, {wall:.1f} s with start-up")
        rng = random.Random(seed)
        moments = ["random", "state", "best", "final"]
        plan = [moments[i % 4] if i % 4 else "random" for i in range(trials)]
        rows, completed, worst = [], 0, 0.0
        for i, moment in enumerate(plan):
            args, out = flags(work, data, tokenizer, f"trial{i}")
            proc = start(args)
            # best/ is written only when BLEU improves, which it stops doing late in this short run.
            after = rng.randrange(0, steps // 2 if moment == "best" else steps, 4)
            killed = kill_when(proc, out, moment, rng.uniform(0.3 * wall, wall), after)
            done = finish(args)
            m = re.search(r"resumed from \S+step_(\d+)", done.stdout)
            ok = done.returncode == 0 and os.path.isfile(os.path.join(out, "out", "final", "model.safetensors")) \
                and "exact match" in done.stdout
            difference = None
            if ok:
                completed += 1
                final = weights(out)
                difference = max(float((final[k] - reference[k]).abs().max()) for k in reference)
                worst = max(worst, difference)
            resumed = f"step {int(m.group(1))}" if m else ("a new run" if "starting a new run" in done.stdout else "?")
            rows.append((i, killed or "finished before the kill", resumed, ok, difference))
            print(f"trial {i:2d}: killed {killed or 'never (it had finished)':<38} resumed from {resumed:<12} "
                  f"{'completed' if ok else 'FAILED: ' + (done.stderr.strip()[-300:] or done.stdout[-300:])}"
                  f"{'' if difference is None else f', max weight difference {difference:.3g}'}", flush=True)
            if not keep:
                shutil.rmtree(os.path.join(work, f"trial{i}"), ignore_errors=True)
        killed_runs = [r for r in rows if r[1] != "finished before the kill"]
        during_saves = [r for r in killed_runs if r[1] != "random"]
        print(f"\n{len(killed_runs)} runs killed ({len(during_saves)} during a save of a state, best/ or final/): "
              f"{sum(r[3] for r in killed_runs)} completed with one resume command; "
              f"{completed} of {len(rows)} trials in all; largest weight difference from the uninterrupted run "
              f"{worst:.3g}")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    fire.Fire(main)
