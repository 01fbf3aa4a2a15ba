"""The model monitor in process: decisions recorded from plain arrays, feedback scored once, shadows counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from exitserve.calibration import Calibration
from exitserve.models.bundle import load_bundle
from exitserve.service.monitoring.metrics import Metrics
from exitserve.service.monitoring.monitor import ModelMonitor
from exitserve.service.monitoring.trace import Trace
from exitserve.service.settings import Settings


@pytest.fixture
def calibration(digits_bundle: Path) -> Calibration:
    bundle = load_bundle(digits_bundle)
    return Calibration.from_dict(bundle.calibration, bundle.manifest.num_exits)


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_recorded_answers_are_scored_once_and_logged(calibration: Calibration, tmp_path: Path) -> None:
    metrics = Metrics()
    log_path = tmp_path / "feedback.jsonl"
    monitor = ModelMonitor("digits", "1", calibration, metrics, Settings(feedback_log=log_path))
    n, exits = 3, calibration.num_exits
    trace = Trace.empty(n, exits)
    trace.confidence[:, 0], trace.margin[:, 0], trace.prediction[:, 0] = 0.9, 0.5, [4, 7, 1]
    slot = monitor.record("req-1", np.full(n, "pcee", dtype=object), np.full(n, 0.9), np.array([4, 7, 1]),
                          np.array([0, 0, 0]), np.array([0.95, 0.91, 0.97]), np.array([True, True, True]),
                          np.array([0.9, 0.9, 0.9]), trace)
    assert slot == 0

    scored = monitor.score([("req-1", 0, 4), ("req-1", 1, 3), ("req-1", 0, 4), ("req-2", 0, 1)])
    assert [s.status for s in scored] == ["scored", "scored", "duplicate", "unknown"]
    assert [s.correct for s in scored[:2]] == [True, False]
    assert _value(metrics, "exitserve_feedback_total", model="digits", exit="0", outcome="correct") == 1
    assert _value(metrics, "exitserve_feedback_total", model="digits", exit="0", outcome="incorrect") == 1
    assert _value(metrics, "exitserve_feedback_unmatched_total", model="digits", reason="duplicate") == 1
    assert _value(metrics, "exitserve_feedback_unmatched_total", model="digits", reason="unknown") == 1
    lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines()]
    assert [(line["index"], line["label"], line["correct"]) for line in lines] == [(0, 4, True), (1, 3, False)]
    assert lines[0]["exits"][0] == [pytest.approx(0.9), pytest.approx(0.5), 4]


def test_shadow_outcomes_count_per_exit_and_reach_the_record(calibration: Calibration) -> None:
    metrics = Metrics()
    monitor = ModelMonitor("digits", "1", calibration, metrics, Settings())
    exit_index = np.array([0, 0, 1, calibration.num_exits - 1])
    slot = monitor.record("req", np.full(4, "pcee", dtype=object), np.full(4, 0.9), np.array([1, 2, 3, 4]),
                          exit_index, np.full(4, 0.9), np.ones(4, bool), np.full(4, 0.9), None)
    # Rows 0-2 left early and were run on as shadows: the last exit said 1, 9, 3.
    monitor.observe_shadows([slot], np.array([0, 4]), np.array([1, 2, 3, 4]), exit_index,
                            np.array([1, 9, 3, -1]), np.full(4, 0.9), None)
    assert _value(metrics, "exitserve_shadow_total", model="digits", exit="0", outcome="agree") == 1
    assert _value(metrics, "exitserve_shadow_total", model="digits", exit="0", outcome="disagree") == 1
    assert _value(metrics, "exitserve_shadow_total", model="digits", exit="1", outcome="agree") == 1
    decision = monitor.score([("req", 1, 2)])[0].decision
    assert decision is not None and decision.shadow == 2  # SHADOW_DISAGREE


def test_feedback_off_records_nothing(calibration: Calibration) -> None:
    monitor = ModelMonitor("digits", "1", calibration, Metrics(), Settings(feedback_capacity=0))
    assert monitor.record("req", np.array(["pcee"], dtype=object), np.array([0.9]), np.array([1]), np.array([0]),
                          np.array([0.9]), np.array([True]), None, None) is None
