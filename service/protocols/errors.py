"""The one place that turns errors into responses: every error is an exception carrying its status
(exitserve.errors), raised where it happens — the edge's refusals included — and answered here in
the shape of its protocol family:

* v1, Open Inference Protocol v2 and every other route: `{"error": message}`;
* the OpenAI routes: OpenAI's `{"error": {"message", "type", "param", "code"}}`, so that the `openai`
  client shows the message.

A Retry-After (or WWW-Authenticate) goes out where the class says so; a bug is a logged 500.
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from exitserve.errors import ClientGone, ExitserveError
from exitserve.service.protocols.routes import OPENAI_PATHS  # their errors take OpenAI's shape

log = logging.getLogger("exitserve.http")


def family_of(path: str) -> str:
    """"openai" for the OpenAI routes, else "oip" (v1 and v2 share the JSON error shape)."""
    return "openai" if path.rstrip("/") in OPENAI_PATHS else "oip"


def printable(message: str) -> str:
    """The message as valid UTF-8 text: a lone surrogate quoted from a client's body is escaped."""
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:
        return message.encode("utf-8", "backslashreplace").decode("utf-8")
    return message


def error_response(message: str, status: int, headers: dict[str, str] | None = None, family: str = "oip") -> Response:
    message = printable(message)
    if family == "openai":
        kind = "invalid_request_error" if status < 500 else ("server_overloaded" if status == 503 else "server_error")
        body: dict = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    else:
        body = {"error": message}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def response_for(exc: Exception, request_id: str | None, family: str = "oip") -> Response:
    """The response for an error raised while answering a request (every route, every protocol)."""
    if isinstance(exc, ExitserveError):
        if isinstance(exc, ClientGone):
            log.info("client disconnected before sending its whole body", extra={"request_id": request_id})
        return error_response(str(exc), exc.status, exc.headers or None, family)
    if isinstance(exc, ClientDisconnect):
        # The client hung up mid-body: no one to answer and not a server fault, so neither an ERROR
        # log nor a 5xx in the request metrics.
        log.info("client disconnected before sending its whole body", extra={"request_id": request_id})
        return error_response("client closed the request", ClientGone.status, family=family)
    log.error("unhandled error", exc_info=exc, extra={"request_id": request_id})
    return error_response("internal server error", 500, family=family)


def install_error_handlers(app: FastAPI) -> None:
    def request_id(request: Request) -> str | None:
        return getattr(request.state, "request_id", None)

    @app.exception_handler(ExitserveError)
    async def exitserve_error(request: Request, exc: ExitserveError) -> Response:
        return response_for(exc, request_id(request), family_of(request.url.path))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(f"{where}: {first.get('msg')}", 400, family=family_of(request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(str(exc.detail), exc.status_code, getattr(exc, "headers", None), family_of(request.url.path))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        return response_for(exc, request_id(request), family_of(request.url.path))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        return response_for(exc, request_id(request), family_of(request.url.path))
