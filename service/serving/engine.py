"""The exit engine (docs/DESIGN.md §4): run a batch segment by segment, let samples leave, compact the rest.

Each sample carries its own delta and policy. After segment k the calibration package's
`Calibration.step` (the same function `exitserve evaluate` uses offline) decides who leaves; those
samples are reported at once through `on_exit`, and only the survivors' rows go on.

Exits that cannot fire are skipped (issue 16): a batch runs from one *stop* (an exit where
`Calibration.firing_exits` says one of its samples may leave, or the last exit) to the next, as one
fused span graph where the bundle has it, so the heads in between are never computed. A batch's rows
travel as `Flight`s; `advance` may run flights of several batches that wait at the same segment as one
(segment-level continuous batching, driven by the batcher).

Shadow checks (issue 8): with `shadow_fraction` > 0, that share of the samples that leave at an
early exit is answered as usual (reported through `on_exit`, so the response is not delayed) but
their rows stay in the batch, undecided, until the last exit; its prediction lands in
`BatchResult.shadow_prediction` for a label-free agreement check. With `trace` on, every exit's
confidence, top-2 margin and prediction are kept per row (what recalibration from feedback needs).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from exitserve.calibration import Calibration
from exitserve.calibration.confidence import confidence_from_probs, top2_margin
from exitserve.models.tokens import length_batches
from exitserve.service.monitoring.trace import Trace
from exitserve.service.runners.base import SegmentRunner


@dataclass
class BatchResult:
    class_index: np.ndarray  # int64 [n]
    exit_index: np.ndarray  # int64 [n]
    estimate: np.ndarray  # float64 [n]
    target_met: np.ndarray  # bool [n]
    probabilities: np.ndarray | None  # float32 [n, C] where asked for (rows not asked for are zeros)
    confidence: np.ndarray  # float64 [n]: the confidence measure at the answering exit
    promised: np.ndarray  # float64 [n]: the guarded accuracy the promise rests on (>= δ where target_met)
    reason: np.ndarray  # uint8 [n]: why target_met is False (calibration.reasons; 0 where it is True)
    shadow_prediction: np.ndarray | None = None  # int64 [n]: last exit's class for shadowed rows, else -1
    trace: Trace | None = None


def _names(policies: np.ndarray) -> list[str]:
    """The distinct policy names of a batch (np.unique on an object array sorts Python strings: slow)."""
    first = policies[0]
    if len(policies) == 1 or bool((policies == first).all()):
        return [str(first)]
    return [str(name) for name in np.unique(policies)]


_ONE_ROW = np.zeros(1, np.int64)  # `keep` of a one-row flight that runs on
_ONE_ROW.flags.writeable = False

ExitCallback = Callable[[np.ndarray, BatchResult], None]
SegmentTimer = Callable[[int, int, int, float], None]  # (first segment, last segment, rows, seconds) of one run


class ExitEngine:
    def __init__(self, runner: SegmentRunner, calibration: Calibration, shadow_fraction: float = 0.0, trace: bool = False,
                 token_budget: int = 4096):
        if calibration.num_exits != runner.num_exits:
            raise ValueError(f"calibration has {calibration.num_exits} exits, the model {runner.num_exits}")
        if not 0.0 <= shadow_fraction <= 1.0:
            raise ValueError(f"shadow_fraction must lie in [0, 1], got {shadow_fraction}")
        self.runner = runner
        self.calibration = calibration
        self.num_classes = len(runner.bundle.manifest.labels)
        self.shadow_fraction = shadow_fraction
        self.trace = trace
        text = runner.bundle.manifest.input.text
        self.pad_id = text.pad_id if text is not None else None  # token-id input: batches may be split by length
        self.token_budget = token_budget
        # The input guard applies where the calibration has one and the runner gives its features.
        guard = calibration.input_guard
        self.input_guard = guard if guard is not None and runner.features == guard.features else None
        self._local = threading.local()  # numpy Generators are not thread-safe; one per engine thread

    def _rng(self) -> np.random.Generator:
        rng = getattr(self._local, "rng", None)
        if rng is None:
            rng = self._local.rng = np.random.default_rng()
        return rng

    def _record_trace(self, trace: Trace, k: int, rows: np.ndarray, logits: np.ndarray) -> None:
        probs = self.calibration.probabilities(k, logits)
        trace.confidence[rows, k] = confidence_from_probs(probs, self.calibration.measure)
        trace.margin[rows, k] = top2_margin(probs)
        trace.prediction[rows, k] = logits.argmax(axis=1)

    def run(
        self,
        x: np.ndarray,
        deltas: np.ndarray,
        policies: np.ndarray,
        want_probabilities: np.ndarray | None = None,
        on_exit: ExitCallback | None = None,
        segment_timer: SegmentTimer | None = None,
        guarded: np.ndarray | None = None,
    ) -> BatchResult:
        """Decide every sample of `x`; `policies` is an array of policy names, one per sample;
        `guarded` [n] bool: apply the input guard to the sample (None: to every sample)."""
        result, flights = self.start(x, deltas, policies, want_probabilities, on_exit, guarded)
        for flight in flights:
            while not flight.done:
                self.advance([flight], segment_timer)
        return result

    def start(self, x: np.ndarray, deltas: np.ndarray, policies: np.ndarray, want_probabilities: np.ndarray | None = None,
              on_exit: ExitCallback | None = None, guarded: np.ndarray | None = None) -> tuple[BatchResult, list[Flight]]:
        """A batch's result (filled as its samples leave) and its flights, for a caller that advances
        them itself, possibly together with other batches' flights (segment-level continuous batching)."""
        n = len(x)
        result = BatchResult(
            class_index=np.zeros(n, np.int64),
            exit_index=np.zeros(n, np.int64),
            estimate=np.zeros(n, np.float64),
            target_met=np.zeros(n, bool),
            probabilities=np.zeros((n, self.num_classes), np.float32) if want_probabilities is not None and want_probabilities.any() else None,
            confidence=np.zeros(n, np.float64),
            promised=np.zeros(n, np.float64),
            reason=np.zeros(n, np.uint8),
            shadow_prediction=np.full(n, -1, np.int64) if self.shadow_fraction > 0 else None,
            trace=Trace.empty(n, self.runner.num_exits) if self.trace else None,
        )
        # The guard's verdict per sample, known once segment 0 has run; None while no sample is guarded.
        apply_guard = self.input_guard is not None and (guarded is None or bool(guarded.any()))
        in_distribution = np.ones(n, bool) if apply_guard else None
        batch = _Batch(result, deltas, policies, _names(policies), want_probabilities, on_exit, in_distribution,
                       guarded if apply_guard else None)
        return result, self._flights(x, batch)

    def _flights(self, x: np.ndarray, batch: _Batch) -> list[Flight]:
        return [Flight(self, batch, rows, self.runner.start(chunk)) for rows, chunk in self._chunks(x)]

    def advance(self, flights: list[Flight], segment_timer: SegmentTimer | None = None) -> None:
        """Run flights that wait at the same segment, as one batch, on to the first exit where one of
        their samples may leave; each then decides for its own rows (a flight that cannot exit there
        just moves on). Flights of a text model merge only when their tensors have the same shape."""
        position = flights[0].position
        stops = [flight.next_stop() for flight in flights]
        stop = min(stops)
        if len(flights) == 1:
            state = flights[0].state
        else:
            state = self.runner.concat([flight.state for flight in flights])
        rows = sum(len(flight.active) for flight in flights)
        started = time.perf_counter()
        state, logits = self.runner.run_span(position, stop, state)
        if position == 0:
            self._judge_inputs(flights, state)
        if segment_timer:
            segment_timer(position, stop, rows, time.perf_counter() - started)
        offset = 0
        for flight, own_stop in zip(flights, stops, strict=True):
            n = len(flight.active)
            keep = flight.decide(stop, logits[offset : offset + n], can_leave=own_stop == stop)
            if keep is not None:
                if len(flights) > 1:
                    flight.state = self.runner.select(state, keep + offset)
                else:
                    flight.state = state if len(keep) == n else self.runner.select(state, keep)
            offset += n

    def _judge_inputs(self, flights: list[Flight], state: dict) -> None:
        """The input guard on the features segment 0 left in `state` (taken out: the next segment does not read
        them; read to the host only when some sample here is guarded)."""
        if self.input_guard is None or all(flight.batch.in_distribution is None for flight in flights):
            self.runner.take_features(state, read=False)
            return
        features = self.runner.take_features(state)
        if features is None:
            return
        offset = 0
        for flight in flights:
            n = len(flight.active)
            batch = flight.batch
            if batch.in_distribution is not None:
                typical = self.input_guard.in_distribution(features[offset : offset + n])
                if batch.guarded is not None:
                    typical |= ~batch.guarded[flight.active]
                batch.in_distribution[flight.active] = typical
            offset += n

    def _next_stop(self, position: int, policies: np.ndarray, deltas: np.ndarray) -> int:
        """The first exit at or after `position` where a sample running under `policies`/`deltas` may leave."""
        last = self.runner.num_exits - 1
        if self.trace or position == last:
            return position  # tracing records every exit's logits
        if not len(policies):
            return last  # only shadow rows run on: they need the last exit alone
        names = _names(policies)
        if len(names) == 1 and deltas.min() == deltas.max():  # one target for the whole batch: the usual case
            return self.calibration.next_firing_exits_at(names[0], float(deltas[0]))[position]
        fires = np.zeros(self.runner.num_exits, bool)
        for name in names:
            fires |= self.calibration.firing_exits(name, deltas[policies == name])
        return position + int(np.argmax(fires[position:]))  # the last exit always fires

    def _next_stop_one(self, position: int, policy: str, delta: float) -> int:
        """`_next_stop` for one running sample: a lookup in its (policy, δ)'s remembered stops."""
        if self.trace:
            return position
        return self.calibration.next_firing_exits_at(policy, delta)[position]

    def _chunks(self, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """(original rows, input) pieces of a batch. Token-id batches above the token budget run as
        length-sorted pieces, each padded only to its own longest sequence: one long text in a
        request of 64 would otherwise make all 64 pay for its length (attention is quadratic)."""
        n = len(x)
        if self.pad_id is None or x.ndim != 2 or n < 2 or x.size <= self.token_budget:
            return [(np.arange(n), x)]
        real = x != self.pad_id
        lengths = x.shape[1] - np.argmax(real[:, ::-1], axis=1)  # up to the last real token
        return [(rows, np.ascontiguousarray(x[rows, : max(int(lengths[rows].max()), 1)]))
                for rows in length_batches(lengths, self.token_budget)]


@dataclass
class _Batch:
    """What every flight of one engine batch shares: where decisions go and what each row asked for."""

    result: BatchResult
    deltas: np.ndarray
    policies: np.ndarray
    policy_names: list[str]
    want_probabilities: np.ndarray | None
    on_exit: ExitCallback | None
    in_distribution: np.ndarray | None = None  # [n] bool: the input guard's verdict (None: no guard applies)
    guarded: np.ndarray | None = None  # [n] bool: which samples asked for the guard (None: all)


class Flight:
    """Rows of one batch (a length-sorted piece of it, for text) on their way through the network:
    `position` is the next segment to run, `state` the runner's tensors at its input, `active` the
    batch row of each row still running."""

    def __init__(self, engine: ExitEngine, batch: _Batch, rows: np.ndarray, state: dict):
        self.engine = engine
        self.batch = batch
        self.state = state
        self.position = 0
        self.active = rows
        self.shadow = np.zeros(len(rows), bool)  # answered already, running on only to be compared
        self.done = False

    def shape_key(self) -> tuple:
        """Flights merge only when their tensors agree beyond the batch axis (text pieces differ in length)."""
        return self.engine.runner.sample_shapes(self.state)

    def next_stop(self) -> int:
        """Run on to the next exit that can let one of the running samples leave (issue 16): the heads
        in between are not computed and the segments run as one fused span where the bundle has it.
        With no exit able to fire the batch runs the plain model."""
        if len(self.active) == 1 and not self.shadow[0]:  # a lone sample: no arrays to filter
            row = int(self.active[0])
            return self.engine._next_stop_one(self.position, str(self.batch.policies[row]), float(self.batch.deltas[row]))
        running = self.active[~self.shadow]
        return self.engine._next_stop(self.position, self.batch.policies[running], self.batch.deltas[running])

    def decide(self, k: int, logits: np.ndarray, can_leave: bool = True) -> np.ndarray | None:
        """Exit k's logits for the running rows: answer who leaves; the rows that run on (None when done).
        `can_leave` False: merged into a run that stops where none of these rows may leave."""
        engine, batch, result = self.engine, self.batch, self.batch.result
        last_exit = engine.runner.num_exits - 1
        self.position = k + 1
        active, shadow = self.active, self.shadow
        if not can_leave:
            return np.arange(len(active))
        if len(active) == 1 and result.trace is None and not shadow[0]:
            return self._decide_one(k, logits, last_exit)
        if result.trace is not None:
            engine._record_trace(result.trace, k, active, logits)
        any_shadow = bool(shadow.any())
        if any_shadow and k == last_exit and result.shadow_prediction is not None:
            result.shadow_prediction[active[shadow]] = logits[shadow].argmax(axis=1)
        leave = np.zeros(len(active), bool)
        active_policies = batch.policies[active]
        names = batch.policy_names
        for name in names:
            if len(names) == 1 and not any_shadow:
                rows = np.arange(len(active))
            else:
                rows = np.flatnonzero((active_policies == name) & ~shadow)
            if not len(rows):
                continue
            typical = None if batch.in_distribution is None else batch.in_distribution[active[rows]]
            step = engine.calibration.step(name, k, logits[rows], batch.deltas[active[rows]], in_distribution=typical)
            out_rows = rows[step.exit_now]
            if not len(out_rows):
                continue
            leave[out_rows] = True
            original = active[out_rows]
            result.class_index[original] = logits[out_rows].argmax(axis=1)
            result.exit_index[original] = k
            result.estimate[original] = step.estimate[step.exit_now]
            result.target_met[original] = step.target_met[step.exit_now]
            result.confidence[original] = step.confidence[step.exit_now]
            result.promised[original] = step.promised[step.exit_now]
            result.reason[original] = step.reason[step.exit_now]
            if result.probabilities is not None and batch.want_probabilities is not None:
                wanted = batch.want_probabilities[original]
                if wanted.any():
                    probs = engine.calibration.probabilities(k, logits[out_rows[wanted]])
                    result.probabilities[original[wanted]] = probs
        if engine.shadow_fraction > 0 and k < last_exit and leave.any():
            # Answered now (on_exit below) but kept running: leave stays True for the callback.
            leaving = np.flatnonzero(leave)
            shadow[leaving[engine._rng().random(len(leaving)) < engine.shadow_fraction]] = True
        left = active[leave]
        if batch.on_exit is not None and len(left):
            batch.on_exit(left, result)
        keep = np.flatnonzero(~leave | shadow)
        if not len(keep) or k == last_exit:
            self.done = True
            return None
        self.active = active[keep]
        self.shadow = shadow[keep]
        return keep

    def _decide_one(self, k: int, logits: np.ndarray, last_exit: int) -> np.ndarray | None:
        """`decide` for a flight of one running sample (a lone request, or the last survivor of a batch):
        the same decision through `Calibration.step_one`, written as scalars (issue 16)."""
        engine, batch, result = self.engine, self.batch, self.batch.result
        row = int(self.active[0])
        typical = True if batch.in_distribution is None else bool(batch.in_distribution[row])
        step = engine.calibration.step_one(str(batch.policies[row]), k, logits, float(batch.deltas[row]), typical)
        if not step.exit_now:
            return _ONE_ROW
        result.class_index[row] = int(logits[0].argmax())
        result.exit_index[row] = k
        result.estimate[row] = step.estimate
        result.target_met[row] = step.target_met
        result.confidence[row] = step.confidence
        result.promised[row] = step.promised
        result.reason[row] = step.reason
        if result.probabilities is not None and batch.want_probabilities is not None and batch.want_probabilities[row]:
            result.probabilities[row] = engine.calibration.probabilities(k, logits)[0]
        # Answered now; a shadowed sample runs on to the last exit to be compared (as in `decide`).
        shadowed = engine.shadow_fraction > 0 and k < last_exit and engine._rng().random(1)[0] < engine.shadow_fraction
        if shadowed:
            self.shadow[0] = True
        if batch.on_exit is not None:
            batch.on_exit(self.active, result)
        if not shadowed or k == last_exit:
            self.done = True
            return None
        return _ONE_ROW
