"""The HTTP server: OpenAI's client, the original's /api/chat, keys, limits, batching,
disconnects and the web page in a real browser. Servers run in this process on 127.0.0.1."""
import contextlib
import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import cli, saved_before_templates

PROMPTS = ["把3771写成中文数字。", "把一千零五十写成阿拉伯数字。", "把208写成中文数字。", "把九千九百写成阿拉伯数字。"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Base(str):
    """A running server's base URL, with the `server` (serve.app.Server) and `http` (uvicorn) behind it."""


@contextlib.contextmanager
def live_server(model_dir, api_key=None, max_batch_size=16, max_queue=64, log=None, network=None, **limits):
    """`train.py serve` (its uvicorn server, guard and limits) in a thread of this process; yields
    its base URL."""
    from model.infer import ChatBot
    from serve.app import Limits, Network, Server, uvicorn_server
    bot = ChatBot(model_dir, "cpu")
    limits = Limits(**{"max_prompt_tokens": bot.max_prompt_tokens, "default_max_tokens": bot.max_new_tokens, **limits})
    server = Server(bot, "test/model", api_key, limits, max_batch_size, max_queue, log=log or (lambda _: None))
    port = free_port()
    http = uvicorn_server(server, Network(port=port, **(network or {})), log_level="error")
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not http.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    base = Base(f"http://127.0.0.1:{port}")
    base.server, base.http, base.thread = server, http, thread
    try:
        yield base
    finally:
        http.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def bot(base_model):
    from model.infer import ChatBot
    return ChatBot(base_model, "cpu")


@pytest.fixture(scope="module")
def url(base_model):
    with live_server(base_model) as base:
        yield base


@pytest.fixture(scope="module")
def endless_model(tokenizer_dir, tmp_path_factory):
    """A model that never says [EOS]: its generations run until max_tokens unless stopped."""
    import torch

    from config import T5ModelConfig
    from model.chat_model import TextToTextModel, get_t5_config
    from utils.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    config = get_t5_config(T5ModelConfig.preset("tiny"), len(tokenizer))
    config.tie_word_embeddings = False
    model = TextToTextModel(config)
    special = max(tokenizer.all_special_ids)
    with torch.no_grad():
        # Special tokens score 0 for every hidden state, and of two opposite rows one scores above 0.
        model.lm_head.weight[:special + 1] = 0
        model.lm_head.weight[special + 2] = -model.lm_head.weight[special + 1]
    out = str(tmp_path_factory.mktemp("endless") / "model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_saved_config_names_a_class_other_tools_know(base_model, tmp_path):
    from model.infer import ChatBot
    config = json.load(open(os.path.join(base_model, "config.json")))
    assert config["architectures"] == ["T5ForConditionalGeneration"]
    # A directory written before names TextToTextModel: it still loads and answers the same.
    old = tmp_path / "old"
    shutil.copytree(base_model, old)
    json.dump({**config, "architectures": ["TextToTextModel"]}, open(old / "config.json", "w"))
    assert ChatBot(str(old), "cpu").answer(PROMPTS) == ChatBot(base_model, "cpu").answer(PROMPTS)


def test_openai_client_gets_the_chatbot_answer_with_usage(url, bot):
    from openai import OpenAI

    from model.chat_model import EOS_ID
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["test/model"]
    for prompt in PROMPTS:
        expected = bot.answer(prompt)[0]
        ids = bot.tokenizer(prompt)["input_ids"]
        generated = bot.model.my_generate(**bot.encode([prompt]), max_seq_len=bot.max_new_tokens)[0]
        completion_tokens = int((generated != 0).sum())  # what generate produced, [EOS] included, no pad
        reason = "stop" if EOS_ID in generated.tolist() else "length"  # a model trained 6 steps may not stop
        reply = client.chat.completions.create(model="test/model", temperature=0,
                                               messages=[{"role": "user", "content": prompt}])
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].finish_reason == reason
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), completion_tokens)
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

        chunks = list(client.chat.completions.create(model="test/model", temperature=0, stream=True,
                                                     stream_options={"include_usage": True},
                                                     messages=[{"role": "user", "content": prompt}]))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
        assert chunks[-1].usage.model_dump() == reply.usage.model_dump()


def test_sse_wire_format_ends_with_done(url):
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": PROMPTS[0]}], "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


@pytest.fixture(scope="module")
def old_model(base_model, tmp_path_factory):
    """The base model as a directory saved before chat templates existed (its tokenizer has none)."""
    return saved_before_templates(base_model, tmp_path_factory.mktemp("old") / "model")


def test_a_model_without_a_template_answers_the_last_user_message_and_says_so(old_model, bot):
    messages = [{"role": "system", "content": "你好"}, {"role": "user", "content": PROMPTS[0]},
                {"role": "assistant", "content": "三"}, {"role": "user", "content": PROMPTS[1]}]
    with live_server(old_model) as url:
        response = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages}, timeout=60)
        body = response.json()
        assert body["choices"][0]["message"]["content"] == bot.answer(PROMPTS[1])[0]
        assert response.headers["x-chatlm-ignored-messages"] == "3"
        assert "single-turn" in body["warnings"][0]
        alone = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages[-1:]}, timeout=60)
        assert "warnings" not in alone.json() and alone.headers["x-chatlm-ignored-messages"] == "0"
        assert httpx.get(f"{url}/health", timeout=60).json()["chat_template"] is False


def test_a_model_with_a_template_reads_every_message(base_model):
    from model.conversations import fit
    from model.infer import ChatBot
    bot = ChatBot(base_model, "cpu")
    bot.max_prompt_tokens = 96  # the server's below: the test tokenizer spells the role markers out
    messages = [{"role": "system", "content": "你好"}, {"role": "user", "content": PROMPTS[0]},
                {"role": "assistant", "content": "三"}, {"role": "user", "content": PROMPTS[1]}]
    assert fit(bot.tokenizer, messages, 96)[1] == 0
    with live_server(base_model, max_prompt_tokens=96) as url:
        response = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages}, timeout=60)
        assert response.json()["choices"][0]["message"]["content"] == bot.answer([messages])[0]
        assert response.headers["x-chatlm-dropped-messages"] == "0" and "warnings" not in response.json()
        # Longer than the model reads: the oldest turns go first, and the answer says how many.
        long = [m for n in range(12) for m in ({"role": "user", "content": f"把{n}写成中文数字。"},
                                               {"role": "assistant", "content": "零"})] + messages[-1:]
        cut = httpx.post(f"{url}/v1/chat/completions", json={"messages": long}, timeout=60)
        assert cut.headers["x-chatlm-dropped-messages"] == str(fit(bot.tokenizer, long, 96)[1])
        assert int(cut.headers["x-chatlm-dropped-messages"]) >= 2 and "left out" in cut.json()["warnings"][0]
        assert cut.json()["choices"][0]["message"]["content"] == bot.answer([long])[0]


def test_stop_strings_max_tokens_and_seeded_sampling(url, bot):
    def ask(**fields):
        body = {"messages": [{"role": "user", "content": PROMPTS[0]}], **fields}
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    full = bot.answer(PROMPTS[0])[0]
    assert len(full) >= 3
    cut = ask(stop=[full[2]])
    assert cut["choices"][0]["message"]["content"] == full[:full.index(full[2])]
    assert cut["choices"][0]["finish_reason"] == "stop"
    short = ask(max_tokens=2)
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 2
    sampled = [ask(temperature=1.5, seed=s)["choices"][0]["message"]["content"] for s in (1, 1, 2, 3, 4)]
    assert sampled[0] == sampled[1]  # the same seed, the same text
    assert len(set(sampled)) > 1  # sampling samples


def test_seeded_sampling_is_the_same_in_any_batch(bot):
    """A seeded request samples the same text alone and in a batch with others."""
    from serve.engine import Engine, Job, Settings

    def run(prompts, seeds):
        engine, done = Engine(bot.model, bot.tokenizer, max_batch_size=16), {}
        jobs = [Job(bot.tokenizer(p)["input_ids"], Settings(max_tokens=16, temperature=1.2, top_p=0.9, seed=seed),
                    lambda kind, payload, i=i: done.__setitem__(i, payload) if kind == "done" else None)
                for i, (p, seed) in enumerate(zip(prompts, seeds))]
        engine.generate(jobs)
        return [done[i].text for i in range(len(prompts))]
    seeds = [11, 12, 13, 14]
    together = run(PROMPTS, seeds)
    assert [run([p], [seed])[0] for p, seed in zip(PROMPTS, seeds)] == together
    assert run(PROMPTS, [s + 10 for s in seeds]) != together


def test_original_api_chat(base_model, bot):
    with live_server(base_model, api_key="secret") as base:
        auth = {"Authorization": "Bearer secret"}
        response = httpx.post(f"{base}/api/chat", json={"input_txt": PROMPTS[0]}, headers=auth, timeout=60)
        assert response.status_code == 200 and response.json() == {"response": bot.answer(PROMPTS[0])[0]}
        empty = httpx.post(f"{base}/api/chat", json={"input_txt": ""}, headers=auth, timeout=60)
        assert empty.status_code == 406 and "input_txt" in empty.json()["detail"]
        assert httpx.post(f"{base}/api/chat", json={"input_txt": PROMPTS[0]}, timeout=60).status_code == 401


def test_keys(base_model):
    with live_server(base_model, api_key="secret") as base:
        body = {"messages": [{"role": "user", "content": PROMPTS[0]}]}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
            response = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=60)
            assert response.status_code == 401, headers
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{base}/v1/models", timeout=60).status_code == 401
        health = httpx.get(f"{base}/health", timeout=60)  # no key needed
        assert health.status_code == 200 and health.json()["key_required"] is True
        ok = httpx.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": "Bearer secret"},
                        timeout=60)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def test_limits_and_malformed_requests_are_json_errors_and_the_server_goes_on(base_model, bot):
    expected = bot.answer(PROMPTS[0])[0]
    with live_server(base_model, max_body_bytes=2000, max_prompt_tokens=12, max_tokens=50) as base:
        endpoint = f"{base}/v1/chat/completions"
        user = [{"role": "user", "content": PROMPTS[0]}]
        cases = [
            (413, "request_too_large", None, dict(json={"messages": [{"role": "user", "content": "把" * 3000}]})),
            (400, "context_length_exceeded", "messages", dict(json={"messages": [{"role": "user", "content": "把3771写成中文数字。" * 3}]})),
            (400, None, "max_tokens", dict(json={"messages": user, "max_tokens": 51})),
            (400, None, "body", dict(content=b'{"messages": [', headers={"content-type": "application/json"})),
            (400, None, "body", dict(json=[1, 2])),
            (400, None, "temperature", dict(json={"messages": user, "temperature": "hot"})),
            (400, None, "temperature", dict(json={"messages": user, "temperature": 5})),
            (400, None, "messages.0.content", dict(json={"messages": [{"role": "user", "content": 7}]})),
            (400, None, "messages", dict(json={"model": "test/model"})),
            (400, None, "messages", dict(json={"messages": [{"role": "assistant", "content": "hi"}]})),
            (400, None, "best_of", dict(json={"messages": user, "best_of": 2})),
            (400, None, "stream", dict(json={"messages": user, "stream": "yes"})),
            (404, "model_not_found", "model", dict(json={"messages": user, "model": "gpt-4"})),
        ]
        for status, code, param, request in cases:
            response = httpx.post(endpoint, timeout=60, **request)
            assert response.status_code == status, (request, response.text)
            error = response.json()["error"]
            assert error["message"] and "Traceback" not in response.text
            assert (code is None or error["code"] == code) and (param is None or error["param"] == param), error
            ok = httpx.post(endpoint, json={"messages": user}, timeout=60)  # and the next one is served
            assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == expected
        assert httpx.get(f"{base}/nowhere", timeout=60).json()["error"]["message"].startswith("no such endpoint")


def test_busy_server_answers_429_and_a_disconnecting_stream_frees_its_slot(endless_model):
    with live_server(endless_model, max_batch_size=1, max_queue=0, max_tokens=100_000) as base:
        endpoint, user = f"{base}/v1/chat/completions", [{"role": "user", "content": PROMPTS[0]}]
        with httpx.stream("POST", endpoint, timeout=60,
                          json={"messages": user, "stream": True, "max_tokens": 100_000}) as stream:
            lines = stream.iter_lines()
            assert sum(1 for _, line in zip(range(6), lines) if line.startswith("data: {")) >= 3
            busy = httpx.post(endpoint, json={"messages": user, "max_tokens": 2}, timeout=60)
            assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
        # The client has gone: its generation stops and the slot is free, long before 100,000 tokens.
        deadline = time.monotonic() + 20
        while (health := httpx.get(f"{base}/health", timeout=60).json())["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health["running"] == 0 and health["cancelled"] == 1, health
        generated = health["tokens_generated"]
        assert generated < 20_000
        time.sleep(0.5)
        assert httpx.get(f"{base}/health", timeout=60).json()["tokens_generated"] == generated
        ok = httpx.post(endpoint, json={"messages": user, "max_tokens": 5}, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5


def test_a_request_over_its_time_is_504_and_stops(endless_model):
    with live_server(endless_model, max_tokens=10**6, timeout_s=0.5) as base:
        response = httpx.post(f"{base}/v1/chat/completions", timeout=60,
                              json={"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 10**6})
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/health", timeout=60).json()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{base}/health", timeout=60).json()["cancelled"] == 1


def test_concurrent_clients_are_batched_and_all_answered_right(url, bot):
    from make_demo_data import num2zh, zh2num
    prompts = [(num2zh if i % 2 else zh2num)(1000 + 37 * i)[0] for i in range(64)]
    expected = bot.answer(prompts)
    before = httpx.get(f"{url}/health", timeout=60).json()

    def ask(prompt):
        response = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                              json={"messages": [{"role": "user", "content": prompt}]})
        return response.json()["choices"][0]["message"]["content"]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, prompts, timeout=120))
    after = httpx.get(f"{url}/health", timeout=60).json()
    assert answers == expected
    assert after["answered"] - before["answered"] == 64
    assert after["batches"] - before["batches"] < 64  # requests were generated together
    assert after["largest_batch"] > 1


def test_serve_refuses_a_public_address_without_a_key(capsys, base_model, monkeypatch):
    monkeypatch.delenv("CHATLM_API_KEY", raising=False)
    result = cli(capsys, "serve", f"--model_dir={base_model}", "--host=0.0.0.0")
    assert result.returncode == 2
    assert result.stderr.startswith("error: --host=0.0.0.0 can be reached") and result.stderr.count("\n") == 1
    assert "--api_key" in result.stderr and "--allow_remote_without_key" in result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli(capsys, "serve", f"--model_dir={base_model}", f"--port={port}")
        assert result.returncode == 2 and "--port" in result.stderr
    assert cli(capsys, "serve", "--model_dir=/no/such/dir", f"--port={free_port()}").returncode == 2
    assert cli(capsys, "serve", f"--model_dir={base_model}", "--port=70000").returncode == 2


def find_browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return chromium, driver


# Skipped only outside CI: .ci/run installs the browser, so there a missing one is a failure.
@pytest.mark.skipif(None in find_browser() and not os.environ.get("CI"), reason="needs chromium and chromedriver "
                    "(Debian: apt-get install chromium chromium-driver; .ci/run installs them)")
def test_web_page_streams_an_answer_in_a_real_browser(url, bot, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    chromium, driver_path = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(url + "/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text == "test/model")
        driver.find_element(By.ID, "prompt").send_keys(PROMPTS[0])
        driver.find_element(By.ID, "send").click()
        answer = WebDriverWait(driver, 60).until(
            lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, ".assistant[data-state=done]")), None))
        assert answer.text == bot.answer(PROMPTS[0])[0]
        assert answer.get_attribute("data-finish") in ("stop", "length")
        driver.save_screenshot(str(tmp_path / "chat.png"))
        assert os.path.getsize(tmp_path / "chat.png") > 1000
    finally:
        driver.quit()


# ---- serving v2: safe from other pages, bounded, continuously batched, completions, metrics ----

def test_other_web_pages_cannot_use_the_server(base_model, url):
    body = json.dumps({"messages": [{"role": "user", "content": PROMPTS[0]}]})
    # A browser sends a cross-site text/plain POST without asking first: refused.
    plain = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"Content-Type": "text/plain"}, timeout=60)
    assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
    # DNS rebinding: the page's own name in the Host header.
    rebound = httpx.get(f"{url}/v1/models", headers={"Host": "evil.example"}, timeout=60)
    assert rebound.status_code == 421 and "evil.example" in rebound.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/models", headers={"Host": "localhost:1"}, timeout=60).status_code == 200
    # A cross-origin request, and its preflight, from an origin not allowed.
    evil = {"Origin": "http://evil.example", "Content-Type": "application/json"}
    assert httpx.post(f"{url}/v1/chat/completions", content=body, headers=evil, timeout=60).status_code == 403
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    refused = httpx.options(f"{url}/v1/chat/completions", headers=preflight, timeout=60)
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
    # The server's own page is same-origin.
    own = {"Origin": url, "Content-Type": "application/json"}
    assert httpx.post(f"{url}/v1/chat/completions", content=body, headers=own, timeout=60).status_code == 200
    network = {"allowed_origins": ("http://app.example",), "allowed_hosts": ("chat.example",)}
    with live_server(base_model, network=network) as base:
        allowed = {"Origin": "http://app.example", "Content-Type": "application/json", "Host": "chat.example"}
        response = httpx.post(f"{base}/v1/chat/completions", content=body, headers=allowed, timeout=60)
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "http://app.example"
        answer = httpx.options(f"{base}/v1/chat/completions", headers={**preflight, "Origin": "http://app.example"},
                               timeout=60)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "http://app.example"
        assert "POST" in answer.headers["access-control-allow-methods"]
        assert httpx.get(f"{base}/health", headers={"Host": "other.example"}, timeout=60).status_code == 421


def test_stop_strings_are_bounded_and_cost_the_same_per_token(endless_model):
    with live_server(endless_model, max_tokens=10_000) as base:
        endpoint = f"{base}/v1/chat/completions"
        user = [{"role": "user", "content": PROMPTS[0]}]
        huge = httpx.post(endpoint, json={"messages": user, "stop": ["好" * 16384]}, timeout=60)
        assert huge.status_code == 400 and huge.json()["error"]["param"] == "stop" and "64" in huge.text
        sample = httpx.post(endpoint, json={"messages": user, "max_tokens": 40}, timeout=60).json()
        text = sample["choices"][0]["message"]["content"]
        # Four stops of the most characters allowed, each the answer's own text up to its last
        # character then one it never writes: every token extends a partial match, none completes.
        stops = [(text * 64)[k:k + 63] + "☃" for k in range(4)]

        def seconds(**fields):
            start = time.perf_counter()
            with httpx.stream("POST", endpoint, timeout=60,
                              json={"messages": user, "stream": True, "max_tokens": 200, **fields}) as response:
                chunks = [line for line in response.iter_lines() if line.startswith("data: {")]
            return time.perf_counter() - start, chunks
        seconds()  # warm up
        plain = sorted(seconds()[0] for _ in range(3))[1]
        stopped = [seconds(stop=stops) for _ in range(3)]
        with_stops = sorted(s for s, _ in stopped)[1]
        assert stopped[0][1][-1].count('"finish_reason":"length"') or '"length"' in stopped[0][1][-1]
        assert with_stops < 2 * plain, (with_stops, plain)


def test_a_client_sending_headers_slowly_is_cut_off_and_others_are_served(url, base_model):
    with live_server(base_model, network={"header_timeout_s": 2.0}, body_timeout_s=1.0) as base:
        port = int(base.rsplit(":", 1)[1])
        slow = socket.create_connection(("127.0.0.1", port))
        started = time.monotonic()
        request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
        closed_after = None
        slow.settimeout(0.05)
        for byte in request:
            try:
                slow.sendall(bytes([byte]))
                if slow.recv(1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                pass
            except OSError:
                closed_after = time.monotonic() - started
                break
            if 0.5 < time.monotonic() - started < 0.7:  # meanwhile another client is served at once
                assert httpx.get(f"{base}/health", timeout=5).status_code == 200
            time.sleep(0.25)
        slow.close()
        assert closed_after is not None and 1.9 < closed_after < 4, closed_after
        # A body that stops half way is 408 at its deadline.
        body = socket.create_connection(("127.0.0.1", port))
        body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"messages\":")
        body.settimeout(10)
        reply = b""
        while b"request_timeout" not in reply and (chunk := body.recv(4096)):  # headers and body may come apart
            reply += chunk
        body.close()
        assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply


def test_a_short_request_joins_a_long_one_and_leaves_first(endless_model):
    from model.infer import ChatBot
    bot = ChatBot(endless_model, "cpu")
    long_answer = bot.answer(PROMPTS[0], max_new_tokens=200)[0]
    short_answer = bot.answer(PROMPTS[1], max_new_tokens=5)[0]
    with live_server(endless_model, max_tokens=1000) as base:
        endpoint = f"{base}/v1/chat/completions"
        with httpx.stream("POST", endpoint, timeout=60, json={"messages": [{"role": "user", "content": PROMPTS[0]}],
                                                              "stream": True, "max_tokens": 200}) as stream:
            pieces, lines = [], stream.iter_lines()
            for line in lines:
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    pieces.append(json.loads(line[6:])["choices"][0]["delta"]["content"])
                    break
            short = httpx.post(endpoint, timeout=60, json={"messages": [{"role": "user", "content": PROMPTS[1]}],
                                                           "max_tokens": 5})
            # The short answer is done while the long one is still being generated.
            meanwhile = httpx.get(f"{base}/health", timeout=60).json()
            assert meanwhile["running"] == 1 and meanwhile["answered"] == 1 and meanwhile["tokens_generated"] < 200
            for line in lines:
                if line.startswith("data: {"):
                    pieces.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
        assert short.json()["choices"][0]["message"]["content"] == short_answer
        assert "".join(pieces) == long_answer
        stats = httpx.get(f"{base}/health", timeout=60).json()
        assert stats["largest_batch"] == 2 and stats["batches"] == 2  # two admissions, one batch of both rows


def test_completions_and_logprobs_through_the_openai_client(url, bot):
    import torch
    from openai import OpenAI
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    inputs = bot.encode([PROMPTS[2]])
    out = bot.model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    ids = out.sequences[0, 1:].tolist()
    vocab = len(bot.tokenizer)
    expected = [float(torch.log_softmax(step[0, :vocab].float(), -1)[t]) for step, t in zip(out.logits, ids)]
    text = bot.tokenizer.decode(ids, skip_special_tokens=True)
    plain = client.completions.create(model="test/model", prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=2)
    choice = plain.choices[0]
    assert choice.text == text and plain.usage.completion_tokens == len(ids)
    n = len(choice.logprobs.token_logprobs)
    assert choice.logprobs.token_logprobs == pytest.approx(expected[:n], abs=1e-4) and n >= len(ids) - 1
    assert all(len(top) == 2 and max(top.values()) >= lp - 1e-6
               for top, lp in zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs))
    chunks = list(client.completions.create(model="test/model", prompt=PROMPTS[2], max_tokens=6, temperature=0,
                                            logprobs=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    streamed = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(expected[:len(streamed)], abs=1e-4) and len(streamed) == n
    several = client.completions.create(model="test/model", prompt=PROMPTS[:3], max_tokens=6, temperature=0)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert [c.text for c in several.choices] == bot.answer(PROMPTS[:3], max_new_tokens=6)
    chat = client.chat.completions.create(model="test/model", messages=[{"role": "user", "content": PROMPTS[2]}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(expected[:len(content)], abs=1e-4)
    assert all(len(c.top_logprobs) == 3 for c in content)


def test_metrics_count_requests_and_each_request_has_an_id(base_model):
    from prometheus_client.parser import text_string_to_metric_families
    lines = []
    with live_server(base_model, log=lines.append) as base:
        def samples():
            text = httpx.get(f"{base}/metrics", timeout=60).text
            return {(s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(text) for s in family.samples}
        before = samples()
        body = {"messages": [{"role": "user", "content": PROMPTS[0]}]}
        answers = [httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60) for _ in range(3)]
        done = httpx.post(f"{base}/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 4}, timeout=60)
        bad = httpx.post(f"{base}/v1/chat/completions", json={"messages": []}, timeout=60)
        mine = httpx.get(f"{base}/health", headers={"X-Request-Id": "trace-42"}, timeout=60)
        after = samples()

        def moved(name, **labels):
            key = (name, tuple(sorted(labels.items())))
            return after.get(key, 0) - before.get(key, 0)
        assert moved("chatlm_requests_total", path="/v1/chat/completions", status="200") == 3
        assert moved("chatlm_requests_total", path="/v1/chat/completions", status="400") == 1
        assert moved("chatlm_requests_total", path="/v1/completions", status="200") == 1
        tokens = sum(a.json()["usage"]["completion_tokens"] for a in answers) + done.json()["usage"]["completion_tokens"]
        assert moved("chatlm_generation_tokens_total") == tokens
        assert moved("chatlm_time_to_first_token_seconds_count") == 4
        assert moved("chatlm_time_per_output_token_seconds_count") == tokens
        assert after[("chatlm_queue_depth", ())] == 0 and moved("chatlm_batch_size_count") >= 1
        for response in (*answers, bad):
            request_id = response.headers["x-request-id"]
            logged = [line for line in lines if line.startswith(request_id + " ")]
            assert len(logged) == 1 and f" {response.status_code} " in logged[0], lines[-5:]
        assert mine.headers["x-request-id"] == "trace-42" and any(line.startswith("trace-42 ") for line in lines)
        card = httpx.get(f"{base}/v1/models/test/model", timeout=60).json()
        assert card["max_model_len"] > 0 and card["max_tokens"] == 1024
        assert httpx.get(f"{base}/v1/models/other", timeout=60).status_code == 404


def test_a_cancelled_request_frees_its_place_at_once_and_a_waiting_stream_stays_alive(endless_model):
    with live_server(endless_model, max_batch_size=1, max_queue=1, max_tokens=100_000, keepalive_s=0.2) as base:
        endpoint, user = f"{base}/v1/chat/completions", [{"role": "user", "content": PROMPTS[0]}]
        with httpx.stream("POST", endpoint, timeout=60,
                          json={"messages": user, "stream": True, "max_tokens": 100_000}) as running:
            running_lines = running.iter_lines()  # kept: a dropped iterator closes the stream
            next(line for line in running_lines if line.startswith("data: {"))
            with pytest.raises(httpx.TimeoutException):  # waits behind the running row, then gives up
                httpx.post(endpoint, json={"messages": user, "max_tokens": 3}, timeout=0.5)
            time.sleep(0.6)  # the server notices the client has gone within 0.25 s
            assert httpx.get(f"{base}/health", timeout=60).json()["waiting"] == 0
            with httpx.stream("POST", endpoint, timeout=60,
                              json={"messages": user, "stream": True, "max_tokens": 3}) as waiting:
                lines = waiting.iter_lines()
                assert next(lines).startswith("data: {")  # admitted (not 429): the role chunk
                assert next(line for line in lines if line) == ": keep-alive"  # while it waits its turn
                running.close()  # the running stream goes: the waiting one runs and ends
                assert [line for line in lines if line][-1] == "data: [DONE]"


def test_health_is_503_with_a_dead_worker_and_errors_are_not_retried(endless_model):
    with live_server(endless_model, max_tokens=100_000) as base:
        endpoint, user = f"{base}/v1/chat/completions", [{"role": "user", "content": PROMPTS[0]}]
        engine = base.server.engine

        def broken(_new):
            raise RuntimeError("planted failure")
        engine.step = broken
        failed = httpx.post(endpoint, json={"messages": user, "max_tokens": 5}, timeout=60)
        assert failed.status_code == 500 and failed.headers["x-should-retry"] == "false"
        health = httpx.get(f"{base}/health", timeout=60)
        assert health.status_code == 503 and health.json()["status"] == "dead" and "planted" in health.json()["error"]
        assert httpx.post(endpoint, json={"messages": user}, timeout=60).status_code == 503
    with live_server(endless_model, max_tokens=10**6, timeout_s=0.5) as base:
        late = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={"messages": user, "max_tokens": 10**6})
        assert late.status_code == 504 and late.headers["x-should-retry"] == "false"


def test_values_openai_allows_are_accepted_and_vllm_sampling_settings_work(url, bot):
    endpoint, user = f"{url}/v1/chat/completions", [{"role": "user", "content": PROMPTS[0]}]
    expected = bot.answer(PROMPTS[0])[0]
    for fields in ({"stream": None}, {"n": None}, {"tools": []}, {"logit_bias": {}}, {"tool_choice": "none"},
                   {"response_format": {"type": "text"}}, {"stream": True, "stream_options": {"include_obfuscation": False}}):
        response = httpx.post(endpoint, json={"messages": user, **fields}, timeout=60)
        assert response.status_code == 200, (fields, response.text)
        if not fields.get("stream"):
            assert response.json()["choices"][0]["message"]["content"] == expected
    for fields, param in (({"tools": [{"type": "function"}]}, "tools"), ({"logit_bias": {"5": 1.0}}, "logit_bias"),
                          ({"response_format": {"type": "json_object"}}, "response_format.type")):
        response = httpx.post(endpoint, json={"messages": user, **fields}, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text

    def ask(**fields):
        body = httpx.post(endpoint, json={"messages": user, **fields}, timeout=60).json()
        return body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]
    assert ask(temperature=1.5, top_k=1, seed=3)[0] == expected  # top_k=1 is greedy at any temperature
    assert ask(ignore_eos=True, max_tokens=12)[1] == 12
    short, _ = ask(max_tokens=12)
    assert ask(min_tokens=12, max_tokens=12)[1] == 12
    repeated, _ = ask(max_tokens=12)
    varied, _ = ask(max_tokens=12, repetition_penalty=5.0)
    assert len(set(varied)) >= len(set(repeated))


def test_sigterm_drains_the_requests_in_flight_then_stops(endless_model):
    import signal
    with live_server(endless_model, max_tokens=100_000, network={"drain_timeout_s": 1.0}) as base:
        endpoint, user = f"{base}/v1/chat/completions", [{"role": "user", "content": PROMPTS[0]}]
        with httpx.stream("POST", endpoint, timeout=60,
                          json={"messages": user, "stream": True, "max_tokens": 100_000}) as endless:
            lines = endless.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            stopped_at = time.monotonic()
            base.http.handle_exit(signal.SIGTERM, None)
            status, body = base.server.health()
            assert status == 503 and body["status"] == "draining"
            with pytest.raises(httpx.HTTPError):
                for _ in lines:  # cut at the drain's end
                    pass
        base.thread.join(timeout=20)
        assert not base.thread.is_alive() and time.monotonic() - stopped_at < 5
