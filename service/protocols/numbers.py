"""Large JSON arrays of numbers read straight into numpy, in bounded chunks (issue 30).

A JSON parser builds a Python float (and a list slot) per number: 32 bytes for a number that takes 3
to 12 bytes of text, so a 60 MiB body of pixels cost +962 MB, and orjson holds the interpreter for
the whole parse (1.3 s without an answer for anybody). Here the array's bytes are found in the body
and read in 1 MiB pieces into a float32 array: the peak is the body plus the array (4 bytes a number)
plus a piece, and other requests run between pieces. The rest of the body (a few keys) goes to the
ordinary JSON parser with the array replaced by `[]`.

Strictness: the array must hold only numbers, nested rectangularly; `[1 2]`, `[1,,2]`, `[]` inside,
ragged rows and non-numbers are refused as the JSON path refuses them. More lenient than JSON in one
way: numpy also reads `+1`, `.5`, `5.` and `01` as numbers.
"""

from __future__ import annotations

import math
import re

import numpy as np

from exitserve.errors import InvalidInput

MIN_BYTES = 1 << 20  # smaller arrays take the ordinary JSON path
CHUNK_BYTES = 1 << 20
MAX_DEPTH = 32
_SPACE = b" \t\r\n"
_NUMBER = b"0123456789+-.eE"
_IN_ARRAY = _NUMBER + _SPACE + b",[]"
_BRACKETS_TO_SPACES = bytes.maketrans(b"[]", b"  ")
_SPACES = re.compile(rb"[ \t\r\n]*")
_EMPTY_ELEMENT = (b",,", b"[,", b",]", b"[]")


def numeric_span(body: bytes, key: bytes, start: int = 0) -> tuple[int, int] | None:
    """(start, end) of the first `"key": [...]` value from `start` on of at least MIN_BYTES made only of numbers,
    commas, brackets and spaces; None when there is none (the caller parses the body as usual).

    Where the key was found is not trusted (it could sit inside a string): the caller checks that the
    rest of the body, parsed as JSON, holds `[]` at that key."""
    quoted = b'"' + key + b'"'
    at = body.find(quoted, start)
    while at >= 0:
        p = _SPACES.match(body, at + len(quoted)).end()  # type: ignore[union-attr]
        if body[p:p + 1] == b":":
            p = _SPACES.match(body, p + 1).end()  # type: ignore[union-attr]
            if body[p:p + 1] == b"[":
                end = body.rfind(b"]", p, _run_end(body, p))
                if end >= 0 and end + 1 - p >= MIN_BYTES:
                    return p, end + 1
        at = body.find(quoted, at + 1)
    return None


def _run_end(body: bytes, start: int) -> int:
    """Index of the first byte from `start` that cannot be part of a numeric array (or the length)."""
    for a in range(start, len(body), CHUNK_BYTES):
        chunk = body[a:a + CHUNK_BYTES]
        foreign = chunk.translate(None, _IN_ARRAY)
        if foreign:
            return a + chunk.find(foreign[:1])  # the first foreign byte: every earlier byte is allowed
    return len(body)


def parse_numbers(body: bytes, start: int, end: int, where: str, dtype: type[np.floating] = np.float32) -> np.ndarray:
    """body[start:end], a nested JSON array of numbers, as a float array of its nested shape."""
    skeleton = b"".join(body[a:min(a + CHUNK_BYTES, end)].translate(None, _NUMBER + _SPACE)
                        for a in range(start, end, CHUNK_BYTES))
    shape = _shape(skeleton, where)
    if _skeleton(shape) != skeleton:
        raise InvalidInput(f"{where}: must be a rectangular nested list of numbers")
    del skeleton
    out = np.empty(math.prod(shape), dtype)
    filled, a = 0, start
    while a < end:
        c = body.find(b",", min(a + CHUNK_BYTES, end), end)
        c = end if c < 0 else c
        piece = body[a:c]
        compact = piece.translate(None, _SPACE)
        if (not compact or compact[:1] in b",]" or compact[-1:] in b",[" or any(e in compact for e in _EMPTY_ELEMENT)):
            raise InvalidInput(f"{where}: must be a rectangular nested list of numbers (an empty element)")
        try:
            values = np.fromstring(bytes(piece.translate(_BRACKETS_TO_SPACES)), dtype=dtype, sep=",")
        except ValueError:
            raise InvalidInput(f"{where}: must be a rectangular nested list of numbers (not strings or booleans)") from None
        if filled + len(values) > out.size:
            raise InvalidInput(f"{where}: must be a rectangular nested list of numbers")
        out[filled:filled + len(values)] = values
        filled, a = filled + len(values), c + 1
    if filled != out.size:
        raise InvalidInput(f"{where}: must be a rectangular nested list of numbers")
    return out.reshape(shape)


def _shape(skeleton: bytes, where: str) -> tuple[int, ...]:
    """The shape a rectangular array with this skeleton (its brackets and commas) has, from the first
    element at each depth: a list of n elements whose skeletons take L bytes takes n (L + 1) + 1."""
    depth = len(skeleton) - len(skeleton.lstrip(b"["))
    if not 0 < depth <= MAX_DEPTH:
        raise InvalidInput(f"{where}: must be a rectangular nested list of numbers at most {MAX_DEPTH} deep")
    shape = [0] * depth
    inner = 0  # skeleton bytes of one element one level down (a number: none)
    for k in range(depth - 1, -1, -1):
        close = skeleton.find(b"]" * (depth - k))
        length = close + (depth - k) - k
        n, rest = divmod(length - 1, inner + 1)
        if close < 0 or rest or n < 1:
            raise InvalidInput(f"{where}: must be a rectangular nested list of numbers")
        shape[k], inner = n, length
    return tuple(shape)


def _skeleton(shape: tuple[int, ...]) -> bytes:
    element = b""
    for n in reversed(shape):
        # Repetition, not b",".join([element] * n): join keeps a buffer record (~80 bytes) per item.
        element = b"[" + (element + b",") * (n - 1) + element + b"]"
    return element
