"""Per-request context the edge middleware sets and the dataplane reads (one asyncio task per request)."""

from __future__ import annotations

from contextvars import ContextVar

# The request id decisions are recorded under (labelled feedback): X-Request-Id, generated when absent,
# or an Open Inference Protocol request's `id`.
REQUEST_ID: ContextVar[str | None] = ContextVar("exitserve_request_id", default=None)
