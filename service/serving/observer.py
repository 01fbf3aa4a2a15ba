"""The batcher's one observer for a served model: Prometheus figures and the decision record.

Runs on engine threads. Label children are resolved once here (a `labels()` lookup takes a lock on
every call); monitoring gets plain arrays, so it never depends on the batcher's types.
"""

from __future__ import annotations

import numpy as np

from exitserve.calibration.reasons import REASON_NAMES
from exitserve.service.monitoring.metrics import Metrics
from exitserve.service.monitoring.monitor import ModelMonitor
from exitserve.service.serving.batcher import ItemResult, WorkItem
from exitserve.service.serving.engine import BatchResult


class ModelObserver:
    def __init__(self, name: str, compute_fractions: np.ndarray, metrics: Metrics, monitor: ModelMonitor,
                 max_batch_size: int):
        num_exits = len(compute_fractions)
        self.compute_fractions = compute_fractions
        self._fraction_list: list[float] = compute_fractions.tolist()
        self.monitor = monitor
        self.max_batch_size = max_batch_size
        self._segment_histograms = {
            (first, last): (metrics.segment_duration.labels(name, label), metrics.segment_occupancy.labels(name, label))
            for first in range(num_exits) for last in range(first, num_exits)
            for label in [str(first) if first == last else f"{first}-{last}"]
        }
        self._exit_counters = [metrics.exits.labels(name, str(k)) for k in range(num_exits)]
        self._queue_duration = metrics.queue_duration.labels(name)
        self._batch_size = metrics.batch_size.labels(name)
        self._exit_depth = metrics.exit_depth.labels(name)
        self._compute_fraction = metrics.compute_fraction.labels(name)
        self._estimated_accuracy = metrics.estimated_accuracy.labels(name)
        self._requested_delta = metrics.requested_delta.labels(name)
        self._target_missed = metrics.target_missed.labels(name)  # exists at 0 before the first miss
        # One child per reason code (calibration.reasons), each at 0 from the start; code 0 is "promised".
        self._withheld = [None, *(metrics.promise_withheld.labels(name, reason) for reason in REASON_NAMES[1:])]

    def segment_done(self, first: int, last: int, rows: int, seconds: float) -> None:
        duration, occupancy = self._segment_histograms[first, last]
        duration.observe(seconds)
        occupancy.observe(min(rows / self.max_batch_size, 1.0))

    def answered(self, item: WorkItem, result: ItemResult) -> None:
        self._queue_duration.observe(max(result.queue_seconds, 0.0))
        if len(result.exit_index) == 1:
            self._answered_one(item, result)
        else:
            self._answered_many(item, result)

    def _answered_many(self, item: WorkItem, result: ItemResult) -> None:
        counts = np.bincount(result.exit_index, minlength=len(self._exit_counters))
        for counter, count in zip(self._exit_counters, counts.tolist(), strict=True):
            if count:
                counter.inc(count)
        self._exit_depth.observe_many(result.exit_index)
        self._compute_fraction.observe_many(self.compute_fractions[result.exit_index])
        self._estimated_accuracy.observe_many(result.estimate)
        self._requested_delta.observe_many(item.deltas)
        missed = int(np.count_nonzero(~result.target_met))
        if missed:
            self._target_missed.inc(missed)
            if result.reason is not None:
                for code, count in enumerate(np.bincount(result.reason, minlength=len(self._withheld)).tolist()):
                    withheld = self._withheld[code]
                    if count and withheld is not None:
                        withheld.inc(count)
        self._record(item, result)

    def batch_done(self, items: list[WorkItem], offsets: np.ndarray, result: BatchResult) -> None:
        self._batch_size.observe(int(offsets[-1]))
        self.monitor.observe_shadows([item.record_slot for item in items], offsets, result.class_index,
                                     result.exit_index, result.shadow_prediction, result.confidence, result.trace)

    def _answered_one(self, item: WorkItem, result: ItemResult) -> None:
        """`answered` for a request of one sample: the same figures and record, from scalars (issue 16)."""
        k = int(result.exit_index[0])
        self._exit_counters[k].inc(1)
        self._exit_depth.observe(k)
        self._compute_fraction.observe(self._fraction_list[k])
        self._estimated_accuracy.observe(float(result.estimate[0]))
        self._requested_delta.observe(float(item.deltas[0]))
        if not result.target_met[0]:
            self._target_missed.inc(1)
            counter = self._withheld[int(result.reason[0])] if result.reason is not None else None
            if counter is not None:
                counter.inc(1)
        self._record(item, result)

    def _record(self, item: WorkItem, result: ItemResult) -> None:
        item.record_slot = self.monitor.record(
            item.request_id, item.policies, item.deltas, result.class_index, result.exit_index, result.estimate,
            result.target_met, result.confidence, result.trace,
        )
