"""The edge of every HTTP request (pure ASGI, cheaper than BaseHTTPMiddleware): request id, API key,
body limit, request metrics and the request log line."""

from __future__ import annotations

import hmac
import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exitserve.errors import PayloadTooLarge
from exitserve.service.monitoring.metrics import Metrics
from exitserve.service.protocols.errors import error_response
from exitserve.service.serving.context import REQUEST_ID
from exitserve.service.serving.repository import ModelRepository
from exitserve.service.settings import Settings

log = logging.getLogger("exitserve.http")
OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/v2/health/", "/docs", "/openapi.json")


def _inference_route(path: str) -> tuple[str, str] | None:
    """(protocol, model) for inference paths, else None."""
    parts = path.strip("/").split("/")
    if len(parts) >= 4 and parts[1] == "models" and parts[0] in ("v1", "v2") and parts[-1] in ("predict", "infer"):
        return parts[0], parts[2]
    return None


class EdgeMiddleware:
    """Pure ASGI (cheaper than BaseHTTPMiddleware): request id, API key, body limit, request metrics, logs."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics, repository: ModelRepository):
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.repository = repository
        self.api_key = settings.api_key.encode() if settings.api_key else None

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        assert self.api_key is not None  # only asked when a key is configured
        supplied = headers.get(b"x-api-key")
        if supplied is None:
            auth = headers.get(b"authorization", b"")
            supplied = auth[7:] if auth[:7].lower() == b"bearer " else b""
        return hmac.compare_digest(supplied, self.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        REQUEST_ID.set(request_id)  # the dataplane records decisions under it (labelled feedback)
        path = scope["path"]
        status_holder = {"status": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        response = None
        if self.api_key and not path.startswith(OPEN_PATHS) and not self._authorised(headers):
            response = error_response("missing or wrong API key", 401, {"WWW-Authenticate": "Bearer"})
        else:
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.settings.max_body_bytes:
                response = error_response(f"body of {int(length)} bytes exceeds the limit of {self.settings.max_body_bytes}", 413)
        if response is not None:
            await response(scope, receive, send_with_id)
        else:
            await self.app(scope, self._limited(receive), send_with_id)

        route = _inference_route(path)
        if route is not None:
            protocol, model = route
            label = model if model in self.repository.models else "unknown"
            status = status_holder["status"]
            self.metrics.requests.labels(label, protocol, str(status)).inc()
            if status < 400:
                self.metrics.request_duration.labels(label).observe(time.perf_counter() - started)
            level = logging.INFO if status < 500 else logging.ERROR
            log.log(level, "request", extra={"request_id": request_id, "model": model, "protocol": protocol,
                                              "status": status, "seconds": round(time.perf_counter() - started, 6)})

    def _limited(self, receive: Receive) -> Receive:
        limit = self.settings.max_body_bytes
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
            return message

        return wrapped
