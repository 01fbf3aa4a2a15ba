"""The edge of every HTTP request (pure ASGI, cheaper than BaseHTTPMiddleware): allowed hosts, request
id, API keys, content type, body limit, client-gone watch, request metrics and the request log line.

Every response of a model route (inference, feedback, admin, OpenAI generation) is counted in
`exitserve_requests_total` and logged, whatever its status, a 500 from a bug included.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import os
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exitserve.errors import (
    ExitserveError,
    InvalidInput,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from exitserve.service.monitoring.metrics import Metrics
from exitserve.service.protocols import routes
from exitserve.service.protocols.errors import error_response, family_of, response_for
from exitserve.service.protocols.feedback import body_limit as feedback_body_limit
from exitserve.service.serving.batcher import Reservation
from exitserve.service.serving.context import CLIENT_GONE, MAX_REQUEST_ID_CHARS, REQUEST_ID, RESERVATION
from exitserve.service.serving.repository import ModelRepository, trim_heap
from exitserve.service.settings import Settings

log = logging.getLogger("exitserve.http")
# The OpenAI routes (OPENAI_PATHS) name their model in the body: the route handler puts it in the scope's state.
SERVED_MODEL = "served_model"
OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/v2/health/", "/docs", "/openapi.json")
# Content types a web page may POST cross-origin without a CORS preflight ("simple requests").
SIMPLE_TYPES = (b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data")
# "-0.12345678901234568, ": a float written with float64's 17 digits, its sign and separator.
JSON_NUMBER_BYTES = 24
BODY_HEADROOM_BYTES = 64 << 10  # delta per sample, policy, keys and spacing
BIG_BODY_BYTES = 4 << 20  # after a request this large, free heap pages go back to the OS
# The client-gone watch starts this long after the body is in: a request answered sooner (a lone
# single image: ~2 ms) never pays for the task, one that waits longer notices a hang-up at most this late.
WATCH_AFTER_S = 0.005


REFUSALS = (503, 504)  # expected under overload or while a dependency is down: not server faults


class RefusalSummary:
    """One warning line per `interval_s` at most, counting the refusals (by status) since the last one.

    The first refusal after a quiet spell is reported at once; later ones at the end of the interval
    (a timer on the event loop, so a burst's tail is reported even if no refusal follows)."""

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self._counts: dict[int, int] = {}
        self._last = -math.inf
        self._timer: asyncio.TimerHandle | None = None

    def count(self, status: int) -> None:
        self._counts[status] = self._counts.get(status, 0) + 1
        wait = self._last + self.interval_s - time.monotonic()
        if wait <= 0:
            self._report()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(wait, self._report)

    def _report(self) -> None:
        self._timer = None
        if self._counts:
            counts, self._counts, self._last = self._counts, {}, time.monotonic()
            log.warning("requests refused (overload or an unavailable dependency)",
                        extra={"refused": {str(k): v for k, v in sorted(counts.items())},
                               "window_s": self.interval_s})


def new_request_id() -> str:
    """A random UUID4 as 32 hex digits, as `uuid.uuid4().hex` writes it, without building a UUID object."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw.hex()


def _route(path: str) -> tuple[str, str] | None:
    """(protocol, model) for model routes (v1, v2, feedback, admin, openai: model "" until known), else
    None: the one route table (protocols/routes.py) the routers register and the hot routes match too."""
    found = routes.match(path)
    return None if found is None else (found.route.protocol, found.model)


def _without_body(send: Send) -> Send:
    """`send` for a HEAD request: the GET response's status and headers (Content-Length included), no body."""

    async def head_send(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return head_send


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def request_id_of(raw: bytes | None) -> tuple[str | None, str | None]:
    """(id, None) for an acceptable X-Request-Id (or None when absent), else (None, why it is refused).

    Ids are UTF-8 (echoed byte for byte) and at most MAX_REQUEST_ID_CHARS characters: never cut or
    re-decoded, because feedback is matched against the exact id the client holds."""
    if raw is None or raw == b"":
        return None, None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "X-Request-Id: must be UTF-8 text"
    if len(text) > MAX_REQUEST_ID_CHARS:
        return None, f"X-Request-Id: {len(text)} characters exceed the limit of {MAX_REQUEST_ID_CHARS}"
    if not text.isprintable():
        return None, "X-Request-Id: holds control characters"
    return text, None


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics, repository: ModelRepository):
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.repository = repository
        self.api_key = settings.api_key.encode() if settings.api_key else None
        self.admin_key = settings.admin_api_key.encode() if settings.admin_api_key else None
        self.allowed_hosts = {h.lower().encode() for h in settings.allowed_hosts}
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.refusals = RefusalSummary()
        self._limits: dict[tuple[str, str], tuple[object, int]] = {}

    @staticmethod
    def _supplied_key(headers: dict[bytes, bytes]) -> bytes:
        # An empty X-API-Key does not hide a valid Bearer token (nor stand for a key).
        supplied = headers.get(b"x-api-key") or b""
        if not supplied:
            auth = headers.get(b"authorization", b"")
            supplied = auth[7:] if auth[:7].lower() == b"bearer " else b""
        return supplied

    def _admit(self, scope: Scope, headers: dict[bytes, bytes], route: tuple[str, str] | None,
               id_problem: str | None) -> None:
        """Let the request through, or raise the error refusing it at the edge (an ExitserveError)."""
        protocol = route[0] if route else None
        if self.allowed_hosts:
            host = headers.get(b"host", b"").rsplit(b":", 1)[0].strip(b"[]").lower()
            if host not in self.allowed_hosts:
                raise InvalidInput("Host header not allowed (EXITSERVE_ALLOWED_HOSTS)")
        if id_problem is not None:
            raise InvalidInput(id_problem)
        path = scope["path"]
        if protocol == "admin":
            key = self.admin_key
            if key is not None and not hmac.compare_digest(self._supplied_key(headers), key):
                raise Unauthorized("missing or wrong admin API key")
        elif (self.api_key and not path.startswith((*OPEN_PATHS, "/admin/"))
              and not hmac.compare_digest(self._supplied_key(headers), self.api_key)):
                raise Unauthorized("missing or wrong API key")
        length = headers.get(b"content-length")
        limit = scope["state"]["body_limit"]
        if length is not None and length.isdigit() and int(length) > limit:
            raise PayloadTooLarge(f"body of {int(length)} bytes exceeds the limit of {limit}")
        if route is not None and protocol in ("v1", "v2"):
            RESERVATION.set(self._reserve(route[1], headers, scope))  # QueueFull: 503 + Retry-After
        if scope["method"] == "POST" and protocol is not None:
            content_type = headers.get(b"content-type")
            if protocol == "v2":
                # tritonclient sends binary bodies with no (or an octet-stream) Content-Type.
                if content_type is not None and content_type.split(b";", 1)[0].strip().lower() in SIMPLE_TYPES:
                    raise UnsupportedMediaType("Content-Type must be application/json or application/octet-stream")
            elif length != b"0" and (content_type is None or not _is_json(content_type)):
                raise UnsupportedMediaType("Content-Type must be application/json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        if scope["method"] == "HEAD":
            # HEAD is GET without the body (RFC 9110 9.3.2) on every GET route: load balancers and uptime
            # checkers send it to /healthz and /readyz. A route without GET answers 405 as before.
            scope = {**scope, "method": "GET"}
            send = _without_body(send)
        headers = dict(scope["headers"])
        raw_id = headers.get(b"x-request-id")
        client_id, id_problem = request_id_of(raw_id)
        request_id = client_id or new_request_id()
        echo = raw_id if client_id is not None and raw_id is not None else request_id.encode()
        scope.setdefault("state", {})["request_id"] = request_id
        REQUEST_ID.set(request_id)  # the dataplane records decisions under it (labelled feedback)
        route = _route(scope["path"])
        protocol = route[0] if route else None
        scope["state"]["body_limit"] = self._body_limit(route)
        status_holder = {"status": 500, "started": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", echo)]
            await send(message)

        RESERVATION.set(None)
        gone: asyncio.Future = asyncio.get_running_loop().create_future()
        CLIENT_GONE.set(gone)
        watcher: list[asyncio.Task | asyncio.TimerHandle] = []
        refusal: ExitserveError | None = None
        try:
            self._admit(scope, headers, route, id_problem)
        except ExitserveError as exc:
            refusal = exc
        try:
            if refusal is not None:
                # In the v1/v2 shape on every route, the OpenAI ones too (as before the one error map;
                # tests/service/test_reload.py pins the 401 body): the edge answers before any protocol.
                await response_for(refusal, request_id)(scope, receive, send_with_id)
            else:
                await self.app(scope, self._watched(receive, gone, watcher, scope["state"]["body_limit"],
                                                   watch_disconnect=protocol in ("v1", "v2")), send_with_id)
        except Exception:
            # A bug the app's own handler already answered (and logged) as a 500, which Starlette then
            # re-raises: count and log it below like any response; answer here only if nothing was sent.
            status_holder["status"] = 500
            if not status_holder["started"]:
                with contextlib.suppress(Exception):
                    await error_response("internal server error", 500, family=family_of(scope["path"]))(
                        scope, receive, send_with_id)
        finally:
            reservation = RESERVATION.get()
            if reservation is not None:
                reservation.release()  # refused or failed before it was queued
            for task in watcher:
                task.cancel()
            if not gone.done():
                gone.cancel()
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) >= BIG_BODY_BYTES:
            trim_heap()  # what a big request parsed and decoded is freed now: give it back to the OS
        if route is not None:
            model = route[1] or scope["state"].get(SERVED_MODEL, "")
            known = model in self.repository.models or (protocol == "openai" and SERVED_MODEL in scope["state"])
            label = model if known else "unknown"
            status = int(status_holder["status"])
            counter, duration = self._request_metrics(label, route[0], status)
            counter.inc()
            if status < 400 and protocol in ("v1", "v2"):
                duration.observe(time.perf_counter() - started)
            # ERROR only for the server's own faults: an operator's alert on error lines must not fire on
            # overload. Refusals (503 shed, 504 out of time) are info, summarised in a rate-limited warning.
            level = logging.ERROR if status >= 500 and status not in REFUSALS else logging.INFO
            log.log(level, "request", extra={"request_id": request_id, "model": model, "protocol": protocol,
                                              "status": status, "seconds": round(time.perf_counter() - started, 6)})
            if status in REFUSALS:
                self.refusals.count(status)

    def _request_metrics(self, model: str, protocol: str, status: int) -> tuple[Any, Any]:
        """The request counter and duration children of these labels (a `labels()` lookup takes a lock).
        Bounded: models are served names or "unknown", protocols and statuses are few."""
        key = (model, protocol, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.metrics.requests.labels(model, protocol, str(status)),
                                              self.metrics.request_duration.labels(model))
        return children

    def _reserve(self, model: str, headers: dict[bytes, bytes], scope: Scope) -> Reservation | None:
        """Room in the model's queue for this request, estimated from its Content-Length as raw samples
        (exact for base64 tensors, generous for JSON): refused with 503 on the headers, before the body
        is read or parsed, so a burst costs the server next to nothing. Only on kept-alive connections:
        uvicorn then reads and drops the unread body, whereas closing a socket with unread data would
        reset it and the client could lose the 503."""
        served = self.repository.models.get(model)
        length = headers.get(b"content-length", b"")
        if served is None or not served.ready or served.tokenizer is not None or not length.isdigit():
            return None
        if scope.get("http_version") == "1.0" or b"close" in headers.get(b"connection", b"").lower():
            return None
        sample_bytes = max(1, math.prod(d for d in served.sample_shape if d > 0) * served.input_dtype.itemsize * 4 // 3)
        samples = min(max(1, int(length) // sample_bytes), self.settings.max_request_samples)
        return served.batcher.reserve(samples)  # QueueFull: a 503 + Retry-After

    def _body_limit(self, route: tuple[str, str] | None) -> int:
        """The body limit of this route, scaled to what its model can take (issue 30), and never above
        EXITSERVE_MAX_BODY_BYTES: checked on Content-Length and while the body streams in, before any
        copy or parse of it.

        * inference: max_request_samples x the sample's elements x JSON_NUMBER_BYTES (a float32 written
          in full as JSON; raw and base64 tensors take less), plus headroom for the rest of the body;
          text models: samples x max tokens x 32 bytes;
        * feedback: MAX_ITEMS items of the longest id and label (feedback.body_limit)."""
        limit = self.settings.max_body_bytes
        if route is None or route[0] not in ("v1", "v2", "feedback"):
            return limit
        served = self.repository.models.get(route[1])
        if served is None:
            return limit
        cached = self._limits.get(route)
        if cached is not None and cached[0] is served:  # same model object: not reloaded since
            return cached[1]
        text = served.manifest.input.text
        if route[0] == "feedback":
            limit = min(limit, feedback_body_limit(served))
        elif text is not None:
            limit = min(limit, max(1 << 20, self.settings.max_request_samples * text.max_length * 32))
        else:
            elements = math.prod(d for d in served.sample_shape if d > 0)
            limit = min(limit, self.settings.max_request_samples * elements * JSON_NUMBER_BYTES + BODY_HEADROOM_BYTES)
        self._limits[route] = (served, limit)
        return limit

    def _watched(self, receive: Receive, gone: asyncio.Future, watcher: list[asyncio.Task | asyncio.TimerHandle], limit: int,
                 watch_disconnect: bool) -> Receive:
        """Enforce the body limit while it streams in; once it is complete, watch (inference routes only:
        others, like streamed answers, listen for the disconnect themselves) for the client leaving."""
        seen = 0

        async def listen() -> None:
            message = await receive()
            if message["type"] == "http.disconnect" and not gone.done():
                gone.set_result(True)

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
                if watch_disconnect and not message.get("more_body", False) and not watcher:
                    watcher.append(asyncio.get_running_loop().call_later(WATCH_AFTER_S, watch))
            return message

        def watch() -> None:
            if not gone.done():
                watcher.append(asyncio.ensure_future(listen()))

        return wrapped
