"""End to end against a real `exitserve serve` process: v1, v2 via the real tritonclient, metrics, bad input."""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from reliability_support import metric
from tritonclient.utils import InferenceServerException

from exitserve.calibration import Calibration, decide_all
from exitserve.calibration.reasons import REASON_NAMES
from exitserve.models.bundle import load_bundle
from exitserve.models.data import load_dataset
from exitserve.service.runners.onnx_runtime import OnnxRunner
from exitserve.service.tools.offline import input_guard_verdict

MODEL = "digits"


@pytest.fixture(scope="module")
def samples() -> tuple[np.ndarray, np.ndarray]:
    data = load_dataset("digits:test")
    return data.x[:24], data.y[:24]


@pytest.fixture(scope="module")
def offline(digits_bundle: Path, samples):
    """What `exitserve evaluate` decides for the same inputs: the reference every answer must equal."""
    bundle = load_bundle(digits_bundle)
    logits, features = OnnxRunner(bundle).run_all_exits_with_features(samples[0], progress=False)
    calibration = Calibration.from_dict(bundle.calibration, bundle.manifest.num_exits)
    typical = input_guard_verdict(calibration, features)
    assert typical is not None  # `exitserve calibrate` fitted the input guard

    def decide(delta: float, policy: str = "pcee-lb-tail"):  # the server's default policy
        return decide_all(calibration, policy, logits, np.full(len(samples[0]), delta), typical)

    return decide


def predict(server, body: object, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models/{MODEL}/predict", json=body, timeout=10, **kwargs)


def test_v1_predict_matches_offline_decisions(server, samples, offline) -> None:
    x, _ = samples
    for delta in (0.6, 0.9, 0.99):
        response = predict(server, {"inputs": x.tolist(), "delta": delta})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == MODEL and body["request_id"]
        preds = body["predictions"]
        want = offline(delta)
        assert [p["exit"] for p in preds] == want.exit_index.tolist()
        assert [p["class_index"] for p in preds] == want.prediction.tolist()
        assert [p["target_met"] for p in preds] == want.target_met.tolist()
        assert np.allclose([p["estimated_accuracy"] for p in preds], want.estimate)
        assert np.allclose([p["promised_accuracy"] for p in preds], want.promised)
        assert all(p["promised_accuracy"] >= delta for p in preds if p["target_met"])
        assert [p["reason"] for p in preds] == [REASON_NAMES[c] for c in want.reason.tolist()]
        assert all(p["exits_total"] == 3 and p["label"] == str(p["class_index"]) for p in preds)
        assert all(0 < p["compute_fraction"] <= 1 for p in preds)


def test_inputs_unlike_the_calibration_data_get_no_promise_unless_the_guard_is_off(server, samples) -> None:
    x, _ = samples
    noise = np.random.default_rng(0).random(x.shape, dtype=np.float32) * float(x.max())
    series = {"model": MODEL, "reason": "out_of_distribution"}
    before = metric(httpx.get(f"{server.url}/metrics").text, "exitserve_promise_withheld_total", **series)
    guarded = predict(server, {"inputs": noise.tolist(), "delta": 0.6}).json()["predictions"]
    assert all(not p["target_met"] and p["reason"] == "out_of_distribution" for p in guarded)
    after = metric(httpx.get(f"{server.url}/metrics").text, "exitserve_promise_withheld_total", **series)
    assert after - before == len(x)  # the operator's label-free drift signal counts every withheld promise
    free = predict(server, {"inputs": noise.tolist(), "delta": 0.6, "ood_guard": False}).json()["predictions"]
    assert [p["exit"] for p in free] == [p["exit"] for p in guarded]  # the guard never moves an exit
    assert any(p["target_met"] for p in free)  # the tables alone would have promised some of them
    assert all(p["reason"] != "out_of_distribution" for p in free)
    refused = predict(server, {"inputs": noise.tolist(), "ood_guard": "no"})
    assert refused.status_code == 400 and "ood_guard" in refused.text


def test_v1_raw_tensor_and_probabilities(server, samples, offline) -> None:
    x, _ = samples
    raw = {"b64": base64.b64encode(x.astype("<f4").tobytes()).decode(), "dtype": "float32", "shape": list(x.shape)}
    response = predict(server, {"inputs": raw, "delta": 0.9, "policy": "pcee-cond", "return_probabilities": True},
                       headers={"X-Request-ID": "abc-123"})
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "abc-123"
    body = response.json()
    assert body["request_id"] == "abc-123"
    probs = np.array([p["probabilities"] for p in body["predictions"]])
    assert probs.shape == (24, 10) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert np.array_equal(probs.argmax(1), offline(0.9, "pcee-cond").prediction)


def test_v1_per_sample_deltas(server, samples, offline) -> None:
    x, _ = samples
    deltas = [0.6 if i % 2 else 0.99 for i in range(len(x))]
    body = predict(server, {"inputs": x.tolist(), "delta": deltas}).json()
    low, high = offline(0.6), offline(0.99)
    for i, p in enumerate(body["predictions"]):
        want = low if i % 2 else high
        assert p["exit"] == want.exit_index[i]


def test_v2_binary_via_tritonclient(server, samples, offline) -> None:
    x, _ = samples
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    meta = client.get_model_metadata(MODEL)
    assert meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # binary by default
    result = client.infer(MODEL, [inp], parameters={"delta": 0.9, "policy": "pcee-cond"}, request_id="r1")
    want = offline(0.9, "pcee-cond")
    assert result.get_response()["id"] == "r1"
    assert np.array_equal(result.as_numpy("exit"), want.exit_index)
    assert np.array_equal(result.as_numpy("class_index"), want.prediction)
    assert np.array_equal(result.as_numpy("target_met"), want.target_met)
    assert np.allclose(result.as_numpy("estimated_accuracy"), want.estimate, atol=1e-6)
    assert np.allclose(result.as_numpy("promised_accuracy"), want.promised, atol=1e-6)
    assert [r.decode() for r in result.as_numpy("reason")] == [REASON_NAMES[c] or "" for c in want.reason.tolist()]
    assert [s.decode() for s in result.as_numpy("label")] == [str(c) for c in want.prediction]
    assert result.as_numpy("probabilities") is None  # only when asked for


def test_v2_json_via_tritonclient_with_outputs(server, samples, offline) -> None:
    x, _ = samples
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    outputs = [triton.InferRequestedOutput("exit", binary_data=False),
               triton.InferRequestedOutput("probabilities", binary_data=True)]
    result = client.infer(MODEL, [inp], outputs=outputs, parameters={"delta": 0.6})
    assert np.array_equal(result.as_numpy("exit"), offline(0.6).exit_index)
    assert result.as_numpy("probabilities").shape == (24, 10)
    assert result.as_numpy("label") is None


def test_v2_errors_reach_tritonclient(server, samples) -> None:
    x, _ = samples
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match=r"parameters.delta: must be in \(0, 1\]"):
        client.infer(MODEL, [inp], parameters={"delta": 1.5})
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.infer("nope", [inp])


def test_v2_plain_json_and_gzip(server, samples) -> None:
    x, _ = samples
    body = {"id": "j1", "parameters": {"delta": 0.9},
            "inputs": [{"name": "input", "shape": list(x[:2].shape), "datatype": "FP32", "data": x[:2].ravel().tolist()}]}
    response = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=gzip.compress(json.dumps(body).encode()),
                          headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    out = {o["name"]: o for o in response.json()["outputs"]}
    assert response.json()["id"] == "j1" and out["exit"]["shape"] == [2]


def test_health_docs_and_listing(server) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").json()["ready"] is True
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    assert httpx.get(f"{server.url}/v2").json()["extensions"]
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/models/{model}/predict" in spec["paths"] and "PredictRequest" in spec["components"]["schemas"]
    assert httpx.get(f"{server.url}/docs").status_code == 200
    models = httpx.get(f"{server.url}/v1/models").json()["models"]
    assert models[0]["name"] == MODEL and models[0]["exits"] == 3
    config = httpx.get(f"{server.url}/v2/models/{MODEL}/config").json()
    assert config["max_batch_size"] == 16


def test_head_on_every_get_route(server) -> None:
    """HEAD answers what GET answers, without the body (load balancers and uptime checkers send it)."""
    gets = ["/healthz", "/readyz", "/metrics", "/v1/models", "/openapi.json", "/docs", "/v2", "/v2/health/live",
            "/v2/health/ready", f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}/config",
            "/v2/models/nope"]
    for path in gets:
        got, head = httpx.get(f"{server.url}{path}"), httpx.head(f"{server.url}{path}")
        assert head.status_code == got.status_code and head.content == b"", path
        assert head.headers.get("content-type") == got.headers.get("content-type"), path
    assert httpx.head(f"{server.url}/v1/models/{MODEL}/predict").status_code == 405  # POST only


def test_body_limits_scale_with_what_the_model_takes(server) -> None:
    """1024 samples x 64 pixels x 24 bytes a number + 64 KiB: a larger body is refused on its
    Content-Length, far below EXITSERVE_MAX_BODY_BYTES (64 MiB)."""
    limit = 1024 * 64 * 24 + (64 << 10)
    for path in (f"/v1/models/{MODEL}/predict", f"/v2/models/{MODEL}/infer"):
        r = httpx.post(f"{server.url}{path}", content=b" " * (limit + 1), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and f"exceeds the limit of {limit}" in r.json()["error"], path
        r = httpx.post(f"{server.url}{path}", content=b" " * limit, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, path  # within the limit: read, then refused as JSON


def test_metrics_move_with_requests(server, samples) -> None:
    x, _ = samples
    before = httpx.get(f"{server.url}/metrics").text
    body = predict(server, {"inputs": x.tolist(), "delta": 0.6}).json()
    after = httpx.get(f"{server.url}/metrics").text
    exits = np.bincount([p["exit"] for p in body["predictions"]], minlength=3)
    for k in range(3):
        moved = metric(after, "exitserve_exits_total", **{"model": MODEL, "exit": str(k)}) - \
            metric(before, "exitserve_exits_total", **{"model": MODEL, "exit": str(k)})
        assert moved == exits[k]
    ok = {"model": MODEL, "protocol": "v1", "status": "200"}
    assert metric(after, "exitserve_requests_total", **ok) == metric(before, "exitserve_requests_total", **ok) + 1
    assert metric(after, "exitserve_model_ready", **{"model": MODEL}) == 1
    for name in ("exitserve_request_duration_seconds_count", "exitserve_queue_duration_seconds_count",
                 "exitserve_batch_size_count", "exitserve_exit_depth_count", "exitserve_compute_fraction_count",
                 "exitserve_estimated_accuracy_count", "exitserve_segment_duration_seconds_count"):
        assert metric(after, name, **{"model": MODEL}) > metric(before, name, **{"model": MODEL}), name


BAD_V1 = [
    ("not json", b"{nope", 400, "invalid JSON"),
    ("no inputs", {"delta": 0.9}, 400, "inputs: required"),
    ("wrong shape", {"inputs": [[[0.0] * 8] * 8]}, 400, "does not match the model input"),
    ("ragged", {"inputs": [[[[0.0] * 8] * 8], [[[0.0] * 7] * 8]]}, 400, "rectangular"),
    ("strings", {"inputs": [[[["a"] * 8] * 8]]}, 400, "rectangular nested list of numbers"),
    ("numeric strings", {"inputs": [[[["0.5"] * 8] * 8]]}, 400, "not strings or booleans"),
    ("one numeric string", {"inputs": [[[[0.5] * 7 + ["0.5"]] * 8]]}, 400, "not strings or booleans"),
    ("booleans", {"inputs": [[[[True] * 8] * 8]]}, 400, "not strings or booleans"),
    ("nan", {"inputs": {"b64": base64.b64encode(np.full((1, 1, 8, 8), np.nan, "<f4").tobytes()).decode(),
                        "dtype": "float32", "shape": [1, 1, 8, 8]}}, 400, "NaN or infinity at index"),
    ("inf", {"inputs": [[[[1e39] * 8] * 8]]}, 400, "NaN or infinity"),
    ("json NaN token", b'{"inputs": [[[[NaN]]]]}', 400, "invalid JSON"),
    ("delta zero", {"inputs": [[[[0.0] * 8] * 8]], "delta": 0}, 400, r"delta: must be in \(0, 1\]"),
    ("delta negative", {"inputs": [[[[0.0] * 8] * 8]], "delta": -0.5}, 400, r"delta: must be in \(0, 1\]"),
    ("delta above one", {"inputs": [[[[0.0] * 8] * 8]], "delta": 1.01}, 400, r"delta: must be in \(0, 1\]"),
    ("delta text", {"inputs": [[[[0.0] * 8] * 8]], "delta": "high"}, 400, "delta"),
    ("delta count", {"inputs": [[[[0.0] * 8] * 8]], "delta": [0.9, 0.8]}, 400, "2 values for 1 samples"),
    ("policy", {"inputs": [[[[0.0] * 8] * 8]], "policy": "yolo"}, 400, "unknown policy 'yolo'"),
    ("unknown field", {"inputs": [[[[0.0] * 8] * 8]], "deltaa": 0.9}, 400, "unknown field"),
    ("bad b64", {"inputs": {"b64": "!!!", "dtype": "float32", "shape": [1, 1, 8, 8]}}, 400, "not valid base64"),
    ("b64 size", {"inputs": {"b64": base64.b64encode(b"\0" * 8).decode(), "dtype": "float32", "shape": [1, 1, 8, 8]}}, 400, "needs 256"),
    ("uint8 pixels", {"inputs": {"b64": base64.b64encode(b"\0" * 64).decode(), "dtype": "uint8", "shape": [1, 1, 8, 8]}}, 400,
     "dtype uint8 given, the model takes float32"),
    ("empty batch", {"inputs": []}, 400, "empty batch|does not match"),
    ("too many samples", {"inputs": {"b64": base64.b64encode(b"\0" * 256 * 1025).decode(), "dtype": "float32", "shape": [1025, 1, 8, 8]}}, 413, "exceed the limit"),
]


@pytest.mark.parametrize(("case", "body", "status", "message"), BAD_V1, ids=[c[0] for c in BAD_V1])
def test_bad_v1_input_is_a_clear_4xx_and_the_next_request_succeeds(server, samples, case, body, status, message) -> None:
    if isinstance(body, bytes):
        response = httpx.post(f"{server.url}/v1/models/{MODEL}/predict", content=body, timeout=10,
                              headers={"Content-Type": "application/json"})
    else:
        response = predict(server, body)
    assert response.status_code == status, response.text
    assert response.json()["error"]
    import re

    assert re.search(message, response.json()["error"]), response.json()["error"]
    good = predict(server, {"inputs": samples[0][:3].tolist(), "delta": 0.9})
    assert good.status_code == 200


def test_unknown_model_and_route(server) -> None:
    response = httpx.post(f"{server.url}/v1/models/nope/predict", json={"inputs": []})
    assert response.status_code == 404 and "unknown model" in response.json()["error"]
    assert httpx.get(f"{server.url}/nowhere").status_code == 404


def test_bad_v2_input_is_a_clear_4xx(server, samples) -> None:
    x = samples[0][:2]
    cases = [
        ({"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 5}]}, "element"),
        ({"inputs": [{"name": "other", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}]}, "unknown input"),
        ({"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}],
          "outputs": [{"name": "logits"}]}, "logits"),
        ({"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}],
          "parameters": {"policy": "nope"}}, "unknown policy"),
    ]
    for body, message in cases:
        response = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body)
        assert response.status_code == 400, response.text
        assert message in response.json()["error"]
    lying = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=b'{"inputs": []}xx',
                       headers={"Inference-Header-Content-Length": "999"})
    assert lying.status_code == 400
    good = predict(server, {"inputs": x.tolist()})
    assert good.status_code == 200
