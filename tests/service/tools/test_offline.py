"""calibrate_bundle / evaluate_bundle on a small real digits bundle (trained by the shared fixture)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from exitserve.calibration import POLICIES, Calibration, decide_all
from exitserve.errors import BadBundle
from exitserve.models.bundle import load_bundle
from exitserve.models.data import load_dataset
from exitserve.service.tools.offline import bundle_logits, calibrate_bundle, evaluate_bundle


@pytest.fixture(scope="module")
def calibrated(digits_bundle_uncalibrated: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = tmp_path_factory.mktemp("offline") / "digits"
    shutil.copytree(digits_bundle_uncalibrated, bundle)
    calibrate_bundle(bundle, "digits:val", progress=False)
    return bundle


def test_calibrate_writes_a_signed_calibration_that_loads(calibrated: Path):
    bundle = load_bundle(calibrated, require_calibration=True)  # verifies every checksum
    assert "calibration.json" in bundle.manifest.sha256
    val = load_dataset("digits:val")
    cal = Calibration.from_dict(bundle.calibration, num_exits=bundle.manifest.num_exits)
    assert cal.validation_size == len(val) and cal.data_fingerprint == val.fingerprint
    assert cal.labels_known and np.all(cal.temperatures > 0)
    doc = bundle.calibration
    assert all(sum(ex["counts"]) == len(val) for ex in doc["exits"])
    # The tables are the validation accuracy of the bundle's own ONNX logits.
    logits = bundle_logits(bundle, val.x, progress=False)
    for k, ex in enumerate(doc["exits"]):
        assert ex["validation_accuracy"] == pytest.approx((logits[k].argmax(axis=1) == val.y).mean())


def test_evaluate_writes_reports_and_plots(calibrated: Path, tmp_path: Path):
    report = evaluate_bundle(calibrated, "digits:test", tmp_path / "eval", progress=False, deltas=[0.8, 0.9, 0.99],
                             command="exitserve evaluate BUNDLE --data digits:test")
    out = tmp_path / "eval"
    for name in ("evaluation.json", "evaluation.md", "reliability.png", "accuracy_vs_delta.png", "accuracy_vs_compute.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved == json.loads(json.dumps(report))
    test = load_dataset("digits:test")
    assert saved["n"] == len(test) and set(saved["policies"]) == set(POLICIES)
    assert saved["source"]["command"] == "exitserve evaluate BUNDLE --data digits:test"
    manifest = load_bundle(calibrated).manifest
    assert [e["compute_fraction"] for e in saved["exits"]] == manifest.compute_fractions()
    # The sweep row equals the decision rule run directly on the bundle's logits.
    bundle = load_bundle(calibrated)
    cal = Calibration.from_dict(bundle.calibration)
    logits = bundle_logits(bundle, test.x, progress=False)
    d = decide_all(cal, "pcee", logits, 0.9)
    row = saved["policies"]["pcee"][1]
    assert row["delta"] == 0.9 and row["accuracy"] == pytest.approx((d.prediction == test.y).mean())
    assert row["exit_histogram"] == np.bincount(d.exit_index, minlength=cal.num_exits).tolist()
    assert "Evaluation of digits on digits:test" in (out / "evaluation.md").read_text()


def test_evaluate_needs_a_calibrated_bundle(bundle_copy: Path, tmp_path: Path):
    with pytest.raises(BadBundle, match="calibration.json: missing"):
        evaluate_bundle(bundle_copy, "digits:test", tmp_path / "eval", progress=False)


def test_user_npz_data_is_checked_against_the_bundle(bundle_copy: Path, tmp_path: Path):
    val = load_dataset("digits:val")
    good = tmp_path / "mine.npz"
    np.savez(good, x=val.x[:120], y=val.y[:120])
    cal = calibrate_bundle(bundle_copy, str(good), progress=False, use_labels=False, bins=5)
    assert cal.validation_size == 120 and not cal.labels_known
    bad_shape = tmp_path / "bad.npz"
    np.savez(bad_shape, x=np.zeros((4, 1, 4, 4), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r"inputs have shape \[-1, 1, 4, 4\] but the bundle expects"):
        calibrate_bundle(bundle_copy, str(bad_shape), progress=False)
    bad_labels = tmp_path / "labels.npz"
    np.savez(bad_labels, x=val.x[:4], y=np.array([0, 1, 2, 12]))
    with pytest.raises(ValueError, match="outside the bundle's 10 classes"):
        calibrate_bundle(bundle_copy, str(bad_labels), progress=False)
