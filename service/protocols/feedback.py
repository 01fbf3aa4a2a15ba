"""Labelled feedback: `POST /v1/models/{model}/feedback` with `[{request_id, index, label}]`.

`request_id` is the server's request id of the prediction (`request_id` in a v1 answer, the
X-Request-Id response header for v1 and v2 alike; a client may choose it by sending X-Request-Id),
`index` the sample's position in that request, `label` the true class as a name or an index.

What a client gets wrong is a 400 and nothing is scored (a malformed item, a label the model does
not know, an index past the end of a request the server remembers). A request id the server does
not remember (expired, evicted, answered by another replica, never seen) is not an error: ids age
out by design, so the item is answered with status "unknown" and counted in
`exitserve_feedback_unmatched_total{reason="unknown"}`. A sample labelled twice is scored once
(status "duplicate"), so a client may retry a feedback call safely. Same API-key rule as predict.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from exitserve.errors import Conflict, InvalidInput, Overloaded, PayloadTooLarge
from exitserve.service.protocols.bodies import StrictBody, parse_off_loop, validate
from exitserve.service.protocols.routes import V1_FEEDBACK
from exitserve.service.serving.context import MAX_REQUEST_ID_CHARS
from exitserve.service.serving.repository import ModelRepository, ServedModel

MAX_ITEMS = 10_000
# JSON bytes an item may take at most: an id of MAX_REQUEST_ID_CHARS characters written as \uXXXX
# escapes, a label name likewise, the keys and an index. The body limit is MAX_ITEMS of them.
ITEM_OVERHEAD_BYTES = 96


def body_limit(served: ServedModel) -> int:
    """The feedback body limit of this model, from the item limit (issue 30): a few MiB, not 64."""
    longest_label = max((len(label) for label in served.manifest.labels), default=0)
    return MAX_ITEMS * (6 * MAX_REQUEST_ID_CHARS + 6 * max(longest_label, 10) + ITEM_OVERHEAD_BYTES)


def _parse(body: bytes) -> Any:
    # Counted before parsing: a body of more than MAX_ITEMS objects (or of a long array of anything)
    # would cost far more as Python objects than as bytes ([{},{},...]: 64 bytes of dict per 3 of JSON).
    # An item holds one object, two commas and ten quotes; ids with such characters in them are rare.
    if body.count(b"{") > MAX_ITEMS or body.count(b",") > 4 * MAX_ITEMS or body.count(b'"') > 12 * MAX_ITEMS:
        raise PayloadTooLarge(f"body: more than the limit of {MAX_ITEMS} items per call")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"body: invalid JSON ({exc})") from None


class FeedbackItem(StrictBody):
    request_id: str = Field(min_length=1, max_length=MAX_REQUEST_ID_CHARS, description="request id of the prediction (v1 `request_id`, or the X-Request-Id header)")
    index: int = Field(ge=0, description="position of the sample in that request, from 0")
    label: str | int = Field(description="the true class: a label name or a class index")


class FeedbackResult(BaseModel):
    status: str = Field(description="scored, unknown (request not remembered) or duplicate (labelled before)")
    correct: bool | None = None
    exit: int | None = None
    estimated_accuracy: float | None = None


class FeedbackResponse(BaseModel):
    model: str
    scored: int
    correct: int
    unknown: int
    duplicate: int
    results: list[FeedbackResult]


def parse_items(served: ServedModel, payload: Any) -> list[tuple[str, int, int]]:
    """(request id, index, class index) per item, or InvalidInput naming the first bad item."""
    if not isinstance(payload, list):
        raise InvalidInput("body: must be a JSON array of {request_id, index, label}")
    if not payload:
        raise InvalidInput("body: empty array")
    if len(payload) > MAX_ITEMS:
        raise PayloadTooLarge(f"body: {len(payload)} items exceed the limit of {MAX_ITEMS} per call")
    labels = served.manifest.labels
    by_name = {name: i for i, name in enumerate(labels)}
    out = []
    for i, raw in enumerate(payload):
        item = validate(FeedbackItem, raw, prefix=f"[{i}]")
        request_id, index, label = item.request_id, item.index, item.label
        if isinstance(label, str):
            if label not in by_name:
                raise InvalidInput(f"[{i}].label: {label!r} is not a class of model {served.name!r}")
            label = by_name[label]
        elif not 0 <= label < len(labels):
            raise InvalidInput(f"[{i}].label: class index {label} outside [0, {len(labels)})")
        out.append((request_id, index, label))
    return out


def build_router(repository: ModelRepository) -> APIRouter:
    router = APIRouter(tags=["v1"])

    @router.post(
        V1_FEEDBACK.path,
        response_model=FeedbackResponse,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"type": "array", "items": FeedbackItem.model_json_schema()}}}}},
        summary="Score earlier predictions against true labels (accuracy monitoring, recalibration log)",
    )
    async def feedback(model: str, request: Request) -> Response:
        served = repository.get(model)
        if not served.monitor.store.enabled:
            raise Conflict("feedback is off on this server (EXITSERVE_FEEDBACK_CAPACITY=0)")
        # The inference routes' admission: a fast 503 when the model is overloaded, and large bodies
        # parsed off the event loop, a bounded number at a time (the edge limits the size: body_limit).
        if not served.ready:
            raise Overloaded(f"model {served.name!r} is not ready")
        served.batcher.check_room()
        raw = await request.body()
        payload = await parse_off_loop(len(raw), _parse, raw)
        wanted = parse_items(served, payload)
        # Off the loop: the feedback log's write and, with a shared store, Redis round trips.
        # An index outside a known request is a 400 (UnknownIndex).
        scored = await asyncio.to_thread(served.monitor.score, wanted)
        results: list[dict[str, object]] = []
        counts = {"scored": 0, "correct": 0, "unknown": 0, "duplicate": 0}
        for s in scored:
            counts[s.status] += 1
            if s.decision is None:
                results.append({"status": s.status})
                continue
            counts["correct"] += bool(s.correct)
            results.append({"status": s.status, "correct": s.correct, "exit": s.decision.exit,
                            "estimated_accuracy": s.decision.estimate})
        body = {"model": served.name, **counts, "results": results}
        return Response(orjson.dumps(body), media_type="application/json")

    return router
