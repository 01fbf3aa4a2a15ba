"""Large JSON arrays of numbers read straight into numpy (protocols/numbers.py): the same array as
JSON + numpy for every rectangular nested list, however it is spaced and wherever the 1 MiB pieces
fall; refused exactly where JSON + numpy refuse; the key found only as a real field."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from exitserve.errors import InvalidInput
from exitserve.service.protocols import numbers
from exitserve.service.protocols.bodies import parse_body_with_numbers
from exitserve.service.protocols.v1 import PredictRequest


@pytest.fixture(autouse=True)
def tiny_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every array takes the numeric path, read in pieces of a few bytes: every boundary case occurs."""
    monkeypatch.setattr(numbers, "MIN_BYTES", 1)
    monkeypatch.setattr(numbers, "CHUNK_BYTES", 5)


def _fast(body: bytes) -> np.ndarray | None:
    span = numbers.numeric_span(body, b"inputs")
    return None if span is None else numbers.parse_numbers(body, *span, "inputs")


def _reference(body: bytes) -> np.ndarray:
    """What the JSON path makes of the same body (ValueError where it refuses)."""
    values = orjson.loads(body)["inputs"]
    array = np.asarray(values)
    if array.dtype.kind not in "iuf" or array.size == 0:
        raise ValueError("not numbers")
    with np.errstate(over="ignore"):
        return array.astype(np.float32)


shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)
values = shapes.flatmap(lambda shape: arrays(np.float32, shape, elements=st.floats(-1e6, 1e6, width=32)))


@settings(max_examples=300, deadline=None)
@given(x=values, indent=st.sampled_from([None, 1, 3]), separators=st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]))
def test_any_rectangular_list_reads_as_json_and_numpy_read_it(x: np.ndarray, indent: int | None,
                                                             separators: tuple[str, str]) -> None:
    body = json.dumps({"delta": 0.9, "inputs": x.tolist(), "policy": "pcee"}, indent=indent,
                      separators=separators).encode()
    got = _fast(body)
    assert got is not None and got.shape == x.shape and np.array_equal(got, x)


@settings(max_examples=500, deadline=None)
@given(x=values.filter(lambda a: a.size > 1), at=st.integers(0, 10_000), edit=st.sampled_from(
    ["", "[", "]", ",", " ", "-", "e", "1", "]]", ",[", "[]", "1 1", "x", '"']), drop=st.integers(0, 3))
def test_damaged_lists_are_refused_as_the_json_path_refuses_them(x: np.ndarray, at: int, edit: str, drop: int) -> None:
    text = json.dumps({"inputs": np.round(x).astype(int).tolist()})
    start = text.index("[")
    at = start + 1 + at % (len(text) - start - 2)
    body = (text[:at] + edit + text[at + drop:]).encode()
    try:
        expected = _reference(body)
    except (ValueError, orjson.JSONDecodeError, KeyError, TypeError):
        expected = None
    try:
        got = _fast(body)
    except InvalidInput:
        got = None
    if got is not None and not np.isfinite(got).all():
        got = None  # beyond float range: the dataplane refuses infinities whichever path read them
    if got is not None and expected is not None:
        assert got.shape == expected.shape and np.array_equal(got, expected), body
    elif got is not None:  # accepted here, refused by JSON: only numpy's leniency (e.g. "01") may do that,
        # or damage outside the array (a dropped "}"), which the body's own JSON parse refuses
        span = numbers.numeric_span(body, b"inputs")
        assert span is not None
        try:
            orjson.loads(body[span[0]:span[1]])
            outside = True
        except orjson.JSONDecodeError:
            outside = False
        assert b"[" in body and expected is None and (_lenient(body) or outside), body
        if outside and not _lenient(body):
            with pytest.raises(InvalidInput):
                parse_body_with_numbers(PredictRequest, body, "inputs")


def _lenient(body: bytes) -> bool:
    """Numbers numpy reads and JSON refuses: a leading zero or a leading '+' / '.' / trailing '.'."""
    import re

    return re.search(rb"(^|[\[, ])-?0\d|\+\d|(^|[\[, ])\.\d|\d\.([,\] ]|$)", body) is not None


def test_the_key_is_only_taken_as_a_real_field() -> None:
    inside_a_string = b'{"policy": "x\\"inputs", "inputs": [[1, 2]]}'
    parsed = parse_body_with_numbers(PredictRequest, inside_a_string, "inputs")
    assert isinstance(parsed.inputs, np.ndarray) and parsed.inputs.tolist() == [[1.0, 2.0]]
    # A nested "inputs" is no top-level field: the body is parsed as JSON (and refused for the unknown key).
    with pytest.raises(InvalidInput, match="unknown field"):
        parse_body_with_numbers(PredictRequest, b'{"junk": {"inputs": [[1, 2]]}, "inputs": [[3]]}', "inputs")
    with pytest.raises(InvalidInput, match="rectangular"):
        parse_body_with_numbers(PredictRequest, b'{"inputs": [[1, 2], [3]]}', "inputs")


def test_deep_nesting_is_refused_without_work() -> None:
    body = b'{"inputs": ' + b"[" * 100_000 + b"1" + b"]" * 100_000 + b"}"
    with pytest.raises(InvalidInput, match="at most 32 deep"):
        _fast(body)


@settings(max_examples=200, deadline=None)
@given(x=values, datatype=st.sampled_from(["FP32", "FP64", "FP16", "INT32"]), nested=st.booleans())
def test_v2_data_arrays_decode_as_the_json_path_decodes_them(x: np.ndarray, datatype: str, nested: bool) -> None:
    from exitserve.service.protocols import oip_codec

    dtype = oip_codec.DATATYPE_TO_NUMPY[datatype]
    data = np.round(x).astype(int) if datatype == "INT32" else np.clip(x, -6e4, 6e4).astype(np.float16) if datatype == "FP16" else x
    body = json.dumps({"inputs": [{"name": "a", "shape": list(x.shape), "datatype": datatype,
                                   "data": data.tolist() if nested else data.ravel().tolist()},
                                  {"name": "b", "shape": [1], "datatype": "FP64", "data": [0.5]}]}).encode()
    decoded = oip_codec.decode_infer_request(body, None).inputs
    assert decoded["a"].dtype == dtype and np.array_equal(decoded["a"], data.astype(dtype))
    assert decoded["b"].tolist() == [0.5]
