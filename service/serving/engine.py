"""The exit engine (DESIGN.md §4): run a batch segment by segment, let samples leave, compact the rest.

Each sample carries its own delta and policy. After segment k the calibration package's
`Calibration.step` (the same function `exitserve evaluate` uses offline) decides who leaves; those
samples are reported at once through `on_exit`, and only the survivors' rows go on.

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
from exitserve.service.runners.onnx_runtime import ChainRunner


@dataclass
class BatchResult:
    class_index: np.ndarray  # int64 [n]
    exit_index: np.ndarray  # int64 [n]
    estimate: np.ndarray  # float64 [n]
    target_met: np.ndarray  # bool [n]
    probabilities: np.ndarray | None  # float32 [n, C] where asked for (rows not asked for are zeros)
    confidence: np.ndarray  # float64 [n]: the confidence measure at the answering exit
    shadow_prediction: np.ndarray | None = None  # int64 [n]: last exit's class for shadowed rows, else -1
    trace: Trace | None = None


_FIRING_CACHE = 4096


def _names(policies: np.ndarray) -> list[str]:
    """The distinct policy names of a batch (np.unique on an object array sorts Python strings: slow)."""
    first = policies[0]
    if len(policies) == 1 or bool((policies == first).all()):
        return [str(first)]
    return [str(name) for name in np.unique(policies)]


ExitCallback = Callable[[np.ndarray, BatchResult], None]
SegmentTimer = Callable[[int, int, int, float], None]  # (first segment, last segment, rows, seconds) of one run


class ExitEngine:
    def __init__(self, runner: ChainRunner, calibration: Calibration, shadow_fraction: float = 0.0, trace: bool = False,
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
        self._local = threading.local()  # numpy Generators are not thread-safe; one per engine thread
        self._firing: dict[tuple[str, float], np.ndarray] = {}  # (policy, δ) -> Calibration.firing_exits

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
    ) -> BatchResult:
        """Decide every sample of `x`; `policies` is an array of policy names, one per sample."""
        n = len(x)
        fraction = self.shadow_fraction
        result = BatchResult(
            class_index=np.zeros(n, np.int64),
            exit_index=np.zeros(n, np.int64),
            estimate=np.zeros(n, np.float64),
            target_met=np.zeros(n, bool),
            probabilities=np.zeros((n, self.num_classes), np.float32) if want_probabilities is not None and want_probabilities.any() else None,
            confidence=np.zeros(n, np.float64),
            shadow_prediction=np.full(n, -1, np.int64) if fraction > 0 else None,
            trace=Trace.empty(n, self.runner.num_exits) if self.trace else None,
        )
        policy_names = _names(policies)
        for rows, chunk in self._chunks(x):
            self._run_rows(chunk, rows, result, deltas, policies, policy_names, want_probabilities, on_exit, segment_timer)
        return result

    def _next_stop(self, position: int, policies: np.ndarray, deltas: np.ndarray) -> int:
        """The first exit at or after `position` where a sample running under `policies`/`deltas` may leave."""
        last = self.runner.num_exits - 1
        if self.trace or position == last or not len(policies):
            return position if self.trace or position == last else last  # tracing records every exit's logits
        names = _names(policies)
        if len(names) == 1 and deltas.min() == deltas.max():  # one target for the whole batch: the usual case
            key = (names[0], float(deltas[0]))
            fires = self._firing.get(key)
            if fires is None:
                if len(self._firing) >= _FIRING_CACHE:  # δ comes from clients: keep the cache bounded
                    self._firing.clear()
                fires = self._firing[key] = self.calibration.firing_exits(names[0], deltas[:1])
        else:
            fires = np.zeros(self.runner.num_exits, bool)
            for name in names:
                fires |= self.calibration.firing_exits(name, deltas[policies == name])
        return position + int(np.argmax(fires[position:]))  # the last exit always fires

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

    def _run_rows(
        self,
        x: np.ndarray,
        rows: np.ndarray,
        result: BatchResult,
        deltas: np.ndarray,
        policies: np.ndarray,
        policy_names: list[str],
        want_probabilities: np.ndarray | None,
        on_exit: ExitCallback | None,
        segment_timer: SegmentTimer | None,
    ) -> None:
        """The segment loop for the batch rows `rows` (their inputs `x`), writing into `result`."""
        last_exit = self.runner.num_exits - 1
        fraction = self.shadow_fraction
        active = rows  # original row of each row still running
        shadow = np.zeros(len(rows), bool)  # per running row: answered already, running on only to be compared
        state = self.runner.start(x)
        position = 0  # the next segment to run
        while True:
            # Run on to the next exit that can let one of the running samples leave (issue 16): the
            # heads in between are not computed and the segments run as one fused span where the
            # bundle has it. With no exit able to fire the batch runs the plain model.
            k = self._next_stop(position, policies[active[~shadow]], deltas[active[~shadow]])
            started = time.perf_counter()
            state, logits = self.runner.run_span(position, k, state)
            if segment_timer:
                segment_timer(position, k, len(active), time.perf_counter() - started)
            position = k + 1
            if result.trace is not None:
                self._record_trace(result.trace, k, active, logits)
            any_shadow = bool(shadow.any())
            if any_shadow and k == last_exit and result.shadow_prediction is not None:
                result.shadow_prediction[active[shadow]] = logits[shadow].argmax(axis=1)
            leave = np.zeros(len(active), bool)
            active_policies = policies[active]
            for name in policy_names:
                if len(policy_names) == 1 and not any_shadow:
                    rows = np.arange(len(active))
                else:
                    rows = np.flatnonzero((active_policies == name) & ~shadow)
                if not len(rows):
                    continue
                step = self.calibration.step(name, k, logits[rows], deltas[active[rows]], normalised=True)
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
                if result.probabilities is not None and want_probabilities is not None:
                    wanted = want_probabilities[original]
                    if wanted.any():
                        probs = self.calibration.probabilities(k, logits[out_rows[wanted]])
                        result.probabilities[original[wanted]] = probs
            if fraction > 0 and k < last_exit and leave.any():
                # Answered now (on_exit below) but kept running: leave stays True for the callback.
                leaving = np.flatnonzero(leave)
                shadow[leaving[self._rng().random(len(leaving)) < fraction]] = True
            left = active[leave]
            if on_exit is not None and len(left):
                on_exit(left, result)
            keep = np.flatnonzero(~leave | shadow)
            if not len(keep) or k == last_exit:
                return
            if len(keep) < len(active):
                state = self.runner.select(state, keep)
            active = active[keep]
            shadow = shadow[keep]

