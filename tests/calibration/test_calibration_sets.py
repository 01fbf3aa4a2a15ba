"""Per-set rows of the shift report (issue 26): computed from decide_all, foreign sets count every
promise as wrong, and the Markdown table flags promised accuracy below δ."""

from __future__ import annotations

import json

import numpy as np
import pytest
from calibration_reference import make_logits

from exitserve.calibration import decide_all, fit_calibration
from exitserve.calibration.sets import promise_breaks, render_sets_markdown, set_row, sets_report

FRACTIONS = [0.2, 0.55, 1.0]


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(7)
    val, val_y = make_logits(rng, 600, 5, 3, discrete=False, strength=4.0)
    test, test_y = make_logits(rng, 300, 5, 3, discrete=False, strength=4.0)
    weak, weak_y = make_logits(rng, 300, 5, 3, discrete=False, strength=1.0)
    return fit_calibration(val, val_y), (test, test_y), (weak, weak_y)


def meta(name: str, labelled: bool = True, severity: int = 0) -> dict:
    return {"name": name, "family": name, "severity": severity, "labelled": labelled}


def test_rows_come_from_the_decisions_and_foreign_promises_are_all_wrong(setup) -> None:
    cal, (test, test_y), _ = setup
    row = set_row(cal, meta("clean"), test, test_y, FRACTIONS, (0.8, 0.9), ("pcee-lb-tail", "pcee"))
    assert [r["delta"] for r in row["policies"]["pcee"]] == [0.8, 0.9]
    d = decide_all(cal, "pcee", test, 0.9)
    r = row["policies"]["pcee"][1]
    assert r["coverage"] == d.target_met.mean() > 0
    assert r["accuracy_promised"] == (d.prediction == test_y)[d.target_met].mean()
    assert row["last_exit_accuracy"] == (test[-1].argmax(1) == test_y).mean()

    foreign = set_row(cal, meta("noise", labelled=False), test, np.full(len(test_y), -1), FRACTIONS, (0.8,))
    f = foreign["policies"]["pcee-lb-tail"][0]
    assert f["coverage"] == decide_all(cal, "pcee-lb-tail", test, 0.8).target_met.mean() > 0
    assert f["accuracy_promised"] == 0.0 and f["violation"]  # every promise on a foreign set is wrong


def test_markdown_flags_broken_promises(setup) -> None:
    cal, (test, test_y), (weak, weak_y) = setup
    rows = [set_row(cal, meta("clean"), test, test_y, FRACTIONS),
            set_row(cal, meta("weak", severity=3), weak, weak_y, FRACTIONS),
            set_row(cal, meta("noise", labelled=False), test, np.full(len(test_y), -1), FRACTIONS)]
    report = sets_report(rows, {"bundle": "toy"})
    json.dumps(report, allow_nan=False)
    assert report["policies"] == ["pcee-lb-tail"] and report["deltas"] == [0.8, 0.9, 0.95, 0.99]
    text = render_sets_markdown(report)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    weak90 = rows[1]["policies"]["pcee-lb-tail"][1]
    assert weak90["violation"]  # tables fitted on confident logits over-promise on weak ones
    assert f"{weak90['coverage']:.3f} / {weak90['accuracy_promised']:.3f} ✗" in lines["weak"]
    assert "✗" not in lines["noise"] and f"{rows[2]['policies']['pcee-lb-tail'][1]['coverage']:.3f}" in lines["noise"]
    breaks = {(b["set"], b["delta"]) for b in promise_breaks(report)}
    assert ("weak", 0.9) in breaks and ("noise", 0.8) in breaks
    clean_breaks = {r["delta"] for r in rows[0]["policies"]["pcee-lb-tail"] if r["violation"] and r["delta"] < 0.99}
    assert {d for s, d in breaks if s == "clean"} == clean_breaks  # labelled sets: only where promised < δ


def test_mismatched_logits_and_unknown_policies_are_refused(setup) -> None:
    cal, (test, test_y), _ = setup
    with pytest.raises(ValueError, match="3 exits"):
        set_row(cal, meta("x"), test[:2], test_y, FRACTIONS)
    with pytest.raises(ValueError, match="unknown policy"):
        set_row(cal, meta("x"), test, test_y, FRACTIONS, policies=("best",))
