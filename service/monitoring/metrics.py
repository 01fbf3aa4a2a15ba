"""Prometheus metrics (DESIGN.md §6): base units, no request ids or raw deltas as labels."""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# Sub-millisecond resolution: a CPU segment of a small model takes ~0.1 ms.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
FRACTION_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
DELTA_BUCKETS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97, 0.98, 0.99, 0.995, 1.0)


class SampleHistogram(Collector):
    """A labelled histogram fed a whole batch of per-sample values at once.

    prometheus_client's Histogram costs a lock and a Python bucket scan per observation; per-sample
    metrics of a 64-image batch would pay that hundreds of times on the hot path. Here one
    searchsorted + bincount per batch does it, and the exposition is the standard histogram's.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
                 registry: CollectorRegistry):
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        bounds = [float(b) for b in buckets]
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._bounds = np.asarray(bounds)
        self._les = [floatToGoString(b) for b in bounds]
        self._series: dict[tuple[str, ...], SampleHistogramChild] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def labels(self, *values: str) -> SampleHistogramChild:
        key = tuple(str(v) for v in values)
        with self._lock:
            child = self._series.get(key)
            if child is None:
                child = self._series[key] = SampleHistogramChild(self._bounds)
        return child

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            series = list(self._series.items())
        for key, child in series:
            counts, total = child.snapshot()
            family.add_metric(list(key), list(zip(self._les, np.cumsum(counts).tolist(), strict=True)), total)
        yield family


class SampleHistogramChild:
    def __init__(self, bounds: np.ndarray):
        self._bounds = bounds
        self._bound_list = bounds.tolist()
        self._counts = np.zeros(len(bounds), np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size <= 4:  # numpy's per-call overhead beats a plain bisect only for larger batches
            with self._lock:
                for value in values.tolist():
                    self._add(value)
            return
        # Bucket i holds values with bounds[i-1] < v <= bounds[i], as Prometheus' `le` says.
        counts = np.bincount(np.searchsorted(self._bounds, values, side="left"), minlength=len(self._bounds))
        with self._lock:
            self._counts += counts[: len(self._bounds)]
            self._sum += float(values.sum())

    def observe(self, value: float) -> None:
        """One value (a lone request's sample): a bisect, no arrays; the same bucket as `observe_many`."""
        with self._lock:
            self._add(value)

    def _add(self, value: float) -> None:
        """Count one value in the bucket `le` puts it in (the caller holds the lock)."""
        self._counts[bisect.bisect_left(self._bound_list, value)] += 1
        self._sum += value

    def snapshot(self) -> tuple[np.ndarray, float]:
        with self._lock:
            return self._counts.copy(), self._sum


class SampleSummary(Collector):
    """A labelled sum and count fed whole batches at once (a Summary without quantiles).

    Used where PromQL needs increase(sum) / increase(count) over a window: the mean estimate
    promised to labelled samples, the expected shadow agreement."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry):
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._series: dict[tuple[str, ...], list[float]] = {}  # key -> [count, sum]
        self._lock = threading.Lock()
        registry.register(self)

    def declare(self, *values: str) -> None:
        """Expose the series at 0 before its first observation (dashboards and rules see it)."""
        key = tuple(str(v) for v in values)
        with self._lock:
            self._series.setdefault(key, [0.0, 0.0])

    def observe_many(self, values: np.ndarray, *labels: str) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        key = tuple(str(v) for v in labels)
        with self._lock:
            series = self._series.setdefault(key, [0.0, 0.0])
            series[0] += values.size
            series[1] += float(values.sum())

    def collect(self) -> Iterator[SummaryMetricFamily]:
        family = SummaryMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            series = [(key, count, total) for key, (count, total) in self._series.items()]
        for key, count, total in series:
            family.add_metric(list(key), count_value=int(count), sum_value=total)
        yield family


class Metrics:
    """All of one server's metrics on its own registry (so several apps can live in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("exitserve_requests", "Requests answered, by protocol and HTTP status",
                                ["model", "protocol", "status"], registry=r)
        self.request_duration = Histogram("exitserve_request_duration_seconds", "Time from request arrival to answer",
                                          ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_duration = Histogram("exitserve_queue_duration_seconds", "Time a request waited for a batch",
                                        ["model"], buckets=LATENCY_BUCKETS, registry=r)
        # `segment` is "k", or "first-last" for a fused span run in one go (no exit in between could fire).
        self.segment_duration = Histogram("exitserve_segment_duration_seconds",
                                          "Time to run one segment (or fused span of segments) on one batch",
                                          ["model", "segment"], buckets=LATENCY_BUCKETS, registry=r)
        self.segment_occupancy = Histogram("exitserve_segment_occupancy",
                                           "Rows of a segment run over the engine batch size (1 = a full batch)",
                                           ["model", "segment"], buckets=FRACTION_BUCKETS, registry=r)
        self.batch_size = Histogram("exitserve_batch_size", "Samples per engine batch", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.exits = Counter("exitserve_exits", "Samples answered, by exit index", ["model", "exit"], registry=r)
        self.exit_depth = SampleHistogram("exitserve_exit_depth", "Exit index that answered each sample", ["model"],
                                    buckets=tuple(range(0, 17)), registry=r)
        self.compute_fraction = SampleHistogram("exitserve_compute_fraction",
                                          "FLOPs spent on a sample over the full model's FLOPs", ["model"],
                                          buckets=FRACTION_BUCKETS, registry=r)
        self.requested_delta = SampleHistogram("exitserve_requested_delta", "Accuracy target asked for, per sample",
                                         ["model"], buckets=DELTA_BUCKETS, registry=r)
        self.estimated_accuracy = SampleHistogram("exitserve_estimated_accuracy",
                                            "Estimated accuracy of each answer", ["model"],
                                            buckets=DELTA_BUCKETS, registry=r)
        self.target_missed = Counter("exitserve_target_missed",
                                     "Samples answered with target_met=false (even the last exit is below delta)",
                                     ["model"], registry=r)
        # Issue 26: why target_met was false, per sample: below_target, out_of_distribution (the input
        # guard), policy_unguarded. The out_of_distribution share is a drift signal that needs neither
        # labels nor shadow work (benchmarks/drift_shift.py, BENCHMARKS.md "Shifted streams").
        self.promise_withheld = Counter("exitserve_promise_withheld",
                                        "Samples answered with target_met=false, by the reason the promise was withheld",
                                        ["model", "reason"], registry=r)
        self.queue_depth = Gauge("exitserve_queue_depth", "Requests waiting for a batch", ["model"], registry=r)
        self.model_ready = Gauge("exitserve_model_ready", "1 when the model is loaded and warmed up", ["model"],
                                 registry=r)
        self.model_reloads = Counter("exitserve_model_reloads", "Hot reloads of a model, by outcome (ok or error)",
                                     ["model", "outcome"], registry=r)
        # Online accuracy monitoring (issue 8).
        self.feedback = Counter("exitserve_feedback", "Labelled samples scored, by the exit that answered them and "
                                "outcome (correct, incorrect)", ["model", "exit", "outcome"], registry=r)
        self.feedback_estimate = SampleSummary("exitserve_feedback_estimate",
                                               "Estimated accuracy promised for the labelled samples", ["model", "exit"],
                                               registry=r)
        self.feedback_unmatched = Counter("exitserve_feedback_unmatched",
                                          "Feedback items not scored: unknown (expired, evicted or never seen) or "
                                          "duplicate (labelled before)", ["model", "reason"], registry=r)
        self.shadow = Counter("exitserve_shadow", "Early-exited samples run on to the last exit, by exit and outcome "
                              "(agree, disagree with the last exit)", ["model", "exit", "outcome"], registry=r)
        self.shadow_expected = SampleSummary("exitserve_shadow_expected_agreement",
                                             "Calibration-time agreement with the last exit of each shadowed sample's "
                                             "confidence bin", ["model", "exit"], registry=r)
        # The shared decision store (EXITSERVE_DECISION_STORE=redis): its breaker's state and what it dropped.
        self.decision_store_up = Gauge("exitserve_decision_store_up",
                                       "1 while the shared decision store answers, 0 while its circuit breaker is open",
                                       ["model"], registry=r)
        self.decision_records_dropped = Counter("exitserve_decision_records_dropped",
                                                "Decision records not written to the shared store: queue_full (the "
                                                "writer is behind) or store_down (its breaker is open)",
                                                ["model", "reason"], registry=r)
        self.calibration_agreement = Gauge("exitserve_calibration_agreement",
                                           "Share of calibration samples on which the exit agrees with the last exit",
                                           ["model", "exit"], registry=r)
