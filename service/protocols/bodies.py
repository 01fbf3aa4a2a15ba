"""JSON bodies parsed by their pydantic schemas (strict types, unknown keys refused): the schema is the validator.

Strict means `"delta": "0.9"` or `true` is refused where the schema says a number. A validation error
becomes one 400 that names the field, e.g. `delta: Input should be a valid number`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from exitserve.errors import InvalidInput
from exitserve.service.protocols import numbers

Schema = TypeVar("Schema", bound=BaseModel)
T = TypeVar("T")
# Bodies above this are parsed off the event loop, two at a time: parsing a 60 MiB JSON of numbers
# costs about a second and a gigabyte, which must neither stall /healthz nor run many times at once.
OFFLOAD_BYTES = 4 << 20
PARALLEL_BIG_PARSES = 2
_big_parse: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}


async def parse_off_loop(size: int, parse: Callable[..., T], *args: object) -> T:
    """`parse(*args)` on the loop for small bodies; in a worker thread, a bounded number at a time, otherwise."""
    if size <= OFFLOAD_BYTES:
        return parse(*args)
    loop = asyncio.get_running_loop()
    gate = _big_parse.setdefault(loop, asyncio.Semaphore(PARALLEL_BIG_PARSES))
    async with gate:
        return await asyncio.to_thread(parse, *args)


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _field_names(schema: type[BaseModel], seen: set[type[BaseModel]] | None = None) -> set[str]:
    """Every field name of the schema and the models nested in it (to tell a path from a union branch tag)."""
    seen = seen if seen is not None else set()
    if schema in seen:
        return set()
    seen.add(schema)
    names = set(schema.model_fields)
    for field in schema.model_fields.values():
        for arg in _nested_models(field.annotation):
            names |= _field_names(arg, seen)
    return names


def _nested_models(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out = []
    for arg in getattr(annotation, "__args__", ()):
        out.extend(_nested_models(arg))
    return out


def describe(exc: ValidationError, schema: type[BaseModel], prefix: str = "") -> str:
    """The first error as `where: what`, with pydantic's union-branch tags left out of `where`."""
    # Of a union's branch errors the deepest is the one the client meant (a dict given for `inputs`
    # fails the list branch at `inputs` but the raw-tensor branch at `inputs.dtype`).
    first = max(exc.errors(), key=lambda e: len(e["loc"]))
    names = _field_names(schema)
    if first["type"] == "extra_forbidden":
        names = names | {str(first["loc"][-1])}
    where = prefix
    for part in first["loc"]:
        if isinstance(part, int):
            where += f"[{part}]"
        elif part in names:
            where += f".{part}" if where else part
    where = where or "body"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    return f"{where}: {message}"


def parse_body(schema: type[Schema], body: bytes, prefix: str = "") -> Schema:
    # orjson first: strict JSON (no NaN tokens) and faster on big nested number lists than the
    # schema's own JSON mode; then the schema validates the Python objects, strictly.
    where = prefix or "body"
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{where}: invalid JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise InvalidInput(f"{where}: must be a JSON object")
    return validate(schema, payload, prefix)


def parse_body_with_numbers(schema: type[Schema], body: bytes, key: str) -> Schema:
    """`parse_body`, with a large array of numbers at the top-level field `key` read straight into a
    float32 numpy array (protocols/numbers.py: no Python float per number): the field then holds it."""
    if len(body) >= numbers.MIN_BYTES:
        span = numbers.numeric_span(body, key.encode())
        if span is not None:
            start, end = span
            parsed = parse_body(schema, body[:start] + b"[]" + body[end:])
            if getattr(parsed, key) == []:  # the span was that field's value, not text inside a string
                return parsed.model_copy(update={key: numbers.parse_numbers(body, start, end, key)})
    return parse_body(schema, body)


def validate(schema: type[Schema], payload: object, prefix: str = "") -> Schema:
    try:
        return schema.model_validate(payload)
    except ValidationError as exc:
        raise InvalidInput(describe(exc, schema, prefix)) from None
