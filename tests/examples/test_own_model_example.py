"""The "Serve your own model" example runs end to end, as a user would run it (CI: under a minute)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from exitserve.models.bundle import load_bundle

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "own_model" / "run_example.py"


def test_own_model_example_wraps_trains_exports_calibrates_evaluates_serves(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(EXAMPLE), "--out", str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    bundle = load_bundle(tmp_path / "bundle", require_calibration=True)
    assert bundle.manifest.num_exits == 3 and bundle.manifest.name == "my-digits"
    assert bundle.manifest.created_by.extra["factory"] == "my_network:build_model"
    report = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    assert report["n"] == 360 and report["exits"][-1]["accuracy"] > 0.9  # the backbone really learned digits
    with np.load(tmp_path / "test.npz") as test:
        truth = test["y"][:4].tolist()
    answer = json.loads((tmp_path / "answer.json").read_text())
    predictions = answer["predictions"]
    assert len(predictions) == 4 and all(0 <= p["exit"] < p["exits_total"] == 3 for p in predictions)
    assert sum(int(p["label"]) == t for p, t in zip(predictions, truth, strict=True)) >= 3
    assert "$ exitserve calibrate" in done.stdout and "exit  compute  accuracy" in done.stdout
