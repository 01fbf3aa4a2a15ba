"""Per-request context the edge middleware sets and the dataplane reads (one asyncio task per request)."""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Any

# The request id decisions are recorded under (labelled feedback): X-Request-Id, generated when absent,
# or an Open Inference Protocol request's `id`.
REQUEST_ID: ContextVar[str | None] = ContextVar("exitserve_request_id", default=None)
# Done when the client hung up after sending its request: queued work for it is dropped, not computed.
CLIENT_GONE: ContextVar[asyncio.Future | None] = ContextVar("exitserve_client_gone", default=None)
# Longest request id kept (X-Request-Id or an OIP `id`): ids are stored in the decision record for an hour.
MAX_REQUEST_ID_CHARS = 128
# Room the edge reserved for this request in its model's queue, on its headers; released when queued.
RESERVATION: ContextVar[Any] = ContextVar("exitserve_reservation", default=None)
