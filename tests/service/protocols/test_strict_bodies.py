"""Schemas are the validators: strict types, unknown keys refused, one clear 400 naming the field (in process)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from exitserve.service.app import create_app
from exitserve.service.settings import Settings


@pytest.fixture(scope="module")
def client(digits_bundle: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(bundles=[digits_bundle]))) as test_client:
        deadline = time.monotonic() + 60
        while test_client.get("/readyz").status_code != 200:  # warm-up runs after start-up
            assert time.monotonic() < deadline, test_client.get("/readyz").text
            time.sleep(0.05)
        yield test_client


def _sample() -> list:
    return np.zeros((1, 1, 8, 8), np.float32).tolist()


@pytest.mark.parametrize(("body", "message"), [
    ({"delta": "0.9"}, "delta: Input should be a valid number"),
    ({"delta": True}, "delta: Input should be a valid number"),
    ({"delta": ["0.9"]}, "delta"),
    ({"return_probabilities": "yes"}, "return_probabilities: Input should be a valid boolean"),
    ({"policy": 3}, "policy: Input should be a valid string"),
    ({"deltas": 0.9}, "deltas: unknown field"),
    ({"inputs": {"b64": "", "dtype": "float32", "shape": [0], "extra": 1}}, "inputs.extra: unknown field"),
    ({"inputs": {"b64": "", "dtype": "complex64", "shape": [0]}}, "inputs.dtype"),
    ({"inputs": {"b64": "", "dtype": "float32", "shape": [-1]}}, r"inputs.shape\[0\]"),
])
def test_v1_refuses_what_the_schema_does_not_say(client: TestClient, body: dict, message: str) -> None:
    import re

    response = client.post("/v1/models/digits/predict", json={"inputs": _sample(), **body})
    assert response.status_code == 400, response.text
    assert re.search(message, response.json()["error"]), response.json()["error"]


def test_v1_still_takes_an_integer_delta_and_a_list(client: TestClient) -> None:
    one = client.post("/v1/models/digits/predict", json={"inputs": _sample(), "delta": 1})
    assert one.status_code == 200, one.text
    two = client.post("/v1/models/digits/predict", json={"inputs": _sample() * 2, "delta": [0.5, 0.99]})
    assert two.status_code == 200 and len(two.json()["predictions"]) == 2


def test_v2_delta_must_be_numeric(client: TestClient) -> None:
    tensor = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}
    as_text = client.post("/v2/models/digits/infer", json={"inputs": [tensor], "parameters": {"delta": "0.9"}})
    assert as_text.status_code == 400 and "parameters.delta" in as_text.json()["error"]
    as_bytes = client.post("/v2/models/digits/infer", json={"inputs": [
        tensor, {"name": "delta", "shape": [1], "datatype": "BYTES", "data": ["0.9"]}]})
    assert as_bytes.status_code == 400 and "delta" in as_bytes.json()["error"], as_bytes.text
    fine = client.post("/v2/models/digits/infer", json={"inputs": [tensor], "parameters": {"delta": 0.9}})
    assert fine.status_code == 200, fine.text


def test_a_misspelt_default_policy_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("EXITSERVE_DEFAULT_POLICY", "pcee-lb-cnod")
    with pytest.raises(ValidationError, match="unknown policy 'pcee-lb-cnod'"):
        Settings()
