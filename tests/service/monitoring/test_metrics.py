import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from exitserve.service.monitoring.metrics import SampleHistogram


def _series(text: str, name: str) -> list[str]:
    # Bucket, count and sum lines; `_created` (a timestamp) is not ours to match.
    return [line for line in text.splitlines() if line.startswith(name) and not line.startswith(f"{name}_created")]


def test_sample_histogram_exposes_what_a_prometheus_histogram_would() -> None:
    values = np.array([0.0, 0.5, 0.5, 0.85, 0.9, 0.93, 1.0, 1.0, 2.0, -1.0])
    buckets = (0.5, 0.85, 0.9, 1.0)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    sample = SampleHistogram("a_metric", "doc", ["model"], buckets=buckets, registry=ours)
    sample.labels("m").observe_many(values[:6])  # the vectorised path
    sample.labels("m").observe_many(values[6:8])  # the small-batch path
    hist = Histogram("a_metric", "doc", ["model"], buckets=buckets, registry=theirs)
    sample.labels("m").observe_many(values[8:])  # the same child again: values accumulate
    for v in values[:3].tolist():  # one value at a time (a lone request's path)
        sample.labels("m").observe(v)
    values = np.concatenate([values, values[:3]])
    for v in values:
        hist.labels("m").observe(v)
    assert _series(generate_latest(ours).decode(), "a_metric") == _series(generate_latest(theirs).decode(), "a_metric")


def test_series_exist_per_label_set() -> None:
    registry = CollectorRegistry()
    metric = SampleHistogram("b_metric", "doc", ["model"], buckets=(1.0,), registry=registry)
    metric.labels("x").observe(0.5)
    metric.labels("y").observe_many(np.array([2.0, 3.0]))
    text = generate_latest(registry).decode()
    assert 'b_metric_count{model="x"} 1.0' in text and 'b_metric_count{model="y"} 2.0' in text
    assert 'b_metric_bucket{le="+Inf",model="y"} 2.0' in text and 'b_metric_sum{model="y"} 5.0' in text
