"""The one place that turns errors into responses, for every protocol: `{"error": message}` with the status
the error class carries (exitserve.errors), a Retry-After where it says so, and a logged 500 for bugs."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from exitserve.errors import ClientGone, ExitserveError

log = logging.getLogger("exitserve.http")


def printable(message: str) -> str:
    """The message as valid UTF-8 text: a lone surrogate quoted from a client's body is escaped."""
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:
        return message.encode("utf-8", "backslashreplace").decode("utf-8")
    return message


def error_response(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps({"error": printable(message)}), status_code=status, media_type="application/json",
                    headers=headers)


def response_for(exc: Exception, request_id: str | None) -> Response:
    """The response for an error raised while answering a request (every route, every protocol)."""
    if isinstance(exc, ExitserveError):
        if isinstance(exc, ClientGone):
            log.info("client disconnected before sending its whole body", extra={"request_id": request_id})
        return error_response(str(exc), exc.status, exc.headers or None)
    if isinstance(exc, ClientDisconnect):
        # The client hung up mid-body: no one to answer and not a server fault, so neither an ERROR
        # log nor a 5xx in the request metrics.
        log.info("client disconnected before sending its whole body", extra={"request_id": request_id})
        return error_response("client closed the request", ClientGone.status)
    log.error("unhandled error", exc_info=exc, extra={"request_id": request_id})
    return error_response("internal server error", 500)


def install_error_handlers(app: FastAPI) -> None:
    def request_id(request: Request) -> str | None:
        return getattr(request.state, "request_id", None)

    @app.exception_handler(ExitserveError)
    async def exitserve_error(request: Request, exc: ExitserveError) -> Response:
        return response_for(exc, request_id(request))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(f"{where}: {first.get('msg')}", 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return error_response(str(exc.detail), exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        return response_for(exc, request_id(request))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        return response_for(exc, request_id(request))
