"""The HTTP server: OpenAI's chat completions and completions (with server-sent events and
log-probabilities), the original's /api/chat, a web chat page, /v1/models, /health and /metrics,
with FastAPI and uvicorn.

    python train.py serve --model_dir=model_save/demo/best            # http://127.0.0.1:8000/

Safe to leave running: requests from other web pages are refused (Host, Origin and content type:
serve/guard.py), every request is bounded (body size and read time, header read time, prompt
tokens, max_tokens, stop strings, requests in flight, connections, total time), a request over a
bound or malformed gets a 4xx with an OpenAI-style JSON error body, and the server goes on
serving. Generation is continuously batched by `serve.engine.Engine`. SIGTERM stops new requests
(503) and lets those in flight finish for at most --drain_timeout_s.

A chat completion renders its messages through the model's chat template (system, user and
assistant turns, the oldest dropped when the history is longer than the model reads: the same
rule as in training). A model saved without a template (before conversations) answers the last
user message alone, and the response says how many were left out (`warnings`, and the header
`X-Chatlm-Ignored-Messages`).
"""
import asyncio
import dataclasses
import hmac
import json
import os
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from serve.engine import Engine, Job, QueueFull, Settings, Stopped
from serve.guard import Guard
from serve.metrics import ServeMetrics

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
# What the original's /api/chat says when the model's answer is empty.
EMPTY_ANSWER = "我是一个参数很少的AI模型🥺，知识库较少，无法直接回答您的问题，换个问题试试吧👋"
API_KEY_ENV = "CHATLM_API_KEY"


@dataclasses.dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * 1024
    max_prompt_tokens: int = 512
    max_tokens: int = 1024  # the most a request may ask for
    default_max_tokens: int = 256  # when a chat request does not say (completions: 16, as OpenAI)
    timeout_s: float = 300.0  # waiting plus generating, per request
    max_stops: int = 4  # stop strings per request (OpenAI's limit)
    max_stop_chars: int = 64  # characters per stop string
    body_timeout_s: float = 30.0  # reading a request's body
    keepalive_s: float = 15.0  # a waiting stream sends an SSE comment this often (proxies close silent ones)


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = dict(headers or {})
        if status in (500, 504):  # the official clients retry these twice unless told not to
            self.headers["x-should-retry"] = "false"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- request bodies ------------------------------------------------------------------------
class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # name, tool_call_id, ...
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # OpenAI's padding against length side channels: not needed here


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text"]


def _empty(value, name):
    if value:
        raise ValueError(f"{name} is not supported by this server; send it empty or leave it out")
    return value


class Sampling(BaseModel):
    """What chat completions and completions share: sampling, stops, and values OpenAI allows that
    this server has nothing to do for (accepted when they ask for nothing); vLLM's extra sampling
    settings (top_k, repetition_penalty, min_tokens, ignore_eos), which benchmark clients send."""
    model_config = ConfigDict(strict=True, extra="forbid")
    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] | None = None
    frequency_penalty: Literal[0] | None = None
    presence_penalty: Literal[0] | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = Field(default=None, ge=-1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None

    @field_validator("logit_bias")
    @classmethod
    def no_bias(cls, value):
        return _empty(value, "logit_bias")


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    tools: list[Any] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @field_validator("tools")
    @classmethod
    def no_tools(cls, value):
        return _empty(value, "tools")


class CompletionRequest(Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: Literal[False] | None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def some_prompt(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt is an empty list; send a string or a list of strings")
        return value


class OriginalChatRequest(BaseModel):
    """The original project's /api/chat body."""
    model_config = ConfigDict(strict=True, extra="ignore")
    input_txt: str


def parse(model: type[BaseModel], data: dict) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in input_path(data, first["loc"], first["type"])) or "body"
        if first["type"] == "extra_forbidden":
            message = f"unknown field '{field}': this server does not support it"
        else:
            text = first["msg"].removeprefix("Value error, ")
            message = f"field '{field}': {text[0].lower()}{text[1:]}"
        raise ApiError(400, message, param=field) from None


def input_path(data, loc: tuple, error_type: str) -> list:
    """The part of pydantic's error location that names the request's own fields (its union
    errors add the member type tried: messages.0.content.str)."""
    path, here = [], data
    for part in loc:
        if isinstance(here, dict) and part in here:
            here = here[part]
        elif isinstance(here, list) and isinstance(part, int) and part < len(here):
            here = here[part]
        else:
            if error_type == "missing":
                path.append(part)
            break
        path.append(part)
    return path


async def read_json(request: Request, limit: int, timeout_s: float) -> dict:
    """The request's JSON object, read at most `limit` bytes far and within `timeout_s`."""
    too_large = ApiError(413, f"the request body is over {limit:,} bytes, the most this server takes "
                              "(serve --max_body_bytes)", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large
    except TimeoutError:
        raise ApiError(408, f"the request body took longer than {timeout_s:g} s to arrive (serve --body_timeout_s)",
                       code="request_timeout") from None
    try:
        data = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON ({err})", param="body") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", param="body")
    return data


# ---- the application ---------------------------------------------------------------------
class Server:
    """The model, its engine and the settings every endpoint checks against."""

    def __init__(self, bot, model_name: str, api_key: str | None = None, limits: Limits = Limits(),
                 max_batch_size: int = 16, max_queue: int = 64, log=print):
        self.bot, self.model_name, self.api_key, self.limits, self.log = bot, model_name, api_key or None, limits, log
        self.metrics = ServeMetrics()
        self.engine = Engine(bot.model, bot.tokenizer, max_batch_size, max_queue, observer=self.metrics, log=log)
        self.created = int(time.time())
        self.draining = False

    # ---- checks shared by the endpoints -------------------------------------------------
    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "no API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "wrong API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"model '{name}' is not served here; this server serves "
                                f"'{self.model_name}' (GET /v1/models)", param="model", code="model_not_found")

    def encode(self, prompt: str, param: str) -> list[int]:
        # The tokenizer appends [EOS]: the same encoder input as in training.
        ids = self.bot.tokenizer(prompt, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        if len(ids) > self.limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {len(ids):,} tokens; this server takes at most "
                                f"{self.limits.max_prompt_tokens:,} (serve --max_prompt_tokens)",
                           param=param, code="context_length_exceeded")
        return ids

    def submit(self, job: Job) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down; retry on another one", kind="server_error",
                           code="draining", headers={"Retry-After": "1"})
        try:
            self.engine.submit(job)
        except QueueFull:
            raise ApiError(429, f"the server is busy ({self.engine.max_batch_size + self.engine.max_queue} requests "
                                "in flight, serve --max_batch_size plus --max_queue); retry shortly",
                           kind="rate_limit_error", code="server_busy", headers={"Retry-After": "1"}) from None
        except Stopped:
            raise ApiError(503, "generation is not running on this server; see its log", kind="server_error",
                           code="unavailable") from None
        self.metrics.prompt.inc(len(job.prompt_ids))

    def settings(self, req: Sampling, asked: int | None, default_max_tokens: int, logprobs: int | None) -> Settings:
        if asked is not None and asked > self.limits.max_tokens:
            raise ApiError(400, f"max_tokens is {asked:,}; this server generates at most {self.limits.max_tokens:,} "
                                "(serve --max_tokens)", param="max_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        limits = self.limits
        if len(stop) > limits.max_stops or any(not s or len(s) > limits.max_stop_chars for s in stop):
            raise ApiError(400, f"stop takes at most {limits.max_stops} non-empty strings of at most "
                                f"{limits.max_stop_chars} characters", param="stop")
        if req.min_tokens and req.min_tokens > (asked or default_max_tokens):
            raise ApiError(400, "min_tokens is more than max_tokens", param="min_tokens")
        return Settings(max_tokens=asked or default_max_tokens,
                        temperature=0.0 if req.temperature is None else req.temperature,
                        top_p=1.0 if req.top_p is None else req.top_p, top_k=max(0, req.top_k or 0),
                        stop=tuple(stop), seed=req.seed, repetition_penalty=req.repetition_penalty or 1.0,
                        min_tokens=req.min_tokens or 0, ignore_eos=bool(req.ignore_eos), logprobs=logprobs)

    def new_job(self, prompt_ids: list[int], settings: Settings, events: asyncio.Queue, index: int = 0,
                stream: bool = False) -> Job:
        """A job whose events arrive on `events` (of the running loop) as (index, kind, payload)."""
        loop = asyncio.get_running_loop()

        def on_event(kind, payload):
            try:
                loop.call_soon_threadsafe(events.put_nowait, (index, kind, payload))
            except RuntimeError:  # the loop is closed: the server is stopping
                pass
        return Job(prompt_ids, settings, on_event, stream=stream)

    async def wait_done(self, jobs: list[Job], events: asyncio.Queue, request: Request) -> list[Job]:
        """The finished jobs; cancels them when the client leaves or the time is up."""
        deadline = time.monotonic() + self.limits.timeout_s
        done = {}
        try:
            while len(done) < len(jobs):
                try:
                    index, kind, payload = await asyncio.wait_for(events.get(), timeout=0.25)
                except TimeoutError:
                    if await request.is_disconnected():
                        raise ApiError(499, "the client went away") from None
                    kind = None
                if kind == "done":
                    done[index] = payload
                if kind == "error":
                    raise ApiError(500, payload, kind="server_error")
                if time.monotonic() > deadline:
                    raise self.timed_out()
            return [done[i] for i in range(len(jobs))]
        finally:
            for job in jobs:
                job.cancel()  # a no-op once finished

    def timed_out(self) -> ApiError:
        return ApiError(504, f"the request took longer than {self.limits.timeout_s:g} s (serve --timeout_s)",
                        kind="timeout", code="timeout")

    def conversation_prompt(self, turns: list[dict]) -> tuple[str, int]:
        """The encoder input of a conversation through the template, and how many of its oldest
        turns were dropped to fit max_prompt_tokens (as training drops them)."""
        from model.conversations import fit
        return fit(self.bot.tokenizer, turns, self.limits.max_prompt_tokens)

    def usage(self, jobs: list[Job]) -> dict:
        prompt, completion = sum(len(j.prompt_ids) for j in jobs), sum(len(j.tokens) for j in jobs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def token_text(self, token: int) -> str:
        return self.bot.tokenizer.decode([token], skip_special_tokens=False)

    def chat_logprobs(self, entries: list) -> dict:
        """OpenAI's chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""
        def one(token, logprob):
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        return {"content": [{**one(t, lp), "top_logprobs": [one(i, v) for i, v in top]} for t, lp, top in entries],
                "refusal": None}

    def completion_logprobs(self, entries: list, offset: int = 0) -> dict:
        """The completions endpoint's `logprobs`: tokens, token_logprobs, top_logprobs, text_offset."""
        tokens = [self.token_text(t) for t, _, _ in entries]
        offsets, at = [], offset
        for text in tokens:
            offsets.append(at)
            at += len(text)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{self.token_text(i): v for i, v in top} for _, _, top in entries],
                "text_offset": offsets}

    def health(self) -> tuple[int, dict]:
        status = "draining" if self.draining else "ok" if self.engine.alive() else "dead"
        body = {"status": status, "model": self.model_name, "key_required": self.api_key is not None,
                "chat_template": self.bot.has_template, **dataclasses.asdict(self.engine.stats)}
        if self.engine.error:
            body["error"] = self.engine.error
        return (200 if status == "ok" else 503), body

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "chatlm",
                "max_model_len": self.limits.max_prompt_tokens, "max_tokens": self.limits.max_tokens}


def history(messages: list[Message]) -> list[dict]:
    """The messages as a conversation for the template: developer turns are system turns, the
    system turns go first, turns without text are left out, and consecutive turns of one speaker
    are one turn (their texts joined by a space); the last must be a user turn."""
    turns, system = [], []
    for i, message in enumerate(messages):
        if message.role == "tool":
            raise ApiError(400, "tool messages are not supported by this model", param=f"messages.{i}.role")
        text = message.text()
        if not text.strip():
            continue
        if message.role in ("system", "developer"):
            system.append(text)
        elif turns and turns[-1]["role"] == message.role:
            turns[-1]["content"] += " " + text
        else:
            turns.append({"role": message.role, "content": text})
    if not turns or turns[-1]["role"] != "user" or messages[-1].role != "user":
        raise ApiError(400, "the last message must be a user message with text: the model answers it",
                       param="messages")
    return ([{"role": "system", "content": " ".join(system)}] if system else []) + turns


def last_user_message(messages: list[Message]) -> tuple[str, int]:
    """The text to answer and how many other messages were left out (T5 here is single-turn)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "user":
            text = messages[i].text()
            if not text.strip():
                raise ApiError(400, "the last user message is empty", param=f"messages.{i}.content")
            return text, len(messages) - 1
    raise ApiError(400, "messages has no message with role 'user' to answer", param="messages")


def single_turn_warning(ignored: int) -> list[str]:
    if not ignored:
        return []
    return [f"this model is single-turn: only the last user message was answered; {ignored} other "
            f"message{'s were' if ignored > 1 else ' was'} not read"]


def create_app(server: Server, bound_host: str = "127.0.0.1", allowed_hosts=(), allowed_origins=()):
    @asynccontextmanager
    async def lifespan(_app):
        server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(title="chatlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    page = open(PAGE, encoding="utf-8").read()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        body = err.body()
        if request.url.path == "/api/chat":  # the original's clients read `detail`
            body["detail"] = err.message
        return JSONResponse(body, status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, err: StarletteHTTPException):
        message = {404: "no such endpoint: see GET /v1/models, POST /v1/chat/completions, POST /v1/completions, "
                        "POST /api/chat",
                   405: "this endpoint does not take that method"}.get(err.status_code, str(err.detail))
        return JSONResponse(ApiError(err.status_code, message).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, err: RequestValidationError):
        return JSONResponse(ApiError(400, str(err.errors()[0].get("msg", "bad request"))).body(), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_request, err: Exception):
        server.log(f"internal error: {type(err).__name__}: {err}")
        error = ApiError(500, "internal server error; see the server's log", kind="server_error")
        return JSONResponse(error.body(), status_code=500, headers=error.headers)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        status, body = server.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics(request: Request):
        server.check_key(request)
        return Response(server.metrics.text(), media_type=server.metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_key(request)
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        server.check_key(request)
        server.check_model(model_id)
        return server.model_card()

    @app.post("/api/chat")
    async def original_chat(request: Request):
        server.check_key(request)
        req = parse(OriginalChatRequest, await read_json(request, server.limits.max_body_bytes,
                                                         server.limits.body_timeout_s))
        if not req.input_txt:
            raise ApiError(406, "input_txt length = 0 is not allowed: send the text to answer", param="input_txt")
        events = asyncio.Queue()
        job = server.new_job(server.encode(req.input_txt, "input_txt"),
                             Settings(max_tokens=server.limits.default_max_tokens), events)
        server.submit(job)
        (job,) = await server.wait_done([job], events, request)
        return {"response": job.text or EMPTY_ANSWER}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        server.check_key(request)
        req = parse(ChatRequest, await read_json(request, server.limits.max_body_bytes, server.limits.body_timeout_s))
        server.check_model(req.model)
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens differ; send one", param="max_tokens")
        warnings, headers = [], {}
        if server.bot.has_template:
            turns = history(req.messages)
            prompt, dropped = server.conversation_prompt(turns)
            if dropped:
                warnings.append(f"the conversation is longer than this model reads ({server.limits.max_prompt_tokens} "
                                f"tokens): its {dropped} oldest message{'s were' if dropped > 1 else ' was'} left out")
            headers["X-Chatlm-Dropped-Messages"] = str(dropped)
        else:
            prompt, ignored = last_user_message(req.messages)
            warnings = single_turn_warning(ignored)
            headers["X-Chatlm-Ignored-Messages"] = str(ignored)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        settings = server.settings(req, req.max_completion_tokens or req.max_tokens, server.limits.default_max_tokens,
                                   logprobs)
        events = asyncio.Queue()
        job = server.new_job(server.encode(prompt, "messages"), settings, events, stream=bool(req.stream))
        server.submit(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
        if not req.stream:
            (job,) = await server.wait_done([job], events, request)
            body = {**head, "object": "chat.completion", "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text},
                                 "logprobs": server.chat_logprobs(job.logprobs) if logprobs is not None else None,
                                 "finish_reason": job.finish_reason}],
                    "usage": server.usage([job])}
            if warnings:
                body["warnings"] = warnings
            return JSONResponse(body, headers=headers)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = ChatChunks(server, head, logprobs is not None, warnings)
        return StreamingResponse(stream_events(server, [job], events, chunks, include_usage),
                                 media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        server.check_key(request)
        req = parse(CompletionRequest, await read_json(request, server.limits.max_body_bytes,
                                                       server.limits.body_timeout_s))
        server.check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        settings = server.settings(req, req.max_tokens, min(16, server.limits.max_tokens), req.logprobs)
        ids = [server.encode(p, "prompt" if isinstance(req.prompt, str) else f"prompt.{i}")
               for i, p in enumerate(prompts)]
        if len(prompts) > server.engine.max_batch_size + server.engine.max_queue:
            raise ApiError(400, f"prompt holds {len(prompts)} prompts; this server takes at most "
                                f"{server.engine.max_batch_size + server.engine.max_queue} at once", param="prompt")
        events = asyncio.Queue()
        jobs = [server.new_job(p, dataclasses.replace(settings), events, index=i, stream=bool(req.stream))
                for i, p in enumerate(ids)]
        try:
            for job in jobs:
                server.submit(job)
        except ApiError:
            for job in jobs:
                job.cancel()
            raise
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
        if not req.stream:
            jobs = await server.wait_done(jobs, events, request)
            return {**head, "object": "text_completion", "system_fingerprint": None,
                    "choices": [{"index": i, "text": job.text, "finish_reason": job.finish_reason,
                                 "logprobs": server.completion_logprobs(job.logprobs)
                                 if req.logprobs is not None else None} for i, job in enumerate(jobs)],
                    "usage": server.usage(jobs)}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = CompletionChunks(server, head, req.logprobs is not None)
        return StreamingResponse(stream_events(server, jobs, events, chunks, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app = CORSMiddleware(app, allow_origins=list(allowed_origins), allow_methods=["GET", "POST", "OPTIONS"],
                         allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                         expose_headers=["X-Request-Id", "X-Chatlm-Ignored-Messages", "X-Chatlm-Dropped-Messages"])
    return Guard(app, bound_host, allowed_hosts, allowed_origins, log=server.log, count=server.metrics.request)


def sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class ChatChunks:
    """The chat completion chunks of one answer: the role first, then its text as it grows."""

    def __init__(self, server: Server, head: dict, logprobs: bool, warnings=()):
        self.server, self.head, self.logprobs, self.warnings = server, head, logprobs, list(warnings)
        self.object = "chat.completion.chunk"

    def first(self, index: int, extra: dict) -> str | None:
        fields = {"warnings": self.warnings} if self.warnings else {}
        return self.chunk(index, {"role": "assistant", "content": ""}, None, None, extra, **fields)

    def chunk(self, index, delta, finish_reason, entries, extra, **fields) -> str:
        logprobs = self.server.chat_logprobs(entries) if self.logprobs and entries is not None else None
        return sse({**self.head, "object": self.object, "system_fingerprint": None, **extra, **fields,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                 "finish_reason": finish_reason}]})

    def text(self, index: int, text: str, entries: list, extra: dict) -> str:
        return self.chunk(index, {"content": text}, None, entries, extra)

    def end(self, index: int, finish_reason: str, entries: list, extra: dict) -> str:
        return self.chunk(index, {}, finish_reason, entries if entries else None, extra)


class CompletionChunks:
    """The completion chunks of one or more prompts' answers (`index` tells them apart)."""

    def __init__(self, server: Server, head: dict, logprobs: bool):
        self.server, self.head, self.logprobs = server, head, logprobs
        self.object = "text_completion"
        self.offsets = {}

    def first(self, index: int, extra: dict) -> str | None:
        return None

    def chunk(self, index, text, finish_reason, entries, extra) -> str:
        logprobs = None
        if self.logprobs and entries is not None:
            logprobs = self.server.completion_logprobs(entries, self.offsets.get(index, 0))
            self.offsets[index] = self.offsets.get(index, 0) + sum(len(t) for t in logprobs["tokens"])
        return sse({**self.head, "object": self.object, "system_fingerprint": None, **extra,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]})

    def text(self, index: int, text: str, entries: list, extra: dict) -> str:
        return self.chunk(index, text, None, entries, extra)

    def end(self, index: int, finish_reason: str, entries: list, extra: dict) -> str:
        return self.chunk(index, "", finish_reason, entries, extra)


async def stream_events(server: Server, jobs: list[Job], events: asyncio.Queue, chunks, include_usage: bool):
    """OpenAI's chunks of every job as they come: (the role,) the text as it grows with the
    log-probabilities of its tokens, the finish reason; then usage and [DONE]. A comment line
    keeps a stream alive while it waits. A client that disconnects cancels this generator;
    `finally` then stops the jobs' decoding."""
    extra = {"usage": None} if include_usage else {}
    deadline = time.monotonic() + server.limits.timeout_s
    consumed = [0] * len(jobs)  # log-probabilities already sent, per job

    def new_entries(index):
        entries = jobs[index].logprobs[consumed[index]:]
        consumed[index] += len(entries)
        return entries
    try:
        for index in range(len(jobs)):
            first = chunks.first(index, extra)
            if first:
                yield first
        finished = 0
        while finished < len(jobs):
            left = deadline - time.monotonic()
            if left <= 0:
                yield sse(server.timed_out().body())
                break
            try:
                index, kind, payload = await asyncio.wait_for(events.get(),
                                                              timeout=min(left, server.limits.keepalive_s))
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if kind == "delta":
                yield chunks.text(index, payload, new_entries(index), extra)
            elif kind == "done":
                yield chunks.end(index, payload.finish_reason, new_entries(index), extra)
                finished += 1
            else:
                yield sse(ApiError(500, payload, kind="server_error").body())
                break
        else:
            if include_usage:
                yield sse({**chunks.head, "object": chunks.object, "system_fingerprint": None, "choices": [],
                           "usage": server.usage(jobs)})
        yield sse("[DONE]")
    finally:
        for job in jobs:
            job.cancel()


def is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    """Report a port in use at start-up, before the model loads (uvicorn would log and exit 1)."""
    import socket

    from utils.errors import UserError
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --port or --host") from None


@dataclasses.dataclass(frozen=True)
class Network:
    """How the server meets the network (serve's flags)."""
    host: str = "127.0.0.1"
    port: int = 8000
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    max_connections: int = 256
    header_timeout_s: float = 10.0
    drain_timeout_s: float = 30.0


def uvicorn_server(server: Server, network: Network, log_level: str = "warning"):
    """A uvicorn server for `server`'s app: the connection limit (503 beyond), the header deadline,
    and on SIGTERM or Ctrl+C: /health and new requests 503, those in flight finish for at most
    drain_timeout_s."""
    import uvicorn

    from serve.guard import protocol_with_deadline
    config = uvicorn.Config(create_app(server, network.host, network.allowed_hosts, network.allowed_origins),
                            host=network.host.strip("[]"), port=network.port, log_level=log_level,
                            timeout_keep_alive=5, limit_concurrency=network.max_connections,
                            timeout_graceful_shutdown=max(1, round(network.drain_timeout_s)),
                            http=protocol_with_deadline(network.header_timeout_s), access_log=False)

    class Draining(uvicorn.Server):
        def handle_exit(self, sig, frame):
            server.draining = True
            super().handle_exit(sig, frame)
    return Draining(config)


def run(bot, network: Network, model_name: str, api_key: str | None, limits: Limits, max_batch_size: int,
        max_queue: int) -> None:
    server = Server(bot, model_name, api_key, limits, max_batch_size, max_queue)
    host = network.host
    shown = f"[{host}]" if ":" in host else host
    print(f"chatlm: serving {model_name} at http://{shown}:{network.port}/ (web chat), "
          f"http://{shown}:{network.port}/v1 (OpenAI API); API key {'required' if api_key else 'not required'}; "
          "Ctrl+C stops", flush=True)
    uvicorn_server(server, network).run()
