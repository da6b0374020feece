"""What stands between the network and the endpoints (no torch, no model): which requests are let
in, and the record of each.

`Guard`, an ASGI middleware around the app:
- Host: the `Host` header must name the bound address, localhost, 127.0.0.1 or ::1, or a host in
  --allowed_hosts (`*`: any): a page that rebinds its own domain name to 127.0.0.1 sends its own
  name and is refused (421), so it cannot read the answers (DNS rebinding, the class of Ollama's
  CVE-2024-28224).
- Origin: a browser's cross-origin request (an `Origin` other than the server's own) is refused
  (403) unless the origin is in --allowed_origins, for which Starlette's CORSMiddleware answers
  the preflight and adds the CORS headers. The page the server itself serves is same-origin.
- Content type: a request with a body must say `application/json` (415): browsers send
  `text/plain` POSTs across sites without asking first.
- Every request gets an id (the client's `X-Request-Id` when it is a short plain token, else a
  new one), sent back as `X-Request-Id`, and one access-log line when its response ends: id,
  client, method, path, status, milliseconds; the status is counted for /metrics.

`DeadlineH11Protocol`: uvicorn's HTTP/1.1 protocol with a deadline on reading a request's
headers (uvicorn has none: a client sending a byte a second would hold its connection for ever);
the body's deadline is the app's (`read_json`).
"""
import asyncio
import json
import re
import time
import uuid

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")


def host_name(header: str) -> str:
    """The name in a Host header, without its port ([::1]:8000 -> ::1)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def error_body(status: int, message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()


class Guard:
    def __init__(self, app, bound_host: str, allowed_hosts=(), allowed_origins=(), log=print, count=None):
        self.app, self.log, self.count = app, log, count or (lambda path, status: None)
        hosts = {h.strip().lower().strip("[]") for h in allowed_hosts if h.strip()}
        self.any_host = "*" in hosts
        bound = bound_host.strip("[]").lower()
        self.hosts = hosts | set(LOCAL_NAMES) | ({bound} if bound not in WILDCARDS else set())
        self.origins = {o.strip().rstrip("/").lower() for o in allowed_origins if o.strip()}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        incoming = headers.get("x-request-id", "")
        request_id = incoming if REQUEST_ID.fullmatch(incoming) else f"req-{uuid.uuid4().hex[:20]}"
        scope.setdefault("state", {})["request_id"] = request_id
        started, status = time.monotonic(), [0]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.finished(scope, request_id, status[0], started)

        refusal = self.refusal(scope, headers)
        if refusal is not None:
            code, message, kind = refusal
            await send_with_id({"type": "http.response.start", "status": code,
                                "headers": [(b"content-type", b"application/json")]})
            await send_with_id({"type": "http.response.body", "body": error_body(code, message, kind)})
            return
        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            self.finished(scope, request_id, status[0] or 499, started)
            raise

    def finished(self, scope, request_id: str, status: int, started: float) -> None:
        client = scope.get("client") or ("-", 0)
        path = scope["path"]
        self.log(f"{request_id} {client[0]} \"{scope['method']} {path}\" {status} "
                 f"{1000 * (time.monotonic() - started):.0f} ms")
        self.count(path, status)

    def refusal(self, scope, headers: dict) -> tuple[int, str, str] | None:
        host = headers.get("host", "")
        if not self.any_host and host_name(host) not in self.hosts:
            return (421, f"this server does not answer to the host name {host_name(host)!r}: ask it by 127.0.0.1 or "
                         "localhost, or start it with --allowed_hosts=NAME", "host_not_allowed")
        origin = headers.get("origin", "").rstrip("/").lower()
        if origin and origin.split("://", 1)[-1] != host.lower() and origin not in self.origins:
            return (403, f"cross-origin requests from {origin} are refused; start the server with "
                         f"--allowed_origins={origin} to allow them", "origin_not_allowed")
        has_body = headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if has_body and scope["method"] in ("POST", "PUT", "PATCH") and media != "application/json":
            return (415, f"the body must be JSON sent as 'Content-Type: application/json', not {media or 'none'!r}",
                    "unsupported_media_type")
        return None


class DeadlineH11Protocol(H11Protocol):
    """H11Protocol that closes a connection whose request headers take longer than
    `header_timeout_s` to arrive (from the connection, or from the end of the previous response)."""
    header_timeout_s = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_deadline = None
        self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self._header_deadline is not None and self.conn.their_state is not h11.IDLE:
            self._header_deadline.cancel()
            self._header_deadline = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._header_deadline is None and not self.transport.is_closing():
            self._arm_header_deadline()

    def connection_lost(self, exc) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None
        super().connection_lost(exc)


def protocol_with_deadline(header_timeout_s: float) -> type:
    return type("DeadlineH11", (DeadlineH11Protocol,), {"header_timeout_s": header_timeout_s})
