"""benchmarks/calibration_report.py on a real evaluation of a synthetic three-exit problem."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "calibration"))

import calibration_report  # noqa: E402
from calibration_reference import make_logits  # noqa: E402

from exitserve.calibration import fit_calibration  # noqa: E402
from exitserve.calibration.evaluation import evaluate_policies  # noqa: E402


def test_report_puts_new_default_old_default_and_confidence_side_by_side(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    logits, labels = make_logits(rng, 1200, 5, 3, discrete=False)
    cal = fit_calibration([z[:600] for z in logits], labels[:600])
    report = json.loads(json.dumps(evaluate_policies(cal, [z[600:] for z in logits], labels[600:], [0.3, 0.6, 1.0])))
    old_eval, old_control = tmp_path / "evaluation.json", tmp_path / "control.json"
    old_eval.write_text(json.dumps(report))
    old_control.write_text(json.dumps({"splits": 2, "policies": {"pcee-lb-cond": {"per_delta": [
        {"delta": 0.9, "coverage": 0.5, "violations": 1, "compute_fraction": 0.7}]}}}))
    old = calibration_report.extract_old(old_eval, old_control, out=tmp_path / "reference.json")
    text = calibration_report.render(report, old)
    rows = {r["delta"]: r for r in report["policies"]["pcee-lb-tail"]}
    r = rows[0.9]
    assert "`pcee-lb-tail` (new default)" in text and "`pcee-lb-cond` before (schema 1)" in text
    assert f"| 0.90 | {r['coverage']:.3f} (" in text
    lines = calibration_report.over_promise_table(report, ["pcee-lb-tail", "confidence"])
    assert len(lines) == 2 + 2 * 5  # two policies at the five key δ
    calibration_report.plot(report, old, tmp_path / "coverage.png")
    assert (tmp_path / "coverage.png").read_bytes()[:4] == b"\x89PNG"
