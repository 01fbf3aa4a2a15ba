"""`exitserve shifted-sets` builds the sets; `exitserve evaluate --shifted` reports on them with the
committed default bundle, figures equal to the server's decisions (decide_all over the bundle's logits)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exitserve.calibration import Calibration, decide_all
from exitserve.models.bundle import load_bundle
from exitserve.models.shifted import load_sets
from exitserve.service.cli.main import main
from exitserve.service.settings import DEFAULT_BUNDLE, Settings
from exitserve.service.tools.offline import bundle_outputs, input_guard_verdict

needs_cifar = pytest.mark.needs_data("cifar10")  # a one-line skip without the data, a failure in CI with it


def check_against_decide_all(report: dict, sets_dir: Path, policy: str) -> None:
    bundle = load_bundle(DEFAULT_BUNDLE)
    cal = Calibration.from_dict(bundle.calibration, bundle.manifest.num_exits)
    by_name = {s["name"]: s for s in report["sets"]}
    for s in load_sets(sets_dir):
        logits, features = bundle_outputs(bundle, s.x, progress=False)
        typical = input_guard_verdict(cal, features)  # as the server applies the input guard
        for row in by_name[s.name]["policies"][policy]:
            d = decide_all(cal, policy, logits, row["delta"], typical)
            assert row["coverage"] == d.target_met.mean()
            correct = d.prediction == s.y
            assert row["accuracy_promised"] == (correct[d.target_met].mean() if d.target_met.any() else None)


def test_foreign_sets_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sets, out = tmp_path / "sets", tmp_path / "out"
    assert main(["shifted-sets", "--out", str(sets), "--size", "24", "--corruptions", "--foreign",
                 "uniform-noise", "constant"]) == 0
    assert "wrote 2 sets" in capsys.readouterr().out
    assert main(["evaluate", str(DEFAULT_BUNDLE), "--shifted", str(sets), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "shifted.json").read_text())
    policy = Settings().default_policy
    assert report["policies"] == [policy] and [s["name"] for s in report["sets"]] == ["uniform-noise", "constant"]
    assert report["deltas"] == [0.8, 0.9, 0.95, 0.99]
    for s in report["sets"]:
        assert not s["labelled"] and s["n"] == 24
        line = next(line for line in printed.splitlines() if line.startswith(s["name"]))
        assert line.split()[2].startswith(f"{s['policies'][policy][0]['coverage']:.3f}/–")
    check_against_decide_all(report, sets, policy)
    assert "| uniform-noise | – | 24 | – (foreign) |" in (out / "shifted.md").read_text()


@needs_cifar
def test_corruptions_of_a_small_cifar_subset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sets, out = tmp_path / "sets", tmp_path / "out"
    assert main(["shifted-sets", "--out", str(sets), "--size", "40", "--corruptions", "contrast", "--severities", "1", "5",
                 "--foreign"]) == 0
    assert main(["evaluate", str(DEFAULT_BUNDLE), "--shifted", str(sets), "--out", str(out), "--no-progress",
                 "--policies", "pcee-lb-tail", "confidence"]) == 0
    report = json.loads((out / "shifted.json").read_text())
    assert [s["name"] for s in report["sets"]] == ["clean", "contrast-1", "contrast-5"]
    assert all(s["labelled"] and s["n"] == 40 for s in report["sets"])
    accuracy = [s["last_exit_accuracy"] for s in report["sets"]]
    assert accuracy[2] < accuracy[0]  # contrast 0.15 hurts the model
    check_against_decide_all(report, sets, "confidence")
    assert np.isfinite([r["coverage"] for s in report["sets"] for r in s["policies"]["pcee-lb-tail"]]).all()


def test_evaluate_refuses_mixed_or_missing_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = str(DEFAULT_BUNDLE)
    assert main(["evaluate", bundle, "--out", str(tmp_path)]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert main(["evaluate", bundle, "--data", "cifar10:test", "--shifted", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "give one" in capsys.readouterr().err
    assert main(["evaluate", bundle, "--shifted", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "shifted-sets" in capsys.readouterr().err
    assert main(["evaluate", bundle, "--shifted", str(tmp_path), "--policies", "best", "--out", str(tmp_path)]) == 2
    assert "unknown policy" in capsys.readouterr().err
    assert main(["shifted-sets", "--out", str(tmp_path), "--size", "0"]) == 2
    assert main(["shifted-sets", "--out", str(tmp_path), "--severities", "7"]) == 2
    assert "severities go from 1 to 5" in capsys.readouterr().err
