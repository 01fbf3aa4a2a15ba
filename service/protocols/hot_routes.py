"""Inference POSTs go straight to their endpoint, past FastAPI's router.

FastAPI matches a request against the app's routes one by one and then solves the endpoint's
parameters; with the forty-odd routes of this app that is about a tenth of the server CPU of a
single-image request (measured for issue 16, BENCHMARKS.md §3). The inference endpoints take
`(model, request[, version])` and parse their own bodies, so nothing is lost by calling them
directly: each protocol module hands over the handler its FastAPI route also calls (documented in
/openapi.json), which takes the body already read, and errors go through the one error map. Every
other route still goes through FastAPI.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from exitserve.service.protocols import routes
from exitserve.service.protocols.errors import response_for

# (request, body, **path parameters) -> response: what the v1 and v2 inference routes run.
BodyEndpoint = Callable[..., Awaitable[Response]]


# From this Content-Length on, the body is read into one buffer of its announced size: joining the
# received pieces at the end held the body twice (issue 30: a body may cost a small multiple of itself).
PREALLOCATE_BYTES = 1 << 20


async def read_body(receive: Receive, expected: int | None = None) -> bytes:
    """The whole body, as Starlette's `Request.body()` reads it (ClientDisconnect when the client
    leaves first) without its async generator: a single-image body is one message. With a large
    `expected` size (the Content-Length, which the server holds the body to) a bytearray filled in place."""
    if expected is not None and expected >= PREALLOCATE_BYTES:
        return await _read_into(receive, bytearray(expected))
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


async def _read_into(receive: Receive, buffer: bytearray) -> bytes:
    filled = 0
    while True:
        message = await receive()
        if message["type"] == "http.request":
            data = message.get("body", b"")
            if filled + len(data) > len(buffer):  # more than announced: never from a conforming server
                buffer.extend(b"\0" * (filled + len(data) - len(buffer)))
            buffer[filled:filled + len(data)] = data
            filled += len(data)
            if not message.get("more_body", False):
                del buffer[filled:]
                return buffer  # type: ignore[return-value]  # a bytes-like every parser here takes
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


class HotRoutes:
    def __init__(self, app: ASGIApp, v1_predict: BodyEndpoint, v2_infer: BodyEndpoint):
        self.app = app
        self.v1_predict = v1_predict
        self.v2_infer = v2_infer

    def _match(self, path: str) -> tuple[BodyEndpoint, dict[str, Any]] | None:
        """The endpoint and path parameters of an inference path, as Starlette would match them."""
        found = routes.match(path)
        if found is None or not found.route.hot:
            return None
        return (self.v1_predict if found.route.protocol == "v1" else self.v2_infer), found.params

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = self._match(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        endpoint, params = match
        try:
            length = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
            body = await read_body(receive, int(length) if length.isdigit() else None)
            response = await endpoint(Request(scope, receive), body, **params)
        except Exception as exc:
            response = response_for(exc, scope.get("state", {}).get("request_id"))
        await response(scope, receive, send)
