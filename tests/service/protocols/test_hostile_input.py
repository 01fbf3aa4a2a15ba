"""Hostile and malformed input on both protocols, beyond test_server.py: size limits, lying binary
headers, compression bombs, slow clients, and property-based fuzzing. Every bad request is a 4xx
with {"error": "..."} naming the problem, no request is ever a 5xx, and a good request right after
each one still succeeds."""

from __future__ import annotations

import base64
import gzip
import json
import re
import socket
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import MODEL, metric, percentiles, raw_tensor

from exitserve.calibration import POLICIES
from exitserve.models.data import load_dataset

MAX_BODY = 65536
MAX_SAMPLES = 64
TRIED: Counter[str] = Counter()  # bad inputs sent, by kind (printed for BENCHMARKS.md)
SERVER_COUNTED: dict[str, float] = {}


@pytest.fixture(scope="module")
def server(digits_bundle: Path):
    with running_server([digits_bundle], env={"EXITSERVE_MAX_BODY_BYTES": str(MAX_BODY),
                                               "EXITSERVE_MAX_REQUEST_SAMPLES": str(MAX_SAMPLES)}) as proc:
        yield proc
        print(f"\nbad inputs tried, by kind: {dict(sorted(TRIED.items()))} (total {sum(TRIED.values())})")
        logs = proc.logs()
        assert "unhandled error" not in logs
        if SERVER_COUNTED:
            entries = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
            logged = sum(1 for e in entries if e.get("message") == "request" and e.get("protocol") in ("v1", "v2"))
            assert logged == SERVER_COUNTED["v1+v2"], (logged, SERVER_COUNTED)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return load_dataset("digits:test").x[:8]


def good_request_succeeds(client: httpx.Client, x: np.ndarray) -> None:
    response = client.post(f"/v1/models/{MODEL}/predict", json={"inputs": raw_tensor(x[:2])})
    assert response.status_code == 200, response.text


def assert_clear_4xx(response: httpx.Response, status: int, message: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert isinstance(error, str) and re.search(message, error), error


def v2_binary(x: np.ndarray, header_extra: dict | None = None, size: int | None = None, tail: bytes | None = None,
              outputs: list[dict] | None = None) -> tuple[bytes, dict[str, str]]:
    """A binary-extension infer body as tritonclient builds it, with knobs to make it lie."""
    data = np.ascontiguousarray(x, "<f4").tobytes() if tail is None else tail
    header = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                          "parameters": {"binary_data_size": len(data) if size is None else size}}],
              **({"outputs": outputs} if outputs else {}), **(header_extra or {})}
    raw = json.dumps(header).encode()
    return raw + data, {"Inference-Header-Content-Length": str(len(raw)), "Content-Type": "application/octet-stream"}


JSON = {"Content-Type": "application/json"}
V1 = f"/v1/models/{MODEL}/predict"
V2 = f"/v2/models/{MODEL}/infer"


def test_size_limits_both_protocols(client, x) -> None:
    big = np.zeros((MAX_SAMPLES + 1, 1, 8, 8), np.float32)
    cases = [
        ("huge batch", "post", V1, {"json": {"inputs": raw_tensor(big)}}, 413, f"{MAX_SAMPLES + 1} samples exceed the limit of {MAX_SAMPLES}"),
        ("huge batch", "post", V2, dict(zip(("content", "headers"), v2_binary(big), strict=True)), 413, "exceed the limit"),
        ("body over limit", "post", V1, {"content": b" " * (MAX_BODY + 1)}, 413, f"exceeds the limit of {MAX_BODY}"),
        ("body over limit", "post", V2, {"content": b" " * (MAX_BODY + 1)}, 413, f"exceeds the limit of {MAX_BODY}"),
        # No Content-Length: the limit must hold while the chunked body streams in.
        ("chunked body over limit", "post", V1, {"content": iter([b" " * 8192] * 10), "headers": JSON}, 413,
         f"limit of {MAX_BODY} bytes"),
        ("chunked body over limit", "post", V2, {"content": iter([b" " * 8192] * 10)}, 413, f"limit of {MAX_BODY} bytes"),
        # 4 MiB of zeros gzipped to ~4 KiB: inflating must stop at the limit.
        ("compression bomb", "post", V2, {"content": gzip.compress(b"0" * (4 << 20)), "headers": {"Content-Encoding": "gzip"}},
         400, "limit"),
    ]
    for kind, method, path, kwargs, status, message in cases:
        TRIED[kind] += 1
        assert_clear_4xx(client.request(method.upper(), path, **kwargs), status, message)
        good_request_succeeds(client, x)


def test_lying_and_truncated_binary_headers(client, x) -> None:
    body, headers = v2_binary(x[:2])
    json_length = int(headers["Inference-Header-Content-Length"])
    cases = [
        ("header length not a number", body, {**headers, "Inference-Header-Content-Length": "12abc"}, "must be an integer"),
        ("header length negative", body, {**headers, "Inference-Header-Content-Length": "-4"}, "must not be negative"),
        ("header length past the body", body, {**headers, "Inference-Header-Content-Length": str(len(body) + 1)}, "has only"),
        ("header length cuts the JSON", body, {**headers, "Inference-Header-Content-Length": str(json_length - 7)}, "not valid JSON"),
        ("header length too long", body, {**headers, "Inference-Header-Content-Length": str(json_length + 9)}, "not valid (JSON|UTF-8)|binary_data_size"),
        ("truncated tensor bytes", body[:-100], headers, "binary_data_size values sum to 512 bytes but 412"),
        ("extra tensor bytes", body + b"\0" * 16, headers, "but 528 bytes follow"),
        ("binary size disagrees with shape", *v2_binary(x[:2], size=256, tail=b"\0" * 256), "needs 512"),
        ("binary without header length", body, {"Content-Type": "application/octet-stream"}, "not valid JSON|UTF-8"),
        ("unknown output name", *v2_binary(x[:2], outputs=[{"name": "logits_0"}]), "output 'logits_0' is not an output"),
        ("unknown parameter", *v2_binary(x[:2], header_extra={"parameters": {"deltaa": 0.9}}), "parameters.deltaa: unknown field"),
        ("policy unknown", *v2_binary(x[:2], header_extra={"parameters": {"policy": "../../etc"}}), "unknown policy"),
    ]
    for kind, content, hdrs, message in cases:
        TRIED[kind] += 1
        assert_clear_4xx(client.post(V2, content=content, headers=hdrs), 400, message)
        good_request_succeeds(client, x)
    ok_body, ok_headers = v2_binary(x[:2])
    assert client.post(V2, content=ok_body, headers=ok_headers).status_code == 200


def test_malformed_requests_both_protocols(client, x) -> None:
    deep = b'{"inputs": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"  # under the body limit
    cases = [
        ("invalid JSON", V1, b'{"inputs": [1, 2', 400, "invalid JSON"),
        ("invalid JSON", V2, b'{"inputs": [1, 2', 400, "not valid JSON"),
        ("JSON not an object", V1, b"[1, 2, 3]", 400, "JSON object"),
        ("JSON not an object", V2, b"[1, 2, 3]", 400, "object"),
        ("not UTF-8", V2, b'{"id": "\xff\xfe"}', 400, "UTF-8|JSON"),
        ("nested too deep", V1, deep, 400, "JSON|nested|rectangular"),
        ("nested too deep", V2, deep, 400, "JSON|nested"),
        ("integer too big", V1, b'{"inputs": [[[[1e999999]]]]}', 400, "JSON|NaN or infinity"),
        ("shape overflows", V1, json.dumps({"inputs": {"b64": "", "dtype": "float32", "shape": [2**32, 2**32, 1, 1]}}).encode(),
         400, "shape|bytes|match"),
        ("negative shape", V2, json.dumps({"inputs": [{"name": "input", "shape": [-1, 1, 8, 8], "datatype": "FP32", "data": []}]}).encode(),
         400, "shape"),
        ("bytes input for a float model", V2, json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}).encode(),
         400, "shape|dtype|BYTES"),
        ("datatype not a string", V2, json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": ["FP32"],
                                                               "data": [0.0] * 64}]}).encode(), 400, "unknown datatype"),
        ("delta as tensor of text", V2, json.dumps({"inputs": [
            {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64},
            {"name": "delta", "shape": [1], "datatype": "BYTES", "data": ["high"]}]}).encode(), 400, "delta"),
        ("delta nan", V2, json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}],
                                      "parameters": {"delta": "NaN"}}).encode(), 400, "delta"),
        ("return_probabilities not bool", V1, json.dumps({"inputs": [[[[0.0] * 8] * 8]], "return_probabilities": "yes"}).encode(),
         400, "return_probabilities"),
        ("inputs a string", V1, b'{"inputs": "zeros"}', 400, "inputs"),
        # Zero-size tensors whose shapes numpy cannot build (each was a 500).
        ("zero-size huge shape", V1, json.dumps({"inputs": {"b64": "", "dtype": "float32", "shape": [0, 2**62]}}).encode(),
         400, "shape"),
        ("too many axes", V1, json.dumps({"inputs": {"b64": "", "dtype": "float32", "shape": [0] + [1] * 69}}).encode(),
         400, "shape"),
        ("zero-size huge shape", V2, json.dumps({"inputs": [{"name": "input", "shape": [0, 2**62], "datatype": "FP32",
                                                            "data": []}]}).encode(), 400, "shape"),
        ("too many axes", V2, json.dumps({"inputs": [{"name": "input", "shape": [0] + [1] * 69, "datatype": "BYTES",
                                                     "data": []}]}).encode(), 400, "shape"),
        ("OIP id too long", V2, json.dumps({"id": "i" * 10_000, "inputs": [
            {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}).encode(), 400, "id: 10000 characters"),
    ]
    for kind, path, content, status, message in cases:
        TRIED[kind] += 1
        assert_clear_4xx(client.post(path, content=content, headers={"Content-Type": "application/json"}), status, message)
        good_request_succeeds(client, x)
    for path, message in ((f"/v1/models/{MODEL}x/predict", "unknown model"), (f"/v2/models/{MODEL}x/infer", "unknown model"),
                          (f"/v2/models/{MODEL}/versions/99/infer", "no version '99'")):
        TRIED["unknown model or version"] += 1
        assert_clear_4xx(client.post(path, json={"inputs": []}), 404, message)


def test_admin_routes_refused_without_a_configured_key(client) -> None:
    response = client.post(f"/admin/models/{MODEL}/reload")
    assert_clear_4xx(response, 403, "EXITSERVE_ADMIN_API_KEY")


def test_slow_clients_do_not_hold_up_others(server, client, x) -> None:
    """Clients that send headers and trickle (or abandon) their body; everyone else is served meanwhile."""
    body = json.dumps({"inputs": raw_tensor(x[:2])}).encode()
    host, port = "127.0.0.1", server.port
    request_head = (f"POST {V1} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
    slow = [socket.create_connection((host, port), timeout=10) for _ in range(5)]
    latencies = []
    try:
        for s in slow:
            s.sendall(request_head)
        step = max(1, len(body) // 20)
        for i in range(20):  # ~2 s of trickling, a piece per 0.1 s from each slow client
            for s in slow[:4]:
                s.sendall(body[i * step:(i + 1) * step])
            started = time.perf_counter()
            good_request_succeeds(client, x)
            latencies.append(time.perf_counter() - started)
            time.sleep(0.1)
        slow[4].close()  # the fifth gives up half way
        for s in slow[:4]:
            s.sendall(body[20 * step:])
            reply = s.recv(65536)
            assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    finally:
        for s in slow:
            s.close()
    TRIED["slow client"] += 5
    print(f"\nlatency of other clients while 5 clients trickle their bodies: {percentiles(latencies)}")
    assert max(latencies) < 2.0, latencies  # generous: they must not wait for the slow bodies


# --- property-based fuzzing -------------------------------------------------------------------

json_leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=8)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                          max_leaves=12)


unit = st.floats(0.0, 1.0)
good_delta = st.floats(0.01, 1.0)


# Dimensions that break numpy rather than the byte count: zero-size tensors with huge axes, too many axes.
hostile_dim = st.integers(0, 9) | st.sampled_from([0, 2**31 - 1, 2**31, 2**62, 2**63 - 1, -1])
hostile_shape = st.lists(hostile_dim, min_size=0, max_size=6) | st.lists(st.sampled_from([0, 1]), min_size=60, max_size=70)


@st.composite
def raw_tensors(draw: st.DrawFn) -> dict:
    """v1 raw-tensor descriptors: every field hostile in turn (shape, dtype, b64, extra keys)."""
    shape = draw(st.lists(st.integers(0, 9), min_size=1, max_size=5) | hostile_shape)
    dtype = draw(st.sampled_from(["float32", "float16", "float64", "uint8", "int8", "int32", "int64", "bool", "complex64", ""])
                 | json_value)
    payload = draw(st.binary(max_size=2048))
    if draw(st.booleans()):  # a payload whose size agrees with the shape, so decoding goes past the byte count
        count = int(np.prod([d for d in shape if isinstance(d, int)] or [0], dtype=object)) if isinstance(shape, list) else 0
        payload = bytes(min(max(count, 0), 4096) * 4)
    raw = {"b64": draw(st.sampled_from([base64.b64encode(payload).decode(), "!!", ""]) | json_value), "dtype": dtype, "shape": shape}
    if draw(st.integers(0, 9)) == 0:
        raw[draw(st.sampled_from(["junk", "b64", "dtype", "shape"]))] = draw(json_value)
    return raw


@st.composite
def v1_near_valid(draw: st.DrawFn) -> dict:
    """A valid predict body, then up to two fields replaced by anything: probes past the first check."""
    n = draw(st.integers(1, 3))
    body: dict = {"inputs": np.full((n, 1, 8, 8), draw(unit), np.float32).tolist()}
    if draw(st.booleans()):
        body["delta"] = draw(good_delta | st.lists(good_delta, min_size=n, max_size=n))
    if draw(st.booleans()):
        body["policy"] = draw(st.sampled_from(POLICIES))
    if draw(st.booleans()):
        body["return_probabilities"] = draw(st.booleans())
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(["inputs", "delta", "policy", "return_probabilities", "junk"]))
        body[key] = draw(json_value | st.floats() | raw_tensors() | st.lists(st.floats(), max_size=4))
    return body


v1_bodies = st.one_of(json_value, v1_near_valid(), st.builds(lambda raw, d: {"inputs": raw, **d}, raw_tensors(),
                                                               st.fixed_dictionaries({}, optional={"delta": good_delta})))

V2_DATATYPES = ["FP32", "FP64", "FP16", "INT64", "INT8", "UINT8", "BOOL", "BYTES", "FP8", ""]
V2_OUTPUTS = ["label", "class_index", "exit", "estimated_accuracy", "target_met", "compute_fraction", "probabilities"]


@st.composite
def v2_near_valid(draw: st.DrawFn) -> dict:
    """A valid infer body (JSON tensors), then up to two parts replaced by anything."""
    n = draw(st.integers(1, 3))
    tensor: dict = {"name": "input", "shape": [n, 1, 8, 8], "datatype": "FP32", "data": [draw(unit)] * (n * 64)}
    body: dict = {"inputs": [tensor]}
    if draw(st.booleans()):
        body["inputs"].append({"name": "delta", "shape": [n], "datatype": "FP64", "data": draw(st.lists(good_delta, min_size=n, max_size=n))})
    if draw(st.booleans()):
        body["parameters"] = {"delta": draw(good_delta), "policy": draw(st.sampled_from(POLICIES))}
    if draw(st.booleans()):
        body["outputs"] = [{"name": name} for name in draw(st.lists(st.sampled_from(V2_OUTPUTS), min_size=1, max_size=3, unique=True))]
    for _ in range(draw(st.integers(0, 2))):
        where = draw(st.sampled_from(["name", "shape", "datatype", "data", "parameters", "outputs", "id", "request parameters"]))
        junk = draw(json_value | st.lists(st.integers(-2, 9), max_size=5) | st.sampled_from(V2_DATATYPES))
        if where in ("name", "shape", "datatype", "data", "parameters"):
            tensor[where] = junk
        elif where == "request parameters":
            body["parameters"] = {draw(st.sampled_from(["delta", "policy", "binary_data_output", "junk"])): junk}
        else:
            body[where] = junk
    return body


v2_bodies = st.one_of(json_value, v2_near_valid())


@st.composite
def v2_binary_bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """Binary-extension bodies: per tensor a descriptor (any datatype incl. BYTES, hostile shapes and
    binary_data_size) and bytes that agree with it or not; BYTES elements with honest or lying lengths."""
    tensors, chunks = [], []
    for name in draw(st.lists(st.sampled_from(["input", "delta", "text", "other"]), min_size=1, max_size=3, unique=True)):
        datatype = draw(st.sampled_from(V2_DATATYPES))
        shape = draw(st.lists(st.integers(0, 4), min_size=1, max_size=4) | hostile_shape)
        if datatype == "BYTES":
            items = draw(st.lists(st.binary(max_size=12), max_size=6))
            chunk = b"".join(len(i).to_bytes(4, "little") + i for i in items)
            if draw(st.booleans()):
                chunk = draw(st.binary(max_size=40))  # lying length prefixes
        else:
            chunk = draw(st.binary(max_size=300))
        size = draw(st.sampled_from([len(chunk), len(chunk)]) | st.integers(-1, 400) | json_value)
        tensors.append({"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}})
        chunks.append(chunk)
    header = {"inputs": tensors}
    if draw(st.booleans()):
        header["outputs"] = [{"name": n, "parameters": {"binary_data": draw(st.booleans() | json_value)}}
                             for n in draw(st.lists(st.sampled_from([*V2_OUTPUTS, "nope"]), max_size=3, unique=True))]
    if draw(st.booleans()):
        header["id"] = draw(st.text(max_size=200) | json_value)
    raw = json.dumps(header).encode()
    return raw + b"".join(chunks), {"Inference-Header-Content-Length": str(len(raw))}

FUZZ = settings(max_examples=int(__import__("os").environ.get("EXITSERVE_FUZZ_EXAMPLES", "150")), deadline=None,
                derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                         HealthCheck.data_too_large])


def check_no_5xx(response: httpx.Response, kind: str) -> None:
    TRIED[f"{kind} ({'accepted' if response.status_code == 200 else 'refused'})"] += 1
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error, str) and error


@FUZZ
@given(body=v1_bodies)
def test_fuzz_v1_predict_body(client, body) -> None:
    content = json.dumps(body, allow_nan=True).encode()
    check_no_5xx(client.post(V1, content=content, headers={"Content-Type": "application/json"}), "fuzz v1 JSON")


@FUZZ
@given(body=v2_bodies, tail=st.binary(max_size=300), header_length=st.sampled_from(["json", "none", "random"]),
       offset=st.integers(-50, 400))
def test_fuzz_v2_infer_body(client, body, tail, header_length, offset) -> None:
    raw = json.dumps(body, allow_nan=True).encode()
    headers = {}
    if header_length == "json":
        headers["Inference-Header-Content-Length"] = str(len(raw))
    elif header_length == "random":
        headers["Inference-Header-Content-Length"] = str(len(raw) + offset)
    content = raw + tail if header_length != "none" else raw
    check_no_5xx(client.post(V2, content=content, headers=headers), "fuzz v2 JSON + binary")


@FUZZ
@given(body=v2_binary_bodies())
def test_fuzz_v2_binary_tensors(client, body) -> None:
    content, headers = body
    check_no_5xx(client.post(V2, content=content, headers=headers), "fuzz v2 binary descriptors")


@FUZZ
@given(content=st.binary(max_size=400), protocol=st.sampled_from([V1, V2]))
def test_fuzz_raw_bytes(client, content, protocol) -> None:
    check_no_5xx(client.post(protocol, content=content), "fuzz raw bytes")


def test_server_still_correct_after_the_abuse(client, x) -> None:
    good_request_succeeds(client, x)
    assert client.get("/readyz").status_code == 200
    text = client.get("/metrics").text
    # No 5xx was ever counted: not even for the client that hung up mid-body (499).
    server_errors = [line for line in text.splitlines() if line.startswith("exitserve_requests_total") and 'status="5' in line]
    assert not server_errors, server_errors
    assert metric(text, "exitserve_requests_total", status="499") == 1
    # Every response is counted and logged, whatever its status: counts and log lines agree.
    counted = sum(metric(text, "exitserve_requests_total", protocol=p) for p in ("v1", "v2"))
    fuzzed = sum(n for kind, n in TRIED.items() if kind.startswith("fuzz"))
    assert counted >= fuzzed > 0
    SERVER_COUNTED["v1+v2"] = counted
