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
        self.protected = [self.ref, self.sample, self.data]
        self.results = []

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
        for name, fn in entries:
            if only in name:
                fn()

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
        print(f"\n{passed} of {len(matrix.results)} cases end as the contract says "
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
