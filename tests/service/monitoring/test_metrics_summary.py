"""SampleSummary: the sum/count pair the drift rules divide, fed a batch at a time."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exitserve.service.monitoring.metrics import SampleSummary


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_declared_series_exist_at_zero_and_batches_add_up() -> None:
    registry = CollectorRegistry()
    summary = SampleSummary("exitserve_test_estimate", "doc", ["model", "exit"], registry=registry)
    summary.declare("m", "0")
    key = (("exit", "0"), ("model", "m"))
    assert samples(registry) == {("exitserve_test_estimate_count", key): 0.0, ("exitserve_test_estimate_sum", key): 0.0}
    summary.observe_many(np.array([0.5, 0.75]), "m", "0")
    summary.observe_many(np.array([1.0]), "m", "0")
    summary.observe_many(np.array([0.25]), "m", "1")
    got = samples(registry)
    assert got[("exitserve_test_estimate_count", key)] == 3 and got[("exitserve_test_estimate_sum", key)] == 2.25
    assert got[("exitserve_test_estimate_count", (("exit", "1"), ("model", "m")))] == 1
