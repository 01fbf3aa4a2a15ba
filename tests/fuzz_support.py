"""Hostile bodies for every JSON and binary route (issue 30): valid bodies of v1, v2 (JSON and binary),
feedback and the OpenAI endpoints, mutated by Hypothesis at any field or key with random Unicode
(lone surrogates included), random bytes, odd numbers and nesting, then written as JSON with or
without `ensure_ascii` (a lone surrogate becomes an escape, or invalid UTF-8), sometimes with bytes
spliced in. Shared by tests/service/protocols/test_decode_totality.py and benchmarks/fuzz_bodies.py."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import numpy as np
from hypothesis import strategies as st

DIGITS = "digits"  # the digits fixture bundle: 1 x 8 x 8 float32 inputs, 10 classes
LLM = "tiny-llm"  # llm_support.write_tiny_generation_bundle
ROUTES = {
    "v1": f"/v1/models/{DIGITS}/predict",
    "v2-json": f"/v2/models/{DIGITS}/infer",
    "v2-binary": f"/v2/models/{DIGITS}/infer",
    "feedback": f"/v1/models/{DIGITS}/feedback",
    "completions": "/v1/completions",
    "chat": "/v1/chat/completions",
}
_IMAGE = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 1, 8, 8)
_BASES: dict[str, list[Any]] = {
    "v1": [
        {"inputs": _IMAGE.tolist(), "delta": 0.9},
        {"inputs": {"b64": base64.b64encode(_IMAGE.tobytes()).decode(), "dtype": "float32", "shape": [1, 1, 8, 8]},
         "delta": [0.8], "policy": "pcee", "return_probabilities": True},
    ],
    "v2-json": [
        {"id": "a", "parameters": {"delta": 0.9, "policy": "pcee"},
         "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": _IMAGE.ravel().tolist()},
                    {"name": "delta", "shape": [1], "datatype": "FP64", "data": [0.9]}],
         "outputs": [{"name": "label"}, {"name": "exit", "parameters": {"binary_data": False}}]},
        {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["ab", "c"]}]},
    ],
    "v2-binary": [
        {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                     "parameters": {"binary_data_size": 256}}],
         "outputs": [{"name": "class_index", "parameters": {"binary_data": True}}]},
    ],
    "feedback": [[{"request_id": "never-seen", "index": 0, "label": 1}, {"request_id": "x", "index": 2, "label": "3"}]],
    "completions": [{"model": LLM, "prompt": "hi", "max_tokens": 2, "temperature": 0, "delta": 0.9},
                    {"model": LLM, "prompt": [1, 2, 3], "max_tokens": 1, "stop": ["x"], "policy": "pcee"}],
    "chat": [{"model": LLM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}],
}

surrogates = st.characters(categories=["Cs"])
hostile_text = st.text(st.characters() | surrogates | st.sampled_from(["\x00", "\ufffd", "\u202e", "\\", '"']),
                       max_size=24)
hostile_scalar = st.one_of(
    hostile_text, st.sampled_from(["\ud800", "a\udfffb", "0.9", "1", "", " ", "NaN", "pcee"]),
    st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()), st.binary(max_size=32).map(lambda b: b.decode("latin-1")),
    st.integers(-(2**70), 2**70), st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64]), st.floats(allow_nan=True),
    st.booleans(), st.none())
hostile_value = st.recursive(hostile_scalar, lambda inner: st.lists(inner, max_size=4)
                             | st.dictionaries(hostile_text, inner, max_size=3), max_leaves=8)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON value: the root, each dict value and each of the first list items."""
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:3]):
            out += _paths(item, (*prefix, index))
    return out


def _replace(value: Any, path: tuple, new: Any, rename: bool) -> Any:
    if not path:
        return new
    parent = value
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if rename and isinstance(parent, dict):
        parent[str(new) if not isinstance(new, str) else new] = parent.pop(last)
    else:
        parent[last] = new
    return value


def _encode(value: Any, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True).encode("utf-8", "surrogatepass")


def body_for(route: str, index: int = 0) -> tuple[bytes, dict[str, str]]:
    """An unmutated body of the route, and its headers."""
    base = _BASES[route][index]
    if route == "v2-binary":
        header = _encode(base, True)
        return header + _IMAGE.tobytes(), {"Inference-Header-Content-Length": str(len(header))}
    return _encode(base, True), {"Content-Type": "application/json"}


@st.composite
def fuzzed_bodies(draw: st.DrawFn, route: str) -> tuple[str, bytes, dict[str, str]]:
    """(route, body, headers): a valid body of the route mutated one to three times."""
    body = copy.deepcopy(draw(st.sampled_from(_BASES[route])))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(body)))
        body = _replace(body, path, draw(hostile_value), rename=draw(st.integers(0, 4)) == 0)
    content = _encode(body, draw(st.booleans()))
    headers = {"Content-Type": "application/json"}
    if route == "v2-binary":
        tail = draw(st.sampled_from([_IMAGE.tobytes()]) | st.binary(max_size=300))
        headers = {"Inference-Header-Content-Length": str(len(content))}
        content += tail
    if draw(st.integers(0, 5)) == 0:  # raw bytes spliced into the text
        at = draw(st.integers(0, len(content)))
        content = content[:at] + draw(st.binary(min_size=1, max_size=16)) + content[at:]
    return route, content, headers
