"""One error hierarchy for exitserve: every error a client can cause carries its HTTP status.

The serving layers raise these; `exitserve.service.protocols.errors` is the one place that turns them
into responses (for every protocol), and the CLI prints them as one `error: ...` line. This module
imports nothing from the package, so every layer (models, calibration, service) may use it.
"""

from __future__ import annotations

from typing import ClassVar


class ExitserveError(Exception):
    """Base class: the message says what is wrong and where; `status` is the HTTP status to answer with."""

    status: ClassVar[int] = 500
    default_headers: ClassVar[dict[str, str]] = {}

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = {**self.default_headers, **(headers or {})}

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidInput(ExitserveError, ValueError):
    status = 400


class Unauthorized(ExitserveError):
    status = 401
    default_headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(ExitserveError):
    status = 403


class NotFound(ExitserveError, LookupError):
    status = 404


class Conflict(ExitserveError):
    """The request is valid but the server's state refuses it now (warming up, feature switched off)."""

    status = 409


class PayloadTooLarge(ExitserveError):
    status = 413


class UnsupportedMediaType(ExitserveError):
    status = 415


class BadBundle(ExitserveError, ValueError):
    """A bundle (manifest, segments, calibration) that cannot be served; names the file and the problem."""

    status = 422


class ClientGone(ExitserveError):
    """The client hung up mid-request: nobody to answer, and not a server fault (nginx's 499)."""

    status = 499


class Unavailable(ExitserveError):
    """The server cannot answer this now (warm-up failed, a dependency is down)."""

    status = 503


class Overloaded(Unavailable):
    """An expected refusal under load: retry after a second."""

    default_headers = {"Retry-After": "1"}


class QueueFull(Overloaded):
    """A model's waiting queue (or the generator's) has no room for this request."""


class ShuttingDown(Overloaded):
    """The server (or a retired model) takes no new work; another replica, or this one later, will."""

    default_headers = {"Retry-After": "5"}


class Timeout(ExitserveError):
    status = 504
