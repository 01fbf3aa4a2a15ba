"""The README's v1 example answer is what the committed default bundle really answers."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from exitserve.service.app import create_app
from exitserve.service.settings import DEFAULT_BUNDLE, Settings

README = Path(__file__).resolve().parents[3] / "README.md"


def test_readme_v1_answer_is_the_default_bundles_answer() -> None:
    text = README.read_text()
    section = text[text.index("## Asking for a prediction"):]
    request = section[: section.index("```json")]
    assert "[[[[0.5]*32]*32]*3]" in request and '\\"delta\\": 0.9' in request  # the request the test sends
    block = section[section.index("```json") + len("```json"): section.index("```", section.index("```json") + 7)]
    documented = json.loads(block.replace('"…"', '"elided"'))
    assert re.search(r"`exit` counts\s+from 0", section)

    app = create_app(Settings(bundles=[DEFAULT_BUNDLE]))
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        answer = client.post(f"/v1/models/{documented['model']}/predict",
                             json={"inputs": [[[[0.5] * 32] * 32] * 3], "delta": 0.9}).json()
    assert re.fullmatch(r"[0-9a-f]{32}", answer["request_id"])
    (got,), (want,) = answer["predictions"], documented["predictions"]
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == (pytest.approx(value, abs=1e-9) if isinstance(value, float) else value), key
