"""A bounded, time-limited record of recent decisions, so labelled feedback can be scored (issue 8).

Per model, a ring buffer of the last `capacity` answered samples (columns of numpy arrays: no
Python object per sample) and a dict request id -> ring position of its first sample. What a
request needs besides (size, time, calibration, its id for eviction) sits in per-slot numpy columns
at its first slot, so a request costs one dict item and one int, about 130 bytes with its columns
for a single-sample request, plus its id (at most 128 characters; was ~330 bytes with an object per
entry in an OrderedDict). A request is forgotten when its first slot is overwritten, or is
"unknown" once older than the TTL; feedback for it is then "unknown", never an error. Engine threads
write, the event loop reads: one lock.

The request id is the server's (the X-Request-Id header, sent by the client or generated, and
`request_id` in v1 answers); `REQUEST_ID` carries it from the edge middleware to the dataplane.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from exitserve.calibration import POLICIES
from exitserve.errors import InvalidInput
from exitserve.service.monitoring.trace import Trace

SHADOW_NONE, SHADOW_AGREE, SHADOW_DISAGREE = 0, 1, 2
_POLICY_CODE = {name: i for i, name in enumerate(POLICIES)}  # in this process only: Redis stores names
# The policy order int8 codes were stored in before names were (read-only: old Redis records).
LEGACY_POLICY_ORDER: tuple[str, ...] = ("pcee", "pcee-ws", "pcee-lb", "pcee-cond", "pcee-ws-cond", "pcee-lb-cond",
                                        "pcee-lb-tail", "confidence", "per-exit-threshold", "full")


@dataclass(frozen=True)
class _Entry:
    """A request found in the record (built on lookup, not stored)."""

    start: int  # position of the first sample in the ring (monotonic; slot = position % capacity)
    size: int
    calibration: str  # key of the calibration the decisions (and traced confidences) came from


@dataclass(frozen=True)
class SampleDecision:
    """One recorded sample, as scored and logged."""

    exit: int
    prediction: int
    estimate: float
    delta: float
    policy: str
    target_met: bool
    confidence: float
    shadow: int  # SHADOW_NONE / _AGREE / _DISAGREE
    calibration: str
    trace: list[tuple[float, float, int]] | None  # per observed exit: confidence, margin, prediction


def _policy_names(policies: np.ndarray) -> str:
    """The policy of each sample as stored: one name for a request of one policy, else one per sample."""
    first = policies[0]
    if (policies == first).all():
        return str(first)
    return ",".join(str(p) for p in policies.tolist())


def _policy_codes(policies: np.ndarray) -> np.ndarray | int:
    first = policies[0]
    if (policies == first).all():  # the usual case: one policy per request
        return _POLICY_CODE.get(str(first), 0)
    return np.array([_POLICY_CODE.get(str(p), 0) for p in policies.tolist()], np.int8)


class UnknownIndex(InvalidInput):
    """Feedback names a sample index outside a known request."""


class DecisionStore:
    def __init__(self, capacity: int, ttl_s: float, num_exits: int, trace: bool = False):
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.num_exits = num_exits
        n = max(capacity, 0)
        self._exit = np.zeros(n, np.int16)
        self._prediction = np.zeros(n, np.int32)
        self._estimate = np.zeros(n, np.float32)
        self._delta = np.zeros(n, np.float32)
        self._confidence = np.zeros(n, np.float32)
        self._policy = np.zeros(n, np.int8)
        self._target_met = np.zeros(n, bool)
        self._labelled = np.zeros(n, bool)
        self._shadow = np.zeros(n, np.int8)
        self._trace = Trace.empty(n, num_exits) if trace else None
        # Per first slot of a request: its size (0 = no request starts here), time, calibration, id.
        self._req_size = np.zeros(n, np.int32)
        self._req_at = np.zeros(n, np.float64)
        self._req_cal = np.zeros(n, np.int16)
        self._req_id = np.full(n, None, dtype=object)
        self._calibrations: list[str] = []
        self._starts: dict[str, int] = {}
        self._head = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._starts)

    def compatible(self, num_exits: int, trace: bool) -> bool:
        return self.num_exits == num_exits and (self._trace is not None) == trace

    def record(self, request_id: str, policies: np.ndarray, deltas: np.ndarray, class_index: np.ndarray,
               exit_index: np.ndarray, estimate: np.ndarray, target_met: np.ndarray, confidence: np.ndarray | None,
               trace: Trace | None, calibration: str) -> int | None:
        """Store one answered request; returns its ring position (for shadow updates), None if not kept."""
        n = len(class_index)
        if not self.enabled or n == 0 or n > self.capacity:
            return None
        now = time.monotonic()
        if n == 1 and trace is None:
            return self._record_one(request_id, policies, deltas, class_index, exit_index, estimate, target_met,
                                    confidence, calibration, now)
        return self._record_many(request_id, policies, deltas, class_index, exit_index, estimate, target_met,
                                 confidence, trace, calibration, now)

    def _record_many(self, request_id: str, policies: np.ndarray, deltas: np.ndarray, class_index: np.ndarray,
                     exit_index: np.ndarray, estimate: np.ndarray, target_met: np.ndarray,
                     confidence: np.ndarray | None, trace: Trace | None, calibration: str, now: float) -> int:
        n = len(class_index)
        with self._lock:
            start = self._head
            slots = (start + np.arange(n)) % self.capacity
            self._evict_overwritten(slots, start)
            self._exit[slots] = exit_index
            self._prediction[slots] = class_index
            self._estimate[slots] = estimate
            self._delta[slots] = deltas
            self._confidence[slots] = 0.0 if confidence is None else confidence
            self._policy[slots] = _policy_codes(policies)
            self._target_met[slots] = target_met
            self._labelled[slots] = False
            self._shadow[slots] = SHADOW_NONE
            if self._trace is not None:
                if trace is None:
                    self._trace.confidence[slots] = np.nan
                    self._trace.margin[slots] = np.nan
                    self._trace.prediction[slots] = -1
                else:
                    self._trace.confidence[slots] = trace.confidence
                    self._trace.margin[slots] = trace.margin
                    self._trace.prediction[slots] = trace.prediction
            self._head = start + n
            self._starts[request_id] = start  # a reused id: the newest request wins
            first = start % self.capacity
            self._req_size[first] = n
            self._req_at[first] = now
            self._req_cal[first] = self._calibration_code(calibration)
            self._req_id[first] = request_id
        return start

    def _record_one(self, request_id: str, policies: np.ndarray, deltas: np.ndarray, class_index: np.ndarray,
                    exit_index: np.ndarray, estimate: np.ndarray, target_met: np.ndarray, confidence: np.ndarray | None,
                    calibration: str, now: float) -> int:
        """`record` for one untraced sample (a lone request): item assignments, no index arrays (issue 16)."""
        with self._lock:
            start = self._head
            slot = start % self.capacity
            if self._req_size[slot] > 0:
                self._evict_overwritten(np.array([slot]), start)
            self._exit[slot] = exit_index[0]
            self._prediction[slot] = class_index[0]
            self._estimate[slot] = estimate[0]
            self._delta[slot] = deltas[0]
            self._confidence[slot] = 0.0 if confidence is None else confidence[0]
            self._policy[slot] = _POLICY_CODE.get(str(policies[0]), 0)
            self._target_met[slot] = target_met[0]
            self._labelled[slot] = False
            self._shadow[slot] = SHADOW_NONE
            if self._trace is not None:
                self._trace.confidence[slot] = np.nan
                self._trace.margin[slot] = np.nan
                self._trace.prediction[slot] = -1
            self._head = start + 1
            self._starts[request_id] = start
            self._req_size[slot] = 1
            self._req_at[slot] = now
            self._req_cal[slot] = self._calibration_code(calibration)
            self._req_id[slot] = request_id
        return start

    def _calibration_code(self, calibration: str) -> int:
        if calibration not in self._calibrations:
            self._calibrations.append(calibration)
        return self._calibrations.index(calibration)

    def _evict_overwritten(self, slots: np.ndarray, start: int) -> None:
        """Forget the requests whose first slot is about to be overwritten (positions `start`..)."""
        for offset in np.flatnonzero(self._req_size[slots] > 0).tolist():
            slot = int(slots[offset])
            old_id = self._req_id[slot]
            if self._starts.get(old_id) == start + offset - self.capacity:  # not since reused by a newer request
                del self._starts[old_id]
            self._req_size[slot] = 0
            self._req_id[slot] = None

    def _lookup(self, request_id: str, now: float) -> _Entry | None:
        start = self._starts.get(request_id)
        if start is None or start < self._head - self.capacity:
            return None
        first = start % self.capacity
        if now - self._req_at[first] > self.ttl_s:
            return None
        return _Entry(start, int(self._req_size[first]), self._calibrations[int(self._req_cal[first])])

    def update_shadow(self, handle: object, rows: np.ndarray, agree: np.ndarray, trace: Trace | None) -> None:
        """Shadow outcomes (and the now complete traces) of rows of the request recorded at `handle`
        (its ring position, as `record` returned it)."""
        start = int(handle)  # type: ignore[call-overload]
        with self._lock:
            if start < self._head - self.capacity:
                return  # overwritten meanwhile
            slots = (start + rows) % self.capacity
            self._shadow[slots] = np.where(agree, SHADOW_AGREE, SHADOW_DISAGREE)
            if self._trace is not None and trace is not None:
                self._trace.confidence[slots] = trace.confidence
                self._trace.margin[slots] = trace.margin
                self._trace.prediction[slots] = trace.prediction

    def claim(self, wanted: list[tuple[str, int]]) -> list[SampleDecision | str]:
        """For each (request id, index): its decision, marked labelled, or "unknown" / "duplicate".

        Raises UnknownIndex (and marks nothing) when an index is outside a known request."""
        now = time.monotonic()
        with self._lock:
            entries = [self._lookup(request_id, now) for request_id, _ in wanted]
            for position, ((request_id, index), entry) in enumerate(zip(wanted, entries, strict=True)):
                if entry is not None and index >= entry.size:
                    raise UnknownIndex(f"[{position}].index: {index} is out of range; request {request_id!r} "
                                       f"had {entry.size} sample(s)")
            out: list[SampleDecision | str] = []
            for (_, index), entry in zip(wanted, entries, strict=True):
                if entry is None:
                    out.append("unknown")
                    continue
                slot = (entry.start + index) % self.capacity
                if self._labelled[slot]:
                    out.append("duplicate")
                    continue
                self._labelled[slot] = True
                out.append(self._decision(slot, entry.calibration))
            return out

    def release(self, claimed: list[tuple[str, int]]) -> None:
        """Undo `claim` for these (request id, index) pairs: their labels were not written, so a retry
        must find them claimable again (not "duplicate")."""
        now = time.monotonic()
        with self._lock:
            for request_id, index in claimed:
                entry = self._lookup(request_id, now)
                if entry is not None and index < entry.size:
                    self._labelled[(entry.start + index) % self.capacity] = False

    def _decision(self, slot: int, calibration: str) -> SampleDecision:
        trace = None
        if self._trace is not None:
            seen = self._trace.prediction[slot] >= 0
            trace = [(float(c), float(m), int(p)) for c, m, p, s in zip(
                self._trace.confidence[slot].tolist(), self._trace.margin[slot].tolist(),
                self._trace.prediction[slot].tolist(), seen.tolist(), strict=True) if s]
        return SampleDecision(
            exit=int(self._exit[slot]), prediction=int(self._prediction[slot]), estimate=float(self._estimate[slot]),
            delta=float(self._delta[slot]), policy=POLICIES[int(self._policy[slot])],
            target_met=bool(self._target_met[slot]), confidence=float(self._confidence[slot]),
            shadow=int(self._shadow[slot]), calibration=calibration, trace=trace,
        )
