"""Serving throughput and latency of `train.py serve` with the demo model.

    python bench/bench_serve.py [--model_dir=model_save/demo/best] [--requests=128] [--clients=16]

Starts `python train.py serve` in a child process on 127.0.0.1 (the demo model; run the
Quickstart first), then, with the demo's held-out test prompts:
1. non-streaming, one client at a time, then `clients` concurrent clients: answers per second
   and p50/p95 latency (request sent to the whole answer received), and the share of answers
   equal to `ChatBot.answer` (greedy);
2. streaming: time to the first content chunk, p50/p95, for one client and for `clients`.
The clients are threads of this process with httpx, so they share the 2 cores with the server.
"""
import os
import statistics
import subprocess
import sys
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


def main(model_dir: str = os.path.join(ROOT, "model_save", "demo", "best"), requests: int = 128, clients: int = 16,
         batch_wait_ms: float = 10):
    import httpx
    import pyarrow.parquet as pq
    if not os.path.isdir(model_dir):
        sys.exit(f"no model in {model_dir}: run the Quickstart's first command first")
    prompts = pq.read_table(os.path.join(ROOT, "data", "demo_test.parquet"), columns=["prompt"]).column(0).to_pylist()
    prompts = (prompts * (requests // len(prompts) + 1))[:requests]
    sys.path.insert(0, ROOT)
    from model.infer import ChatBot
    expected = dict(zip(prompts, ChatBot(model_dir, "cpu").answer(prompts)))

    port = free_port()
    server = subprocess.Popen([sys.executable, "train.py", "serve", f"--model_dir={model_dir}", f"--port={port}",
                               f"--batch_wait_ms={batch_wait_ms}", f"--max_batch_size={clients}"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the server did not start:\n{server.stdout.read()}")
            time.sleep(0.2)
        local = threading.local()

        def client() -> httpx.Client:
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=120)
            return local.client

        def ask(prompt: str) -> tuple[float, bool]:
            start = time.perf_counter()
            response = client().post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}]})
            answer = response.json()["choices"][0]["message"]["content"]
            return time.perf_counter() - start, answer == expected[prompt]

        def first_token(prompt: str) -> float:
            start = time.perf_counter()
            body = {"messages": [{"role": "user", "content": prompt}], "stream": True}
            with client().stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                seconds = None
                for line in response.iter_lines():
                    if seconds is None and '"content":"' in line.replace(" ", "") and '"content":""' not in line.replace(" ", ""):
                        seconds = time.perf_counter() - start
            return seconds if seconds is not None else time.perf_counter() - start

        for prompt in prompts[:8]:  # warm up
            ask(prompt)
        print(f"model {model_dir}, {requests} requests of the demo's held-out prompts, "
              f"batch_wait_ms {batch_wait_ms}, max_batch_size {clients}")
        rates = {}
        for n in (1, clients):
            before = httpx.get(f"{url}/health").json()
            start = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                results = list(pool.map(ask, prompts))
            seconds = time.perf_counter() - start
            after = httpx.get(f"{url}/health").json()
            latencies = [r[0] for r in results]
            rates[n] = requests / seconds
            batches = after["batches"] - before["batches"]
            print(f"non-streaming, {n:>2} client(s): {rates[n]:6.1f} answers/s, latency p50 "
                  f"{1000 * percentile(latencies, 0.5):6.1f} ms, p95 {1000 * percentile(latencies, 0.95):6.1f} ms, "
                  f"{sum(r[1] for r in results)}/{requests} equal to ChatBot.answer, "
                  f"{requests / max(batches, 1):.1f} requests per batch")
        print(f"speed-up with {clients} clients: {rates[clients] / rates[1]:.2f}x")
        for n in (1, clients):
            with ThreadPoolExecutor(n) as pool:
                firsts = list(pool.map(first_token, prompts[:64]))
            print(f"streaming, {n:>2} client(s): time to first token p50 {1000 * percentile(firsts, 0.5):6.1f} ms, "
                  f"p95 {1000 * percentile(firsts, 0.95):6.1f} ms")
        print(f"mean answer length: {statistics.mean(len(a) for a in expected.values()):.1f} characters")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    fire.Fire(main)
