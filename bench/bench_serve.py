"""Serving throughput and latency of `train.py serve`, optionally side by side with another commit.

    python bench/bench_serve.py [--model_dir=model_save/demo/best] [--requests=128] [--clients=16]
    python bench/bench_serve.py --compare=HEAD~1          # the same figures for another commit's server

Starts `python train.py serve` in a child process on 127.0.0.1 (the demo model; run the Quickstart
first), and measures, for 1 and `clients` concurrent clients:
1. the demo's held-out test prompts, non-streaming: answers per second, latency p50/p95/p99
   (request sent to the whole answer received), and the share of answers equal to
   `ChatBot.answer` (greedy); streaming: time to the first content chunk;
2. mixed answer lengths: a model with the demo model's shape and tokenizer that never says
   [EOS] (made once in a temporary folder), each request asking for 5 to 200 tokens (seeded
   draws), non-streaming: answers per second and latency p50/p95/p99;
3. a short request (5 tokens) while `clients - 1` clients keep 200-token answers decoding: its time
   to the first token and its whole latency, p50/p95.
With `--compare=REV`, REV is checked out in a temporary git worktree and its server measured the
same way, right after this checkout's, on the same machine. The clients are threads of this
process with httpx, so they share the cores with the server.
"""
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import fire

from common import ROOT


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def endless_model(model_dir: str, out: str) -> str:
    """The demo model's shape and tokenizer, random weights, [EOS] never likely: answers run to max_tokens."""
    import torch
    from transformers import T5Config

    from model.chat_model import TextToTextModel
    from utils.tokenizer import load_tokenizer
    torch.manual_seed(0)
    config = T5Config.from_pretrained(model_dir)
    config.tie_word_embeddings = False
    model = TextToTextModel(config)
    with torch.no_grad():
        model.lm_head.weight[:3] = 0
        model.lm_head.weight[4] = -model.lm_head.weight[3]
    model.save_pretrained(out)
    load_tokenizer(model_dir).save_pretrained(out)
    return out


class Served:
    """A `train.py serve` child process of the checkout at `root`."""

    def __init__(self, root: str, model_dir: str, clients: int):
        import httpx
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "train.py", "serve", f"--model_dir={model_dir}",
                                         f"--port={self.port}", f"--max_batch_size={clients}", "--max_tokens=400"],
                                        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the server did not start:\n{self.process.stderr.read()}")
            time.sleep(0.2)

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=60)


def measure(root: str, model_dir: str, endless: str, prompts: list[str], expected: dict, clients: int) -> None:
    import httpx
    local = threading.local()

    def client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=300)
        return local.client

    def ask(url, prompt, **fields):
        start = time.perf_counter()
        response = client().post(f"{url}/v1/chat/completions",
                                 json={"messages": [{"role": "user", "content": prompt}], **fields})
        return time.perf_counter() - start, response.json()["choices"][0]["message"]["content"]

    def stream(url, prompt, **fields):
        """(time to the first content, whole latency)"""
        start, first = time.perf_counter(), None
        body = {"messages": [{"role": "user", "content": prompt}], "stream": True, **fields}
        with client().stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                compact = line.replace(" ", "")
                if first is None and '"content":"' in compact and '"content":""' not in compact:
                    first = time.perf_counter() - start
        whole = time.perf_counter() - start
        return first if first is not None else whole, whole

    def table(name, latencies, seconds, extra=""):
        print(f"  {name}: {len(latencies) / seconds:6.1f} answers/s, latency p50 {1000 * percentile(latencies, .5):6.0f}"
              f" ms, p95 {1000 * percentile(latencies, .95):6.0f} ms, p99 {1000 * percentile(latencies, .99):6.0f} ms"
              + extra, flush=True)

    server = Served(root, model_dir, clients)
    try:
        url = server.url
        for prompt in prompts[:8]:
            ask(url, prompt)
        for n in (1, clients):
            start = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                results = list(pool.map(lambda p: ask(url, p), prompts))
            same = sum(text == expected[p] for p, (_, text) in zip(prompts, results))
            table(f"demo prompts, {n:>2} client(s)", [r[0] for r in results], time.perf_counter() - start,
                  f", {same}/{len(prompts)} equal to ChatBot.answer")
            with ThreadPoolExecutor(n) as pool:
                firsts = [f for f, _ in pool.map(lambda p: stream(url, p), prompts[:64])]
            print(f"  demo prompts, {n:>2} client(s), streaming: time to first token p50 "
                  f"{1000 * percentile(firsts, .5):6.0f} ms, p95 {1000 * percentile(firsts, .95):6.0f} ms", flush=True)
    finally:
        server.close()
    server = Served(root, endless, clients)
    try:
        url = server.url
        rng = random.Random(0)
        lengths = [rng.randint(5, 200) for _ in range(len(prompts))]
        ask(url, prompts[0], max_tokens=20)
        for n in (1, clients):
            start = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                results = list(pool.map(lambda pl: ask(url, pl[0], max_tokens=pl[1]), zip(prompts, lengths)))
            table(f"mixed lengths (5-200 tokens), {n:>2} client(s)", [r[0] for r in results],
                  time.perf_counter() - start)
        stop = threading.Event()

        def keep_long(i):
            while not stop.is_set():
                ask(url, prompts[i % len(prompts)], max_tokens=200)
        with ThreadPoolExecutor(clients - 1) as pool:
            for i in range(clients - 1):
                pool.submit(keep_long, i)
            time.sleep(2)
            shorts = [stream(url, p, max_tokens=5) for p in prompts[:30]]
            stop.set()
        firsts, wholes = [s[0] for s in shorts], [s[1] for s in shorts]
        print(f"  a 5-token request while {clients - 1} 200-token answers decode: time to first token p50 "
              f"{1000 * percentile(firsts, .5):6.0f} ms, p95 {1000 * percentile(firsts, .95):6.0f} ms; whole answer "
              f"p50 {1000 * percentile(wholes, .5):6.0f} ms, p95 {1000 * percentile(wholes, .95):6.0f} ms", flush=True)
    finally:
        server.close()


def main(model_dir: str = os.path.join(ROOT, "model_save", "demo", "best"), requests: int = 128, clients: int = 16,
         compare: str = ""):
    import pyarrow.parquet as pq
    if not os.path.isdir(model_dir):
        sys.exit(f"no model in {model_dir}: run the Quickstart's first command first")
    model_dir = os.path.abspath(model_dir)
    prompts = pq.read_table(os.path.join(ROOT, "data", "demo_test.parquet"), columns=["prompt"]).column(0).to_pylist()
    prompts = (prompts * (requests // len(prompts) + 1))[:requests]
    sys.path.insert(0, ROOT)
    from model.infer import ChatBot
    expected = dict(zip(prompts, ChatBot(model_dir, "cpu").answer(prompts)))
    work = tempfile.mkdtemp(prefix="bench_serve_")
    try:
        endless = endless_model(model_dir, os.path.join(work, "endless"))
        roots = [("this checkout", ROOT)]
        if compare:
            other = os.path.join(work, "compare")
            subprocess.run(["git", "worktree", "add", "--detach", other, compare], cwd=ROOT, check=True,
                           capture_output=True)
            roots.append((f"{compare} ({subprocess.check_output(['git', 'rev-parse', '--short', compare], cwd=ROOT, text=True).strip()})",
                          other))
        print(f"model {model_dir}, {requests} requests, max_batch_size {clients}, {os.cpu_count()} cores")
        for name, root in roots:
            print(f"{name}:", flush=True)
            measure(root, model_dir, endless, prompts, expected, clients)
    finally:
        if compare:
            subprocess.run(["git", "worktree", "remove", "--force", os.path.join(work, "compare")], cwd=ROOT,
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    fire.Fire(main)
