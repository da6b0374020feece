"""A matrix of user mistakes and hostile or damaged inputs, each run through the real command line.

    python bench/bench_bad_inputs.py [--only=SUBSTRING]

Every case runs in a fresh process against a finished reference run (tokenizer, train states,
best/, final/, a sampled parquet). A case passes when the command does what the contract says:
for a mistake, exit status 2, exactly one line on stderr starting with `error:`, no traceback,
and every file of the reference run unchanged; for a damaged newest state, a warning that names
it and a resume from the intact older state (exit 0). Planted pickle payloads must never run.
Cases that need a small or read-only filesystem mount a tmpfs (as root; skipped otherwise).
Prints one line per case and the totals. Takes a few minutes on 2 cores.
"""
import contextlib
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile

import fire

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data"))
sys.path.insert(0, os.path.join(ROOT, "tests"))


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def digest(paths) -> str:
    h = hashlib.sha256()
    for top in paths:
        if os.path.isfile(top):
            h.update(open(top, "rb").read())
            continue
        for root, dirs, files in sorted(os.walk(top)):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                h.update(os.path.relpath(path, top).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def run(*args, env=None):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


@contextlib.contextmanager
def tmpfs(path, size_mb, read_only=False):
    os.makedirs(path, exist_ok=True)
    options = f"size={size_mb}m" + (",ro" if read_only else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], capture_output=True).returncode:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)


class Matrix:
    def __init__(self, work):
        from conftest import demo_rows, write_rows
        self.work, self.write_rows = work, write_rows
        self.data = os.path.join(work, "data")
        os.makedirs(self.data)
        p, r = demo_rows(400)
        self.train_file = write_rows(os.path.join(self.data, "train.parquet"), p, r, row_group_size=150)
        p, r = demo_rows(24, seed=1)
        self.valid_file = write_rows(os.path.join(self.data, "valid.parquet"), p, r)
        self.empty = write_rows(os.path.join(self.data, "empty.parquet"), [], [])
        self.blank = write_rows(os.path.join(self.data, "blank.parquet"), ["", " ", None], ["a", "b", "c"])
        self.ref = os.path.join(work, "ref")
        self.flags = {"train_file": self.train_file, "validation_file": self.valid_file,
                      "tokenizer_dir": f"{self.ref}/tokenizer", "output_dir": f"{self.ref}/out",
                      "train_state_dir": f"{self.ref}/state", "model_size": "tiny", "max_seq_len": 32,
                      "vocab_size": 128, "batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
                      "learn_rate": 1e-3, "warmup_steps": 2, "epochs": 1, "max_steps": 6, "save_steps": 3,
                      "keep_latest_n_ckp": 3, "logging_steps": 1, "dataloader_buffer_size": 64, "max_eval_rows": 8,
                      "log_with": "none"}
        proc = run("train.py", "train", *self.args())
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        self.sample = os.path.join(work, "sample.parquet")
        assert run("sample_training_data.py", "--input", self.train_file, "--output", self.sample,
                   "--num_samples", 50).returncode == 0
        # Another tokenizer of the same size (the same padded embedding): only the vocabularies differ.
        from utils.tokenizer import train_tokenizer
        reversed_file = write_rows(os.path.join(self.data, "reversed.parquet"), [x[::-1] for x in p],
                                   [x[::-1] for x in r])
        self.other_tok = os.path.join(work, "other_tok")
        train_tokenizer(reversed_file, self.other_tok, vocab_size=128)
        self.final = f"{self.ref}/out/final"
        self.alignment_files(p, r)
        self.protected = [self.ref, self.sample, self.data]
        self.results = []

    def alignment_files(self, prompts, responses):
        """DPO pairs, pairs without a preference, a module of rewards and regression files."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        from conftest import as_dpo_file
        self.pairs = as_dpo_file(self.train_file, os.path.join(self.data, "pairs.parquet"))
        self.same_pairs = os.path.join(self.data, "same_pairs.parquet")
        pq.write_table(pa.table({"prompt": prompts, "chosen": responses, "rejected": [f" {x} " for x in responses]}),
                       self.same_pairs)
        self.rewards_dir = os.path.join(self.work, "rewards")
        os.makedirs(self.rewards_dir)
        with open(os.path.join(self.rewards_dir, "bad_rewards.py"), "w", encoding="utf-8") as f:
            f.write("def by_answer(prompts, completions, answer):\n    return [0.0] * len(completions)\n\n"
                    "def broken(prompts, completions):\n    raise ValueError('no score')\n\n"
                    "def short(prompts, completions):\n    return [1.0 / (1 + len(c)) for c in completions]\n\n"
                    "def too_few(prompts, completions):\n    return [1.0]\n")
        self.regression = {}
        for name, text in (("bad match", "- {prompt: a, expect: b, match: fuzzy}\n"),
                           ("bad regex", "- {prompt: a, expect: '[', match: regex}\n"),
                           ("duplicate names", "- {name: x, prompt: a, expect: b}\n- {name: x, prompt: c, expect: d}\n"),
                           ("no expect", "- {prompt: a}\n"), ("not yaml", "- [a\n")):
            path = os.path.join(self.data, f"regression_{name.replace(' ', '_')}.yaml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            self.regression[name] = path

    def args(self, **change):
        return [f"--{k}={v}" for k, v in {**self.flags, **change}.items()]

    def copy_run(self, name):
        """A copy of the reference run that a case may damage."""
        target = os.path.join(self.work, name)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(self.ref, target)
        return target, {"tokenizer_dir": f"{target}/tokenizer", "output_dir": f"{target}/out",
                        "train_state_dir": f"{target}/state"}

    def newest_state(self, run_dir):
        return sorted(d for d in os.listdir(f"{run_dir}/state") if d.startswith("step_"))[-1]

    def check(self, name, proc, expect="error", message="", marker=None, protected=None):
        before = self.before
        problems = []
        if expect == "error":
            lines = proc.stderr.strip().splitlines()
            if proc.returncode != 2:
                problems.append(f"exit {proc.returncode}")
            if len(lines) != 1 or not lines[0].startswith("error: "):
                problems.append(f"stderr has {len(lines)} lines: {proc.stderr.strip()[-300:]!r}")
            if message and message not in proc.stderr:
                problems.append(f"no {message!r} in {proc.stderr.strip()[-300:]!r}")
        else:
            if proc.returncode != 0:
                problems.append(f"exit {proc.returncode}: {proc.stderr.strip()[-300:]!r}")
            if message and message not in proc.stdout + proc.stderr:
                problems.append(f"no {message!r} in the output")
        if "Traceback" in proc.stdout + proc.stderr:
            problems.append("traceback")
        if digest(protected or self.protected) != before:
            problems.append("files of earlier runs changed")
        if marker and os.path.exists(marker):
            problems.append("THE PAYLOAD RAN")
        self.results.append((name, not problems, "; ".join(problems)))
        first = (proc.stderr.strip().splitlines() or [""])[-1][:150]
        print(f"{'ok  ' if not problems else 'FAIL'} {name}: {first if not problems else '; '.join(problems)}",
              flush=True)

    def case(self, name, *args, expect="error", message="", marker=None, protected=None, env=None):
        self.before = digest(protected or self.protected)
        proc = run(*args, env=env)
        self.check(name, proc, expect, message, marker, protected)

    def cases(self, only=""):
        c, t, a, work = self.case, "train.py", self.args, self.work
        final, train_state = self.final, f"{self.ref}/state"
        fresh = {"output_dir": f"{work}/fresh/out", "train_state_dir": f"{work}/fresh/state"}
        entries = [
            # flags and settings
            ("train: unknown flag", lambda: c("train: unknown flag", t, "train", *a(), "--epochz=2")),
            ("train: wrong type", lambda: c("train: wrong type", t, "train", *a(epochs="many", **fresh))),
            ("train: learn_rate nan flag", lambda: c("train: learn_rate nan flag", t, "train",
                                                     *a(learn_rate="nan", **fresh))),
            ("train: learn_rate inf", lambda: c("train: learn_rate inf", t, "train", *a(learn_rate=1e999, **fresh))),
            ("train: zero batch", lambda: c("train: zero batch", t, "train", *a(batch_size_per_gpu=0, **fresh))),
            ("train: unknown model_size", lambda: c("train: unknown model_size", t, "train",
                                                    *a(model_size="huge", **fresh))),
            ("train: finetune without checkpoint", lambda: c("train: finetune without checkpoint", t, "train",
                                                             *a(is_finetune=True, **fresh))),
            ("train: unknown command", lambda: c("train: unknown command", t, "trian")),
            ("yaml: .nan", lambda: self.yaml_case("yaml: .nan", "learn_rate: .nan\n")),
            ("yaml: unknown key", lambda: self.yaml_case("yaml: unknown key", "epochz: 3\n")),
            ("yaml: not yaml", lambda: self.yaml_case("yaml: not yaml", "a: [b\n")),
            ("yaml: missing", lambda: c("yaml: missing", t, "train", f"--config={work}/none.yaml")),
            # data files
            ("data: 0-row train file", lambda: c("data: 0-row train file", t, "train", *a(train_file=self.empty,
                                                                                        **fresh))),
            ("data: all prompts empty", lambda: c("data: all prompts empty", t, "train",
                                                  *a(train_file=self.blank, **fresh))),
            ("data: missing train file", lambda: c("data: missing train file", t, "train",
                                                   *a(train_file=f"{work}/none.parquet", **fresh))),
            ("data: directory as train file", lambda: c("data: directory as train file", t, "train",
                                                        *a(train_file=self.data, **fresh))),
            ("data: not parquet", lambda: self.not_parquet_case(fresh)),
            ("data: wrong columns", lambda: self.columns_case(fresh, {"q": ["a"], "a": ["b"]}, "wrong columns")),
            ("data: non-string columns", lambda: self.columns_case(fresh, {"prompt": [1], "response": [2]},
                                                                   "non-string columns")),
            ("data: 0-row validation file", lambda: c("data: 0-row validation file", t, "train",
                                                      *a(validation_file=self.empty, **fresh))),
            ("data: missing test file", lambda: c("data: missing test file", t, "train",
                                                  *a(test_file=f"{work}/none.parquet", **fresh))),
            ("data: too few rows for one step", lambda: c("data: too few rows for one step", t, "train",
                                                          *a(gradient_accumulation_steps=100, **fresh))),
            # directories
            ("dirs: train_state_dir is a file", lambda: c("dirs: train_state_dir is a file", t, "train",
                                                          *a(train_state_dir=self.train_file, output_dir=f"{work}/o"))),
            ("dirs: output_dir under a file", lambda: c("dirs: output_dir under a file", t, "train",
                                                        *a(output_dir=f"{self.train_file}/out",
                                                           train_state_dir=f"{work}/s"))),
            ("dirs: read-only train_state_dir", lambda: self.read_only_case("train_state_dir")),
            ("dirs: read-only output_dir", lambda: self.read_only_case("output_dir")),
            ("dirs: no space for a state", lambda: self.no_space_case()),
            ("dirs: existing states, no --overwrite", lambda: c("dirs: existing states, no --overwrite", t, "train",
                                                                *a())),
            # saving
            ("save: disk full during a state save", lambda: self.disk_full_case("state")),
            ("save: disk full while writing final/", lambda: self.disk_full_case("final")),
            # tokenizers and checkpoints
            ("tokenizer: garbage tokenizer.json", lambda: self.garbage_tokenizer_case()),
            ("finetune: other vocabulary, same size (dir)", lambda: c(
                "finetune: other vocabulary, same size (dir)", t, "train",
                *a(is_finetune=True, finetune_from_ckp_file=final, tokenizer_dir=self.other_tok, **fresh))),
            ("finetune: other vocabulary, same size (.safetensors)", lambda: c(
                "finetune: other vocabulary, same size (.safetensors)", t, "train",
                *a(is_finetune=True, finetune_from_ckp_file=f"{final}/model.safetensors",
                   tokenizer_dir=self.other_tok, **fresh))),
            ("finetune: missing checkpoint", lambda: c("finetune: missing checkpoint", t, "train",
                                                       *a(is_finetune=True, finetune_from_ckp_file=f"{work}/no",
                                                          **fresh))),
            ("finetune: not safetensors", lambda: c("finetune: not safetensors", t, "train",
                                                    *a(is_finetune=True, finetune_from_ckp_file=self.train_file,
                                                       **fresh))),
            # resume
            ("resume: no state", lambda: c("resume: no state", t, "train", *a(is_keep_training=True, **fresh))),
            ("resume: other batch size", lambda: c("resume: other batch size", t, "train",
                                                   *a(is_keep_training=True, batch_size_per_gpu=4))),
            ("resume: other model size", lambda: c("resume: other model size", t, "train",
                                                   *a(is_keep_training=True, model_size="small"))),
            ("resume: other tokenizer, same size", lambda: c("resume: other tokenizer, same size", t, "train",
                                                             *a(is_keep_training=True, tokenizer_dir=self.other_tok))),
            ("resume: other data", lambda: c("resume: other data", t, "train",
                                             *a(is_keep_training=True, train_file=self.valid_file))),
            ("resume: truncated model.safetensors", lambda: self.damaged_case("truncate model")),
            ("resume: missing optimizer.pt", lambda: self.damaged_case("missing optimizer")),
            ("resume: garbage state.json", lambda: self.damaged_case("garbage json")),
            ("resume: missing rng file", lambda: self.damaged_case("missing rng")),
            ("resume: every state damaged", lambda: self.damaged_case("all")),
            ("resume: old pickle state", lambda: self.legacy_case()),
        ]
        for file in ("model.safetensors", "optimizer.pt", "rng.rank0.safetensors", "state.json", "manifest.json"):
            entries.append((f"security: payload in {file}", lambda f=file: self.payload_case(f)))
        for file in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl"):
            entries.append((f"security: payload in old-format {file}", lambda f=file: self.legacy_case(f)))
        entries += [
            # the other commands
            ("sampler: typo'd flag over an existing output", lambda: c(
                "sampler: typo'd flag over an existing output", "sample_training_data.py", "--input", self.train_file,
                "--output", self.sample, "--num_samples", 20, "--seedd", 3)),
            ("sampler: missing input", lambda: c("sampler: missing input", "sample_training_data.py", "--input",
                                                 f"{work}/none.parquet", "--output", f"{work}/x.parquet",
                                                 "--num_samples", 5)),
            ("sampler: ratio out of range", lambda: c("sampler: ratio out of range", "sample_training_data.py",
                                                      "--input", self.train_file, "--output", f"{work}/x.parquet",
                                                      "--ratio", 1.5)),
            ("sampler: output is the input", lambda: c("sampler: output is the input", "sample_training_data.py",
                                                       "--input", self.sample, "--output", self.sample,
                                                       "--num_samples", 5)),
            ("sampler: near_dup without smart", lambda: c("sampler: near_dup without smart",
                                                          "sample_training_data.py", "--input", self.train_file,
                                                          "--output", f"{work}/x.parquet", "--num_samples", 5,
                                                          "--near_dup")),
            ("train_tokenizer: typo'd flag over a tokenizer", lambda: c(
                "train_tokenizer: typo'd flag over a tokenizer", t, "train_tokenizer", f"--files={self.train_file}",
                f"--output_dir={self.ref}/tokenizer", "--vocabsize=64")),
            ("train_tokenizer: empty corpus", lambda: c("train_tokenizer: empty corpus", t, "train_tokenizer",
                                                        f"--files={self.empty}", f"--output_dir={work}/tok")),
            ("train_tokenizer: missing file", lambda: c("train_tokenizer: missing file", t, "train_tokenizer",
                                                        f"--files={work}/none.parquet", f"--output_dir={work}/tok")),
            ("evaluate: typo'd flag", lambda: c("evaluate: typo'd flag", t, "evaluate", f"--model_dir={final}",
                                                f"--test_file={self.valid_file}", "--max_row=5")),
            ("evaluate: 0-row file", lambda: c("evaluate: 0-row file", t, "evaluate", f"--model_dir={final}",
                                               f"--test_file={self.empty}")),
            ("evaluate: wrong type", lambda: c("evaluate: wrong type", t, "evaluate", f"--model_dir={final}",
                                               f"--test_file={self.valid_file}", "--max_rows=many")),
            ("evaluate: model dir without weights", lambda: self.model_dir_case("evaluate", "weights")),
            ("chat: typo'd flag", lambda: c("chat: typo'd flag", t, "chat", f"--model_dir={final}", "--prompt=hi",
                                            "--serch_type=beam")),
            ("chat: bogus search_type", lambda: c("chat: bogus search_type", t, "chat", f"--model_dir={final}",
                                                  "--prompt=hi", "--search_type=bogus")),
            ("chat: missing model dir", lambda: c("chat: missing model dir", t, "chat", f"--model_dir={work}/none",
                                                  "--prompt=hi")),
            ("chat: model dir without weights", lambda: self.model_dir_case("chat", "weights")),
            ("chat: model dir without tokenizer", lambda: self.model_dir_case("chat", "tokenizer")),
            ("chat: garbage tokenizer.json", lambda: self.model_dir_case("chat", "garbage tokenizer")),
            ("low_mem: typo'd flag", lambda: c("low_mem: typo'd flag", "train_low_mem.py", "train", *a(),
                                               "--lern_rate=1")),
        ]
        entries += self.alignment_cases(fresh) + self.other_new_cases(fresh)
        for name, fn in entries:
            if only in name:
                fn()

    def alignment_cases(self, fresh):
        """DPO, GRPO and LoRA mistakes; every one is an error before training, or one line at the
        first step it shows."""
        t, a, final = "train.py", self.args, self.final
        dpo = {"objective": "dpo", "init_from": final, "train_file": self.pairs, "validation_file": "", **fresh}
        grpo = {"objective": "grpo", "init_from": final, "validation_file": "", "grpo_group_size": 2,
                "grpo_max_new_tokens": 3, **fresh}
        lora = {"trainable": "lora", "init_from": final, "validation_file": "", **fresh}
        rewards_env = {"PYTHONPATH": self.rewards_dir}
        cases = [
            ("dpo: without init_from", {**dpo, "init_from": ""}, None, "--init_from"),
            ("dpo: a prompt/response file", {**dpo, "train_file": self.train_file}, None, "chosen, rejected"),
            ("dpo: chosen equals rejected in every row", {**dpo, "train_file": self.same_pairs}, None,
             "chosen equals rejected"),
            ("dpo: validation file of prompt/response rows", {**dpo, "validation_file": self.valid_file}, None,
             "chosen"),
            ("dpo: unknown dpo_loss", {**dpo, "dpo_loss": "kto"}, None, "dpo_loss"),
            ("dpo: label smoothing 0.5", {**dpo, "dpo_label_smoothing": 0.5}, None, "dpo_label_smoothing"),
            ("dpo: kl_beta with dpo", {**dpo, "kl_beta": 0.1}, None, "--kl_beta"),
            ("dpo: a best_metric it does not report", {**dpo, "best_metric": "bleu5"}, None, "best_metric"),
            ("grpo: without init_from", {**grpo, "init_from": ""}, None, "--init_from"),
            ("grpo: group of 1", {**grpo, "grpo_group_size": 1}, None, "grpo_group_size"),
            ("grpo: top_p 0", {**grpo, "grpo_top_p": 0}, None, "grpo_top_p"),
            ("grpo: unknown reward", {**grpo, "reward": "exact"}, None, "neither a built-in"),
            ("grpo: the old char_f1", {**grpo, "reward": "char_f1"}, None, "lcs_f1"),
            ("grpo: reward weight not a number", {**grpo, "reward": "exact_match=heavy"}, None, "not a number"),
            ("grpo: reward module missing", {**grpo, "reward": "no_such_module:f"}, None, "cannot import"),
            ("grpo: reward function missing", {**grpo, "reward": "bad_rewards:nothing"}, rewards_env,
             "has no function"),
            ("grpo: reward reads a missing column", {**grpo, "reward": "bad_rewards:by_answer"}, rewards_env,
             "no column answer"),
            ("grpo: reward raises", {**grpo, "reward": "bad_rewards:broken"}, rewards_env, "raised ValueError"),
            ("grpo: reward returns too few values", {**grpo, "reward": "bad_rewards:too_few"}, rewards_env,
             "one finite number per completion"),
            ("grpo: best by exact match with no response read", {**grpo, "reward": "bad_rewards:short",
                                                                 "best_metric": "exact_match"}, rewards_env,
             "--best_metric=reward"),
            ("grpo: best by a reward not in the sum", {**grpo, "best_metric": "reward/lcs_f1"}, None, "has no lcs_f1"),
            ("grpo: iterations with accumulation", {**grpo, "grpo_iterations": 2, "gradient_accumulation_steps": 2},
             None, "--grpo_iterations"),
            ("grpo: a reward with no signal", {**grpo, "reward": "exact_match=0", "grpo_max_zero_signal_steps": 2},
             None, "gives no signal"),
            ("lora: unknown target module", {**lora, "lora_target_modules": "q,wx"}, None, "matches no linear layer"),
            ("lora: no target module", {**lora, "lora_target_modules": ","}, None, "lora_target_modules"),
            ("lora: with is_finetune", {**lora, "init_from": "", "is_finetune": True, "finetune_from_ckp_file": final},
             None, "LoRA"),
            ("lora: dropout 1", {**lora, "lora_dropout": 1.0}, None, "lora_dropout"),
            ("lora: rank 0", {**lora, "lora_r": 0}, None, "lora_r"),
            ("dropout: disable_dropout sometimes", {**dpo, "disable_dropout": "sometimes"}, None, "disable_dropout"),
        ]
        return [(name, lambda name=name, flags=flags, env=env, says=says: self.case(
            name, t, "train", *a(**flags), message=says, env=env)) for name, flags, env, says in cases]

    def other_new_cases(self, fresh):
        """make_dpo_pairs, plot, serve, weighted mixes, regression files, speed settings, launch."""
        c, t, a, final, work = self.case, "train.py", self.args, self.final, self.work
        pairs = [t, "make_dpo_pairs", f"--model_dir={final}", f"--input={self.train_file}"]
        out = f"{self.ref}/out"
        entries = [
            ("make_dpo_pairs: output exists", lambda: c("make_dpo_pairs: output exists", *pairs,
                                                         f"--output={self.sample}", message="--overwrite=True")),
            ("make_dpo_pairs: output is the input", lambda: c("make_dpo_pairs: output is the input", *pairs,
                                                               f"--output={self.train_file}", message="is the input")),
            ("make_dpo_pairs: missing model dir", lambda: c("make_dpo_pairs: missing model dir", t, "make_dpo_pairs",
                                                             f"--model_dir={work}/none", f"--input={self.train_file}",
                                                             f"--output={work}/p.parquet")),
            ("make_dpo_pairs: input without response", lambda: c("make_dpo_pairs: input without response", t,
                                                                  "make_dpo_pairs", f"--model_dir={final}",
                                                                  f"--input={self.pairs}", f"--output={work}/p.parquet",
                                                                  message="response")),
            ("make_dpo_pairs: typo'd flag", lambda: c("make_dpo_pairs: typo'd flag", *pairs,
                                                       f"--output={work}/p.parquet", "--batchsize=3")),
            ("sampler: output exists", lambda: c("sampler: output exists", "sample_training_data.py", "--input",
                                                 self.train_file, "--output", self.sample, "--num_samples", 5,
                                                 message="--overwrite=True")),
            ("plot: no metrics.jsonl", lambda: c("plot: no metrics.jsonl", t, "plot", f"--output_dir={work}/none")),
            ("plot: empty metrics.jsonl", lambda: self.plot_case("plot: empty metrics.jsonl", "")),
            ("plot: garbage metrics.jsonl", lambda: self.plot_case("plot: garbage metrics.jsonl", "{half\n[1]\n")),
            ("plot: unknown metric", lambda: c("plot: unknown metric", t, "plot", f"--output_dir={out}",
                                               "--metric=rouge", message="can be one of")),
            ("serve: port out of range", lambda: c("serve: port out of range", t, "serve", f"--model_dir={final}",
                                                   "--port=70000")),
            ("serve: remote host without a key", lambda: c("serve: remote host without a key", t, "serve",
                                                           f"--model_dir={final}", "--host=0.0.0.0",
                                                           message="--api_key")),
            ("serve: missing model dir", lambda: c("serve: missing model dir", t, "serve", f"--model_dir={work}/none")),
            ("serve: bad device", lambda: c("serve: bad device", t, "serve", f"--model_dir={final}", "--device=tpu")),
            ("serve: zero batch", lambda: c("serve: zero batch", t, "serve", f"--model_dir={final}",
                                            "--max_batch_size=0")),
            ("serve: typo'd flag", lambda: c("serve: typo'd flag", t, "serve", f"--model_dir={final}", "--prot=1")),
            ("export: missing model dir", lambda: c("export: missing model dir", t, "export",
                                                    f"--model_dir={work}/none", f"--output_dir={work}/onnx_none")),
            ("export: unknown format", lambda: c("export: unknown format", t, "export", f"--model_dir={final}",
                                                 "--format=tflite", f"--output_dir={work}/onnx_bad",
                                                 message="--format")),
            ("export: over an existing output", lambda: c("export: over an existing output", t, "export",
                                                          f"--model_dir={final}", f"--output_dir={self.data}",
                                                          message="--overwrite=True")),
            ("export: typo'd flag", lambda: c("export: typo'd flag", t, "export", f"--model_dir={final}",
                                              "--formt=onnx")),
            ("export: over the model itself", lambda: c("export: over the model itself", t, "export",
                                                        f"--model_dir={final}", f"--output_dir={final}",
                                                        "--overwrite=True", message="model directory itself")),
            ("serve: every address without --allowed_hosts", lambda: c(
                "serve: every address without --allowed_hosts", t, "serve", f"--model_dir={final}", "--host=0.0.0.0",
                "--api_key=k", message="--allowed_hosts")),
            ("serve: an origin without a scheme", lambda: c("serve: an origin without a scheme", t, "serve",
                                                            f"--model_dir={final}", "--allowed_origins=evil.example",
                                                            message="scheme://")),
            ("serve: zero header deadline", lambda: c("serve: zero header deadline", t, "serve", f"--model_dir={final}",
                                                      "--header_timeout_s=0", message="--header_timeout_s")),
            ("serve: zero stop length", lambda: c("serve: zero stop length", t, "serve", f"--model_dir={final}",
                                                  "--max_stop_chars=0", message="--max_stop_chars")),
            ("mix: weight 0", lambda: self.yaml_case("mix: weight 0", f"train_file: {{{self.train_file}: 0}}\n")),
            ("mix: a file in two sources", lambda: self.yaml_case(
                "mix: a file in two sources", f"train_file: {{{self.train_file}: 1, '{self.data}/train*': 2}}\n")),
            ("mix: unknown mix_strategy", lambda: c("mix: unknown mix_strategy", t, "train",
                                                    *a(mix_strategy="round_robin", **fresh))),
            ("mix: a source that matches no file", lambda: self.yaml_case(
                "mix: a source that matches no file", f"train_file: {{{self.train_file}: 1, {work}/no*.parquet: 1}}\n")),
            ("regression: missing file", lambda: c("regression: missing file", t, "train",
                                                   *a(regression_file=f"{work}/none.yaml", **fresh))),
        ]
        for name, path in self.regression.items():
            entries.append((f"regression: {name}", lambda name=name, path=path: c(
                f"regression: {name}", t, "train", *a(regression_file=path, **fresh))))
        entries += [
            ("speed: token budget below 2 x max_seq_len", lambda: c("speed: token budget below 2 x max_seq_len", t,
                                                                     "train", *a(max_tokens_per_batch=40, **fresh))),
            ("speed: unknown compile backend", lambda: c("speed: unknown compile backend", t, "train",
                                                         *a(torch_compile=True, torch_compile_backend="tvm", **fresh))),
            ("speed: unknown attn_implementation", lambda: c("speed: unknown attn_implementation", t, "train",
                                                             *a(attn_implementation="flash", **fresh))),
            ("speed: negative pad_to_multiple_of", lambda: c("speed: negative pad_to_multiple_of", t, "train",
                                                             *a(pad_to_multiple_of=-8, **fresh))),
            ("speed: loss_chunk_tokens below -1", lambda: c("speed: loss_chunk_tokens below -1", t, "train",
                                                            *a(loss_chunk_tokens=-5, **fresh))),
            ("launch: ACCELERATE_USE_DEEPSPEED on a CPU", lambda: c("launch: ACCELERATE_USE_DEEPSPEED on a CPU", t,
                                                                     "train", *a(**fresh), message="DeepSpeed",
                                                                     env={"ACCELERATE_USE_DEEPSPEED": "true"})),
            ("launch: ACCELERATE_USE_FSDP on a CPU", lambda: c("launch: ACCELERATE_USE_FSDP on a CPU", t, "train",
                                                               *a(**fresh), message="FSDP",
                                                               env={"ACCELERATE_USE_FSDP": "true"})),
            ("launch: FSDP2 config with parameter offload", lambda: c(
                "launch: FSDP2 config with parameter offload", t, "train", *a(**fresh), message="fsdp_offload_params",
                env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"})),
            ("launch: --fsdp disagreeing with the FSDP2 config", lambda: c(
                "launch: --fsdp disagreeing with the FSDP2 config", t, "train", *a(fsdp="grad_op", **fresh),
                message="launch config asks for FSDP2 full",
                env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"})),
            ("launch: --fsdp with fp16", lambda: c("launch: --fsdp with fp16", t, "train",
                                                   *a(fsdp="full", mixed_precision="fp16", **fresh),
                                                   message="grad scaler")),
            ("launch: --fsdp with adafactor", lambda: c("launch: --fsdp with adafactor", t, "train",
                                                        *a(fsdp="full", optimizer="adafactor", **fresh),
                                                        message="--optimizer=adamw")),
            ("launch: unknown --fsdp", lambda: c("launch: unknown --fsdp", t, "train", *a(fsdp="zero3", **fresh),
                                                 message="--fsdp")),
        ]
        return entries

    def plot_case(self, name, text):
        run_dir = os.path.join(self.work, "plot_run")
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "metrics.jsonl"), "w", encoding="utf-8") as f:
            f.write(text)
        self.case(name, "train.py", "plot", f"--output_dir={run_dir}", message="no usable line")

    # ---- cases that need setting up ------------------------------------------------------
    def yaml_case(self, name, text):
        path = os.path.join(self.work, "c.yaml")
        with open(path, "w") as f:
            f.write(text)
        self.case(name, "train.py", "train", f"--config={path}")

    def not_parquet_case(self, fresh):
        path = os.path.join(self.work, "text.parquet")
        with open(path, "w") as f:
            f.write("not parquet")
        self.case("data: not parquet", "train.py", "train", *self.args(train_file=path, **fresh))

    def columns_case(self, fresh, columns, name):
        import pyarrow as pa
        import pyarrow.parquet as pq
        path = os.path.join(self.work, f"{name.replace(' ', '_')}.parquet")
        pq.write_table(pa.table(columns), path)
        self.case(f"data: {name}", "train.py", "train", *self.args(train_file=path, **fresh))

    def read_only_case(self, what):
        mount = os.path.join(self.work, f"ro_{what}")
        with tmpfs(mount, 8, read_only=True) as path:
            if path is None:
                print(f"skip dirs: read-only {what} (cannot mount a tmpfs)")
                return
            change = {"output_dir": f"{self.work}/o", "train_state_dir": f"{self.work}/s", what: path}
            self.case(f"dirs: read-only {what}", "train.py", "train", *self.args(**change))

    def no_space_case(self):
        mount = os.path.join(self.work, "tiny_fs")
        with tmpfs(mount, 4) as path:
            if path is None:
                print("skip dirs: no space for a state (cannot mount a tmpfs)")
                return
            self.case("dirs: no space for a state", "train.py", "train",
                      *self.args(output_dir=f"{self.work}/o", train_state_dir=f"{path}/state"))

    def disk_full_case(self, where):
        mount = os.path.join(self.work, f"full_{where}")
        name = f"save: disk full {'during a state save' if where == 'state' else 'while writing final/'}"
        with tmpfs(mount, 40 if where == "state" else 10) as path:
            if path is None:
                print(f"skip {name} (cannot mount a tmpfs)")
                return
            if where == "state":
                change = {"train_state_dir": f"{path}/state", "output_dir": f"{self.work}/o_{where}",
                          "save_steps": 1, "keep_latest_n_ckp": 5, "validation_file": ""}
            else:
                change = {"output_dir": f"{path}/out", "train_state_dir": f"{self.work}/s_{where}"}
            self.case(name, "train.py", "train", *self.args(**change, max_steps=6), message="no space left")
            leftovers = [d for _, dirs, _ in os.walk(path) for d in dirs if d.endswith(".tmp")]
            if leftovers:
                self.results[-1] = (name, False, f"left {leftovers}")
                print(f"FAIL {name}: left {leftovers}")

    def garbage_tokenizer_case(self):
        tok = os.path.join(self.work, "garbage_tok")
        shutil.copytree(f"{self.ref}/tokenizer", tok, dirs_exist_ok=True)
        with open(os.path.join(tok, "tokenizer.json"), "w") as f:
            f.write("{garbage")
        self.case("tokenizer: garbage tokenizer.json", "train.py", "train",
                  *self.args(tokenizer_dir=tok, output_dir=f"{self.work}/o", train_state_dir=f"{self.work}/s"))

    def damaged_case(self, damage):
        run_dir, change = self.copy_run(f"damaged_{damage.replace(' ', '_')}")
        states = sorted(d for d in os.listdir(f"{run_dir}/state") if d.startswith("step_"))
        targets = states if damage == "all" else states[-1:]
        for state in targets:
            path = f"{run_dir}/state/{state}"
            if damage in ("truncate model", "all"):
                with open(f"{path}/model.safetensors", "r+b") as f:
                    f.truncate(1000)
            elif damage == "missing optimizer":
                os.remove(f"{path}/optimizer.pt")
            elif damage == "garbage json":
                with open(f"{path}/state.json", "w") as f:
                    f.write("{garbage")
            elif damage == "missing rng":
                os.remove(f"{path}/rng.rank0.safetensors")
        name = {"truncate model": "resume: truncated model.safetensors", "missing optimizer":
                "resume: missing optimizer.pt", "garbage json": "resume: garbage state.json",
                "missing rng": "resume: missing rng file", "all": "resume: every state damaged"}[damage]
        if damage == "all":
            self.case(name, "train.py", "train", *self.args(is_keep_training=True, **change),
                      message="no intact train state")
        else:
            self.case(name, "train.py", "train", *self.args(is_keep_training=True, max_steps=9, **change),
                      expect="ok", message=f"{targets[0]} is damaged")

    def payload_case(self, file):
        import model.checkpoint as ckpt
        import torch
        run_dir, change = self.copy_run(f"payload_{file}")
        state = f"{run_dir}/state/{self.newest_state(run_dir)}"
        marker = os.path.join(self.work, f"marker_{file}")
        path = os.path.join(state, file)
        if file == "optimizer.pt":
            saved = torch.load(path, weights_only=True)
            saved["state"][0]["exp_avg"] = Payload(marker)
            torch.save(saved, path)
        else:
            with open(path, "wb") as f:
                f.write(pickle.dumps(Payload(marker)))
        if file != "manifest.json":  # the attacker rewrote the checksums too
            os.remove(os.path.join(state, ckpt.MANIFEST))
            ckpt.write_manifest(state)
        # Older states hold no payload: keep only the planted one, so the resume must refuse it.
        for other in os.listdir(f"{run_dir}/state"):
            if other != os.path.basename(state):
                shutil.rmtree(f"{run_dir}/state/{other}")
        self.case(f"security: payload in {file}", "train.py", "train", *self.args(is_keep_training=True, **change),
                  marker=marker)

    def legacy_case(self, planted=None):
        """A state in the old format (Accelerate save_state with pickled custom states)."""
        run_dir, change = self.copy_run(f"legacy_{planted}")
        marker = os.path.join(self.work, f"marker_legacy_{planted}")
        state_dir = f"{run_dir}/state"
        shutil.rmtree(state_dir)
        legacy = f"{state_dir}/step_00000006"
        os.makedirs(legacy)
        shutil.copy(f"{run_dir}/out/final/model.safetensors", legacy)
        for name in ("optimizer.bin", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl"):
            with open(os.path.join(legacy, name), "wb") as f:
                f.write(pickle.dumps(Payload(marker) if name == planted else {"step": 6}))
        with open(os.path.join(legacy, "chatlm_state.json"), "w") as f:
            json.dump({"step": 6}, f)
        name = f"security: payload in old-format {planted}" if planted else "resume: old pickle state"
        self.case(name, "train.py", "train", *self.args(is_keep_training=True, **change), marker=marker,
                  message="--trust_pickled_state=True")

    def model_dir_case(self, command, missing):
        model_dir = os.path.join(self.work, f"model_{command}_{missing.replace(' ', '_')}")
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.copytree(self.final, model_dir)
        if missing == "weights":
            os.remove(f"{model_dir}/model.safetensors")
        elif missing == "tokenizer":
            os.remove(f"{model_dir}/tokenizer.json")
        else:
            with open(f"{model_dir}/tokenizer.json", "w") as f:
                f.write("{garbage")
        args = [f"--model_dir={model_dir}"] + (["--prompt=hi"] if command == "chat" else
                                               [f"--test_file={self.valid_file}"])
        self.case(f"{command}: model dir without {missing}" if missing != "garbage tokenizer"
                  else f"{command}: garbage tokenizer.json", "train.py", command, *args)


def main(only: str = "", keep: bool = False):
    work = tempfile.mkdtemp(prefix="chatlm_bad_inputs_")
    try:
        matrix = Matrix(work)
        matrix.cases(only)
        passed = sum(ok for _, ok, _ in matrix.results)
        surfaces = {}
        for name, ok, _ in matrix.results:
            counts = surfaces.setdefault(name.split(":")[0], [0, 0])
            counts[0], counts[1] = counts[0] + ok, counts[1] + 1
        print("\nby surface: " + ", ".join(f"{k} {ok}/{n}" for k, (ok, n) in surfaces.items()))
        print(f"{passed} of {len(matrix.results)} cases end as the contract says "
              "(mistakes: one `error:` line, exit 2, nothing of earlier runs changed; damaged states: named, "
              "the intact one used; no payload ran)")
        for name, ok, why in matrix.results:
            if not ok:
                print(f"  FAIL {name}: {why}")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    fire.Fire(main)
