"""The observer's one-sample path (issue 16) reports what its general path reports."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from prometheus_client import generate_latest

from exitserve.calibration import POLICIES, Calibration
from exitserve.models.bundle import load_bundle
from exitserve.service.monitoring.metrics import Metrics
from exitserve.service.monitoring.monitor import ModelMonitor
from exitserve.service.serving.batcher import ItemResult, WorkItem
from exitserve.service.serving.observer import ModelObserver
from exitserve.service.settings import Settings


def _observer(calibration: Calibration) -> tuple[ModelObserver, Metrics]:
    metrics = Metrics()
    monitor = ModelMonitor("m", "1", calibration, metrics, Settings(feedback_capacity=50))
    return ModelObserver("m", np.linspace(0.3, 1.0, calibration.num_exits), metrics, monitor, 8), metrics


def _metric_lines(metrics: Metrics) -> list[str]:
    return [line for line in generate_latest(metrics.registry).decode().splitlines() if "_created" not in line]


def test_one_sample_answers_give_the_general_paths_metrics_and_records(digits_bundle: Path) -> None:
    bundle = load_bundle(digits_bundle)
    calibration = Calibration.from_dict(bundle.calibration, bundle.manifest.num_exits)
    (fast, fast_metrics), (general, general_metrics) = _observer(calibration), _observer(calibration)
    rng = np.random.default_rng(2)
    loop = asyncio.new_event_loop()
    try:
        for i in range(40):
            k = int(rng.integers(0, calibration.num_exits))
            # Bucket bounds included: an estimate or δ exactly on a bound lands in the same bucket on both paths.
            estimate, delta = rng.choice([0.5, 0.9, 0.95, 0.9312, 1.0]), rng.choice([0.8, 0.9, 0.975, 0.99])
            result = ItemResult(np.array([i % 10]), np.array([k]), np.array([estimate]), np.array([i % 3 > 0]), None,
                                queue_seconds=1e-4 * i, confidence=np.array([0.7]))
            for observer, answer in ((fast, fast.answered), (general, general._answered_many)):
                item = WorkItem(np.zeros((1, 2), np.float32), np.array([delta]),
                                np.array([POLICIES[i % len(POLICIES)]], dtype=object), None, loop, loop.create_future(),
                                request_id=f"r{i}")
                if observer is general:
                    observer._queue_duration.observe(result.queue_seconds)
                answer(item, result)
                assert item.record_slot == i
    finally:
        loop.close()
    assert _metric_lines(fast_metrics) == _metric_lines(general_metrics)
    assert any(line.startswith("exitserve_target_missed_total") and not line.endswith(" 0.0")
               for line in _metric_lines(fast_metrics))
    wanted = [(f"r{i}", 0) for i in range(40)]
    assert fast.monitor.store.claim(wanted) == general.monitor.store.claim(wanted)
