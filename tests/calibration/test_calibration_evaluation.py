"""evaluate_policies rows, the markdown report and the PNG plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
from calibration_reference import make_logits

from exitserve.calibration import POLICIES, decide_all, fit_calibration
from exitserve.calibration.evaluation import DEFAULT_EVAL_DELTAS, evaluate_policies, render_markdown
from exitserve.calibration.plots import write_plots

FRACTIONS = [0.2, 0.55, 1.0]


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(4)
    val, val_y = make_logits(rng, 600, 5, 3, discrete=False, strength=4.0)
    test, test_y = make_logits(rng, 400, 5, 3, discrete=False, strength=4.0)
    cal = fit_calibration(val, val_y)
    return cal, test, test_y


@pytest.fixture(scope="module")
def report(setup):
    cal, test, test_y = setup
    return evaluate_policies(cal, test, test_y, FRACTIONS)


def test_default_sweep_is_050_to_099():
    assert DEFAULT_EVAL_DELTAS[0] == 0.5 and DEFAULT_EVAL_DELTAS[-1] == 0.99 and len(DEFAULT_EVAL_DELTAS) == 50


def test_rows_are_computed_from_the_decisions(setup, report):
    cal, test, test_y = setup
    json.dumps(report, allow_nan=False)  # strict JSON
    assert set(report["policies"]) == set(POLICIES)
    for policy in ("pcee", "pcee-lb-cond", "per-exit-threshold"):
        rows = report["policies"][policy]
        assert [r["delta"] for r in rows] == DEFAULT_EVAL_DELTAS.tolist()
        row = rows[30]  # δ = 0.80
        d = decide_all(cal, policy, test, 0.80)
        correct = d.prediction == test_y
        assert row["accuracy"] == correct.mean()
        assert row["coverage"] == d.target_met.mean() > 0
        assert row["accuracy_promised"] == correct[d.target_met].mean()
        assert row["violation"] == (row["accuracy_promised"] < 0.80)
        assert row["exit_histogram"] == np.bincount(d.exit_index, minlength=3).tolist()
        assert row["compute_fraction"] == pytest.approx(np.take(FRACTIONS, d.exit_index).mean())
        assert row["mean_exit"] == d.exit_index.mean() and row["n"] == 400
    full = report["policies"]["full"][0]
    assert full["exit_histogram"] == [0, 0, 400] and full["compute_fraction"] == 1.0


def test_zero_coverage_gives_null_promised_accuracy_and_no_violation(setup):
    cal, test, test_y = setup
    # Labels that nobody predicts: the last exit's table still promises, so force a huge δ instead.
    report = evaluate_policies(cal, test, test_y, FRACTIONS, deltas=[1.0], policies=["pcee-lb"])
    row = report["policies"]["pcee-lb"][0]
    assert row["coverage"] == 0.0 and row["accuracy_promised"] is None and row["violation"] is False


def test_per_exit_metrics_and_over_promise(setup, report):
    cal, test, test_y = setup
    for k, e in enumerate(report["exits"]):
        assert e["accuracy"] == (test[k].argmax(axis=1) == test_y).mean()
        assert 0 <= e["ece"] <= 1 and 0 <= e["auroc"] <= 1 and 0 <= e["aurc"] <= 1
        assert sum(e["reliability"]["counts"]) == 400
    rows = [r for r in report["over_promise"] if r["policy"] == "pcee-cond" and r["delta"] == 0.9]
    assert len(rows) == 1
    d = decide_all(cal, "pcee-cond", test, 0.9)
    for e in rows[0]["per_exit"]:
        at = d.exit_index == e["exit"]
        assert e["n"] == at.sum()
        if at.any():
            assert e["over_promise"] == pytest.approx(d.estimate[at].mean() - (d.prediction == test_y)[at].mean())
    assert {r["policy"] for r in report["over_promise"]} == set(POLICIES)


def test_markdown_and_plots(tmp_path, report):
    text = render_markdown(report, title="Test run")
    assert text.startswith("# Test run")
    assert "### pcee-lb-cond" in text and "| 0.95 |" in text and "## Over-promise per exit" in text
    assert text.count("<details>") == len(POLICIES)
    paths = write_plots(report, tmp_path)
    assert [p.name for p in paths] == ["reliability.png", "accuracy_vs_delta.png", "accuracy_vs_compute.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_evaluate_rejects_mismatched_inputs(setup):
    cal, test, test_y = setup
    with pytest.raises(ValueError, match="compute fractions of 3 exits"):
        evaluate_policies(cal, test, test_y, [0.5, 1.0])
    with pytest.raises(ValueError, match="unknown policy"):
        evaluate_policies(cal, test, test_y, FRACTIONS, policies=["greedy"])


def test_promise_check_covers_every_policy(report):
    check = {c["policy"]: c for c in report["promise_check"]}
    assert set(check) == set(POLICIES)
    for policy, rows in report["policies"].items():
        assert check[policy]["violations"] == sum(r["violation"] for r in rows)
        margins = [r["accuracy_promised"] - r["delta"] for r in rows if r["accuracy_promised"] is not None]
        assert check[policy]["worst_margin"] == (min(margins) if margins else None)
    text = render_markdown(report)
    assert "## Promise check (every policy)" in text
    assert all(f"| {policy} | {check[policy]['violations']} of 50 |" in text for policy in POLICIES)
