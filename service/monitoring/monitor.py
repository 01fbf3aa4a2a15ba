"""Online accuracy monitoring of one served model (issue 8): record decisions, score labelled
feedback, count shadow agreement, write the feedback log.

`record` and `observe_shadows` run on engine threads (the serving layer's batch observer calls them
with plain arrays: monitoring knows nothing of batches or requests); `score` runs on the event loop.
A failure here is logged and never fails a request.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np

from exitserve.calibration import Calibration
from exitserve.service.monitoring.decisions import (
    SHADOW_AGREE,
    SHADOW_DISAGREE,
    DecisionStore,
    SampleDecision,
)
from exitserve.service.monitoring.feedback_log import (
    LOG_VERSION,
    FeedbackLog,
    FeedbackNotWritten,
    calibration_key,
)
from exitserve.service.monitoring.metrics import Metrics
from exitserve.service.monitoring.redis_store import RedisDecisionStore, StoreUnavailable
from exitserve.service.monitoring.trace import Trace
from exitserve.service.settings import Settings

log = logging.getLogger("exitserve.monitoring")
_SHADOW_NAMES = {SHADOW_AGREE: "agree", SHADOW_DISAGREE: "disagree"}


@dataclass(frozen=True)
class Scored:
    status: str  # scored, unknown, duplicate
    decision: SampleDecision | None = None
    correct: bool | None = None


class ModelMonitor:
    def __init__(self, name: str, version: str, calibration: Calibration, metrics: Metrics, settings: Settings):
        self.name = name
        self.version = version
        self.calibration = calibration
        self.num_exits = calibration.num_exits
        self.key = calibration_key(calibration)
        self.log = FeedbackLog.shared(settings.feedback_log) if settings.feedback_log else None
        self.trace = self.log is not None  # per-exit traces are only needed for the log
        self.store: DecisionStore | RedisDecisionStore
        if settings.decision_store == "redis":  # shared by every replica (labels may reach any of them)
            self.store = RedisDecisionStore(settings.redis_url, name, settings.feedback_capacity, settings.feedback_ttl_s,
                                            self.num_exits, self.trace, metrics)
        else:
            self.store = DecisionStore(settings.feedback_capacity, settings.feedback_ttl_s, self.num_exits, self.trace)
        exits = [str(k) for k in range(self.num_exits)]
        # Every series exists at 0 from the start, so rates and rules have data before the first event.
        self._feedback = {(k, o): metrics.feedback.labels(name, k, o) for k in exits for o in ("correct", "incorrect")}
        self._estimate = metrics.feedback_estimate
        self._unmatched = {r: metrics.feedback_unmatched.labels(name, r) for r in ("unknown", "duplicate")}
        self._shadow = {(k, o): metrics.shadow.labels(name, k, o) for k in exits[:-1] for o in ("agree", "disagree")}
        self._shadow_expected = metrics.shadow_expected
        for k in exits:
            self._estimate.declare(name, k)
        for k in exits[:-1]:
            self._shadow_expected.declare(name, k)
        self._agreement = [calibration.agreement(k) for k in range(self.num_exits)]
        for index, agreement in enumerate(self._agreement):
            if agreement is None:  # calibrated before agreement was recorded: no reference to show
                with contextlib.suppress(KeyError):
                    metrics.calibration_agreement.remove(name, str(index))
            else:
                metrics.calibration_agreement.labels(name, str(index)).set(agreement[1])

    def adopt(self, previous: ModelMonitor) -> None:
        """After a hot reload: keep the decisions answered by the previous model scoreable."""
        if previous.store.compatible(self.num_exits, self.trace) and previous.store.capacity == self.store.capacity:
            self.store = previous.store

    # --- engine threads -------------------------------------------------------------------------

    def record(self, request_id: str | None, policies: np.ndarray, deltas: np.ndarray, class_index: np.ndarray,
               exit_index: np.ndarray, estimate: np.ndarray, target_met: np.ndarray, confidence: np.ndarray | None,
               trace: Trace | None) -> object | None:
        """Remember one answered request for feedback; its handle in the record (for shadow updates) or None."""
        if request_id is None or not self.store.enabled:
            return None
        try:
            return self.store.record(request_id, policies, deltas, class_index, exit_index, estimate, target_met,
                                     confidence, trace, self.key)
        except Exception:  # monitoring must never fail an answer
            log.exception("recording a decision failed", extra={"model": self.name})
            return None

    def observe_shadows(self, slots: list[object | None], offsets: np.ndarray, class_index: np.ndarray,
                        exit_index: np.ndarray, shadow_prediction: np.ndarray | None, confidence: np.ndarray | None,
                        trace: Trace | None) -> None:
        """Shadow outcomes of one batch: rows `offsets[i]`.. belong to the request recorded at `slots[i]`."""
        if shadow_prediction is None:
            return
        try:
            self._observe_shadows(slots, offsets, class_index, exit_index, shadow_prediction, confidence, trace)
        except Exception:
            log.exception("shadow bookkeeping failed", extra={"model": self.name})

    def _observe_shadows(self, slots: list[object | None], offsets: np.ndarray, class_index: np.ndarray,
                         exit_index: np.ndarray, shadow_prediction: np.ndarray, confidence: np.ndarray | None,
                         trace: Trace | None) -> None:
        rows = np.flatnonzero(shadow_prediction >= 0)
        if not len(rows):
            return
        exits = exit_index[rows]
        agree = class_index[rows] == shadow_prediction[rows]
        for k in np.unique(exits).tolist():
            mine = exits == k
            hits = int(np.count_nonzero(agree[mine]))
            if hits:
                self._shadow[(str(k), "agree")].inc(hits)
            if hits < mine.sum():
                self._shadow[(str(k), "disagree")].inc(int(mine.sum()) - hits)
            reference = self._agreement[k]
            if reference is not None and confidence is not None:
                bins = self.calibration.bin_index(k, confidence[rows[mine]])
                self._shadow_expected.observe_many(reference[0][bins], self.name, str(k))
        owners = np.searchsorted(offsets, rows, side="right") - 1
        for owner in np.unique(owners).tolist():
            slot = slots[owner]
            if slot is None:
                continue
            mine = owners == owner
            local = rows[mine] - offsets[owner]
            self.store.update_shadow(slot, local, agree[mine], None if trace is None else trace.rows(rows[mine]))

    # --- event loop -------------------------------------------------------------------------------

    def score(self, wanted: list[tuple[str, int, int]]) -> list[Scored]:
        """Score (request id, index, class index) items; raises decisions.UnknownIndex before changing anything.

        Scored means written: with a feedback log, the lines are written before anything is counted,
        and when the log fails (FeedbackNotWritten, a 503) the claims are undone, so the client's
        retry scores the same samples instead of being told "duplicate"."""
        try:
            claims = self.store.claim([(request_id, index) for request_id, index, _ in wanted])
        except StoreUnavailable:
            self._log_unscored(wanted)
            raise
        now = time.time()
        claimed = [(request_id, index) for (request_id, index, _), claim in zip(wanted, claims, strict=True)
                   if not isinstance(claim, str)]
        if self.log is not None and claimed:
            lines = [self._line(now, request_id, index, label, claim, claim.prediction == label)
                     for (request_id, index, label), claim in zip(wanted, claims, strict=True)
                     if not isinstance(claim, str)]
            try:
                self.log.write(lines)
            except FeedbackNotWritten:
                self.store.release(claimed)
                log.error("feedback log write failed; the labels were not scored and may be sent again",
                          extra={"model": self.name, "samples": len(claimed)})
                raise
        out: list[Scored] = []
        estimates: dict[int, list[float]] = {}
        for (_, _, label), claim in zip(wanted, claims, strict=True):
            if isinstance(claim, str):
                self._unmatched[claim].inc()
                out.append(Scored(claim))
                continue
            correct = claim.prediction == label
            self._feedback[(str(claim.exit), "correct" if correct else "incorrect")].inc()
            estimates.setdefault(claim.exit, []).append(claim.estimate)
            out.append(Scored("scored", claim, correct))
        for k, values in estimates.items():
            self._estimate.observe_many(np.asarray(values), self.name, str(k))
        return out

    @property
    def store_state(self) -> str:
        """"memory" (in-process), or the shared store's "up" / "down"."""
        return self.store.state if isinstance(self.store, RedisDecisionStore) else "memory"

    def _log_unscored(self, wanted: list[tuple[str, int, int]]) -> None:
        """The shared store is down: the labels still reach the feedback log, as lines without a decision
        (`"scored": false`; readers skip them, and the client's retry writes the scored line)."""
        if self.log is None:
            return
        now = round(time.time(), 3)
        try:
            self.log.write({"v": LOG_VERSION, "time": now, "model": self.name, "version": self.version,
                            "calibration": self.key, "request_id": request_id, "index": index, "label": label,
                            "scored": False, "exits": None} for request_id, index, label in wanted)
        except FeedbackNotWritten:
            log.warning("feedback log write failed too; the unscored labels were not kept",
                        extra={"model": self.name, "samples": len(wanted)})

    def _line(self, now: float, request_id: str, index: int, label: int, d: SampleDecision, correct: bool) -> dict:
        return {
            "v": LOG_VERSION, "time": round(now, 3), "model": self.name, "version": self.version,
            "calibration": d.calibration, "request_id": request_id, "index": index, "label": label,
            "prediction": d.prediction, "correct": correct, "exit": d.exit, "estimate": round(d.estimate, 6),
            "delta": round(d.delta, 6), "policy": d.policy, "target_met": d.target_met,
            "shadow": _SHADOW_NAMES.get(d.shadow),
            "exits": None if d.trace is None else [[round(c, 7), round(m, 7), p] for c, m, p in d.trace],
        }

