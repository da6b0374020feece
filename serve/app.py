"""The HTTP server: OpenAI's chat completions (with server-sent events), the original's
/api/chat, a web chat page, /v1/models and /health, with FastAPI and uvicorn.

    python train.py serve --model_dir=model_save/demo/best            # http://127.0.0.1:8000/

Every request is bounded (body size, prompt tokens, max_tokens, requests in flight, time);
a request over a bound or malformed gets a 4xx with an OpenAI-style JSON error body, and the
server goes on serving. Generation is batched by `serve.engine.BatchEngine`.

T5 here is single-turn: a chat completion answers the last user message. Earlier messages
are not read; the response says how many were left out (`warnings`, and the header
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
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.engine import BatchEngine, Job, QueueFull, Settings

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
# What the original's /api/chat says when the model's answer is empty.
EMPTY_ANSWER = "我是一个参数很少的AI模型🥺，知识库较少，无法直接回答您的问题，换个问题试试吧👋"
API_KEY_ENV = "CHATLM_API_KEY"


@dataclasses.dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * 1024
    max_prompt_tokens: int = 512
    max_tokens: int = 1024  # the most a request may ask for
    default_max_tokens: int = 256  # when a request does not say
    timeout_s: float = 300.0  # waiting plus generating, per request


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

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
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1
    # Accepted for compatibility, with the only values this server implements.
    frequency_penalty: Literal[0] | None = None
    presence_penalty: Literal[0] | None = None
    logprobs: Literal[False] | None = None
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None


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
            message = f"field '{field}': {first['msg'][0].lower()}{first['msg'][1:]}"
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


async def read_json(request: Request, limit: int) -> dict:
    """The request's JSON object, read at most `limit` bytes far."""
    too_large = ApiError(413, f"the request body is over {limit:,} bytes, the most this server takes "
                              "(serve --max_body_bytes)", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        data = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON ({err})", param="body") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", param="body")
    return data


# ---- the application ---------------------------------------------------------------------
class Server:
    """The model, its batch engine and the settings every endpoint checks against."""

    def __init__(self, bot, model_name: str, api_key: str | None = None, limits: Limits = Limits(),
                 max_batch_size: int = 16, max_queue: int = 64, batch_wait_ms: float = 10, log=print):
        self.bot, self.model_name, self.api_key, self.limits, self.log = bot, model_name, api_key or None, limits, log
        self.engine = BatchEngine(bot.model, bot.tokenizer, max_batch_size, max_queue, batch_wait_ms, log=log)
        self.created = int(time.time())

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

    def encode(self, prompt: str, param: str) -> list[int]:
        # The tokenizer appends [EOS]: the same encoder input as in training.
        ids = self.bot.tokenizer(prompt, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        if len(ids) > self.limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {len(ids):,} tokens; this server takes at most "
                                f"{self.limits.max_prompt_tokens:,} (serve --max_prompt_tokens)",
                           param=param, code="context_length_exceeded")
        return ids

    def submit(self, job: Job) -> None:
        try:
            self.engine.submit(job)
        except QueueFull:
            raise ApiError(429, f"the server is busy ({self.engine.max_batch_size + self.engine.max_queue} requests "
                                "in flight, serve --max_batch_size plus --max_queue); retry shortly",
                           kind="rate_limit_error", code="server_busy", headers={"Retry-After": "1"}) from None

    def settings(self, req: ChatRequest) -> Settings:
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens differ; send one", param="max_tokens")
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None and asked > self.limits.max_tokens:
            raise ApiError(400, f"max_tokens is {asked:,}; this server generates at most {self.limits.max_tokens:,} "
                                "(serve --max_tokens)", param="max_completion_tokens" if req.max_completion_tokens
                           else "max_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop takes at most 4 non-empty strings", param="stop")
        return Settings(max_tokens=asked or self.limits.default_max_tokens,
                        temperature=0.0 if req.temperature is None else req.temperature,
                        top_p=1.0 if req.top_p is None else req.top_p, stop=tuple(stop), seed=req.seed)

    def new_job(self, prompt_ids: list[int], settings: Settings, stream: bool = False) -> tuple[Job, asyncio.Queue]:
        """A job whose events arrive on an asyncio queue of the running loop."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def on_event(kind, payload):
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
            except RuntimeError:  # the loop is closed: the server is stopping
                pass
        return Job(prompt_ids, settings, on_event, stream=stream), events

    async def wait_done(self, job: Job, events: asyncio.Queue, request: Request) -> Job:
        """The finished job; cancels it when the client leaves or the time is up."""
        deadline = time.monotonic() + self.limits.timeout_s
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(events.get(), timeout=0.25)
                except TimeoutError:
                    if await request.is_disconnected():
                        raise ApiError(499, "the client went away") from None
                    kind = None
                if kind == "done":
                    return payload
                if kind == "error":
                    raise ApiError(500, payload, kind="server_error")
                if time.monotonic() > deadline:
                    raise self.timed_out()
        finally:
            job.cancel()  # a no-op once finished

    def timed_out(self) -> ApiError:
        return ApiError(504, f"the request took longer than {self.limits.timeout_s:g} s (serve --timeout_s)",
                        kind="timeout", code="timeout")

    def usage(self, job: Job) -> dict:
        return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": len(job.tokens),
                "total_tokens": len(job.prompt_ids) + len(job.tokens)}


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


def create_app(server: Server) -> FastAPI:
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
        message = {404: "no such endpoint: see GET /v1/models, POST /v1/chat/completions, POST /api/chat",
                   405: "this endpoint does not take that method"}.get(err.status_code, str(err.detail))
        return JSONResponse(ApiError(err.status_code, message).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, err: RequestValidationError):
        return JSONResponse(ApiError(400, str(err.errors()[0].get("msg", "bad request"))).body(), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_request, err: Exception):
        server.log(f"internal error: {type(err).__name__}: {err}")
        return JSONResponse(ApiError(500, "internal server error; see the server's log", kind="server_error").body(),
                            status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        stats = dataclasses.asdict(server.engine.stats)
        return {"status": "ok", "model": server.model_name, "key_required": server.api_key is not None, **stats}

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_key(request)
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "chatlm"}]}

    @app.post("/api/chat")
    async def original_chat(request: Request):
        server.check_key(request)
        req = parse(OriginalChatRequest, await read_json(request, server.limits.max_body_bytes))
        if not req.input_txt:
            raise ApiError(406, "input_txt length = 0 is not allowed: send the text to answer", param="input_txt")
        job, events = server.new_job(server.encode(req.input_txt, "input_txt"),
                                     Settings(max_tokens=server.limits.default_max_tokens))
        server.submit(job)
        job = await server.wait_done(job, events, request)
        return {"response": job.text or EMPTY_ANSWER}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        server.check_key(request)
        req = parse(ChatRequest, await read_json(request, server.limits.max_body_bytes))
        if req.model is not None and req.model != server.model_name:
            raise ApiError(404, f"model '{req.model}' is not served here; this server serves "
                                f"'{server.model_name}' (GET /v1/models)", param="model", code="model_not_found")
        prompt, ignored = last_user_message(req.messages)
        settings = server.settings(req)
        job, events = server.new_job(server.encode(prompt, "messages"), settings, stream=req.stream)
        server.submit(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
        warnings = single_turn_warning(ignored)
        headers = {"X-Chatlm-Ignored-Messages": str(ignored)}
        if not req.stream:
            job = await server.wait_done(job, events, request)
            body = {**head, "object": "chat.completion", "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text},
                                 "logprobs": None, "finish_reason": job.finish_reason}],
                    "usage": server.usage(job)}
            if warnings:
                body["warnings"] = warnings
            return JSONResponse(body, headers=headers)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(stream_events(server, job, events, head, warnings, include_usage),
                                 media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_events(server: Server, job: Job, events: asyncio.Queue, head: dict, warnings: list[str],
                        include_usage: bool):
    """OpenAI's chunks: the role, the text as it grows, the finish reason, usage, [DONE].

    A client that disconnects cancels this generator; `finally` then stops the job's decoding.
    """
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict, finish_reason=None, **fields) -> str:
        return sse({**head, "object": "chat.completion.chunk", "system_fingerprint": None, **extra, **fields,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})
    deadline = time.monotonic() + server.limits.timeout_s
    try:
        yield chunk({"role": "assistant", "content": ""}, **({"warnings": warnings} if warnings else {}))
        while True:
            try:
                kind, payload = await asyncio.wait_for(events.get(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                yield sse(server.timed_out().body())
                break
            if kind == "delta":
                yield chunk({"content": payload})
            elif kind == "done":
                yield chunk({}, payload.finish_reason)
                if include_usage:
                    yield sse({**head, "object": "chat.completion.chunk", "system_fingerprint": None, "choices": [],
                               "usage": server.usage(payload)})
                break
            else:
                yield sse(ApiError(500, payload, kind="server_error").body())
                break
        yield sse("[DONE]")
    finally:
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


def run(bot, host: str, port: int, model_name: str, api_key: str | None, limits: Limits, max_batch_size: int,
        max_queue: int, batch_wait_ms: float) -> None:
    import uvicorn
    server = Server(bot, model_name, api_key, limits, max_batch_size, max_queue, batch_wait_ms)
    shown = f"[{host}]" if ":" in host else host
    print(f"chatlm: serving {model_name} at http://{shown}:{port}/ (web chat), http://{shown}:{port}/v1 (OpenAI API); "
          f"API key {'required' if api_key else 'not required'}; Ctrl+C stops", flush=True)
    uvicorn.run(create_app(server), host=host.strip("[]"), port=port, log_level="warning", timeout_keep_alive=5)
