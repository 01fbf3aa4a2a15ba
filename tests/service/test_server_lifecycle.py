"""Settings that change how a real server behaves: API key, request timeout, logs, shutdown.

Overload (503 + Retry-After) is tested deterministically in test_reliability.py."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ServerProcess, running_server

from exitserve.models.data import load_dataset

MODEL = "digits"


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return load_dataset("digits:test").x[:4]


@pytest.fixture(scope="module")
def keyed_server(digits_bundle: Path):
    with running_server([digits_bundle], ["--api-key", "s3cret"]) as proc:
        yield proc


def test_api_key_guards_inference_but_not_health(keyed_server, x) -> None:
    url = f"{keyed_server.url}/v1/models/{MODEL}/predict"
    body = {"inputs": x.tolist()}
    assert httpx.post(url, json=body).status_code == 401
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json() == {"error": "missing or wrong API key"}
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert httpx.post(url, json=body, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert httpx.post(f"{keyed_server.url}/v2/models/{MODEL}/infer", json={}).status_code == 401
    assert httpx.get(f"{keyed_server.url}/v2/models/{MODEL}").status_code == 401
    for open_path in ("/healthz", "/readyz", "/metrics", "/v2/health/ready"):
        assert httpx.get(f"{keyed_server.url}{open_path}").status_code == 200, open_path


def test_request_timeout_is_504_and_logs_are_json_with_request_id(digits_bundle: Path, x) -> None:
    proc = ServerProcess([digits_bundle], ["--request-timeout", "0.000001"])
    try:
        proc.wait_ready()
        response = httpx.post(f"{proc.url}/v1/models/{MODEL}/predict", json={"inputs": x.tolist()},
                              headers={"X-Request-ID": "timeout-probe"})
        assert response.status_code == 504 and "no answer within" in response.json()["error"]
    finally:
        proc.stop()
    entries = [json.loads(line) for line in proc.logs().splitlines() if line.startswith("{")]
    probe = [e for e in entries if e.get("request_id") == "timeout-probe"]
    assert probe and probe[0]["status"] == 504 and probe[0]["model"] == MODEL


def test_sigterm_drains_in_flight_requests(digits_bundle: Path, x) -> None:
    proc = ServerProcess([digits_bundle], ["--max-queue-delay-ms", "1500", "--max-batch-size", "1000"])
    try:
        proc.wait_ready()
        results: list[httpx.Response] = []
        sender = threading.Thread(target=lambda: results.append(
            httpx.post(f"{proc.url}/v1/models/{MODEL}/predict", json={"inputs": x.tolist()}, timeout=30)))
        sender.start()
        # The request now waits in the batcher for its 1.5 s window; stop the server meanwhile.
        threading.Event().wait(0.5)
        proc.process.send_signal(signal.SIGTERM)
        sender.join(timeout=30)
        assert results and results[0].status_code == 200, results
        # uvicorn re-raises the signal after a graceful shutdown, so the status is -SIGTERM (or 0 on older ones)
        assert proc.process.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        proc.stop()


def test_several_bundles_under_their_own_names(digits_bundle: Path, tmp_path: Path, x) -> None:
    import shutil

    second = tmp_path / "second"
    shutil.copytree(digits_bundle, second)
    manifest = json.loads((second / "manifest.json").read_text())
    manifest["name"] = "digits-b"  # the manifest itself is not checksummed
    (second / "manifest.json").write_text(json.dumps(manifest))
    proc = ServerProcess([digits_bundle, second])
    try:
        proc.wait_ready()
        names = [m["name"] for m in httpx.get(f"{proc.url}/v1/models").json()["models"]]
        assert names == [MODEL, "digits-b"]
        first = httpx.post(f"{proc.url}/v1/models/{MODEL}/predict", json={"inputs": x.tolist()}).json()
        other = httpx.post(f"{proc.url}/v1/models/digits-b/predict", json={"inputs": x.tolist()}).json()
        assert other["model"] == "digits-b"
        assert [p["class_index"] for p in first["predictions"]] == [p["class_index"] for p in other["predictions"]]
    finally:
        proc.stop()


def test_bad_bundle_stops_start_up_with_the_file_named(digits_bundle: Path, tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    broken = tmp_path / "broken"
    shutil.copytree(digits_bundle, broken)
    (broken / "calibration.json").write_text((broken / "calibration.json").read_text().replace("1", "2", 1))
    result = subprocess.run([sys.executable, "-m", "exitserve.service.cli", "serve", str(broken), "--port", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "calibration.json: sha256 mismatch" in result.stderr
