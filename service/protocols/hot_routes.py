"""Inference POSTs go straight to their endpoint, past FastAPI's router.

FastAPI matches a request against the app's routes one by one and then solves the endpoint's
parameters; with the forty-odd routes of this app that is about a tenth of the server CPU of a
single-image request (measured for issue 16, BENCHMARKS.md §3). The inference endpoints take
`(model, request[, version])` and parse their own bodies, so nothing is lost by calling them
directly: they are the very functions FastAPI registered (and documents in /openapi.json), called
with a Starlette request, and their errors go through the one error map. Every other route still
goes through FastAPI.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from exitserve.service.protocols.errors import response_for

Endpoint = Callable[..., Awaitable[Response]]
V1_PREDICT = "/v1/models/{model}/predict"
V2_INFER = "/v2/models/{model}/infer"
V2_INFER_VERSION = "/v2/models/{model}/versions/{version}/infer"


def _endpoint(routes: list[BaseRoute], path: str) -> Endpoint:
    for route in routes:
        if isinstance(route, Route) and route.path == path and route.methods and "POST" in route.methods:
            return route.endpoint  # the async endpoints of v1.py and v2.py
    raise LookupError(f"no POST route {path} to serve directly")


async def read_body(request: Request) -> bytes:
    """The whole body, as Starlette's `Request.body()` reads it (ClientDisconnect when the client
    leaves first) without its async generator: a single-image body is one message."""
    chunks = []
    while True:
        message = await request.receive()
        if message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                request._stream_consumed = True
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        elif message["type"] == "http.disconnect":
            request._is_disconnected = True
            raise ClientDisconnect()


class HotRoutes:
    def __init__(self, app: ASGIApp, routes: list[BaseRoute]):
        self.app = app
        self.v1_predict = _endpoint(routes, V1_PREDICT)
        self.v2_infer = _endpoint(routes, V2_INFER)

    def _match(self, path: str) -> tuple[Endpoint, dict[str, Any]] | None:
        """The endpoint and path parameters of an inference path, as Starlette would match them."""
        parts = path.split("/")  # ['', 'v1', 'models', name, 'predict'] and the v2 forms
        if len(parts) not in (5, 7) or parts[2] != "models" or not parts[3]:
            return None
        if len(parts) == 5:
            if parts[1] == "v1" and parts[4] == "predict":
                return self.v1_predict, {"model": parts[3]}
            if parts[1] == "v2" and parts[4] == "infer":
                return self.v2_infer, {"model": parts[3]}
        elif parts[1] == "v2" and parts[4] == "versions" and parts[5] and parts[6] == "infer":
            return self.v2_infer, {"model": parts[3], "version": parts[5]}
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = self._match(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        endpoint, params = match
        request = Request(scope, receive)
        try:
            request._body = await read_body(request)  # the endpoints' `await request.body()` returns it
            response = await endpoint(request=request, **params)
        except Exception as exc:
            response = response_for(exc, scope.get("state", {}).get("request_id"))
        await response(scope, receive, send)
