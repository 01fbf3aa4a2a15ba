"""The exit engine (DESIGN.md §4): run a batch segment by segment, let samples leave, compact the rest.

Each sample carries its own delta and policy. After segment k the calibration package's
`Calibration.step` (the same function `exitserve evaluate` uses offline) decides who leaves; those
samples are reported at once through `on_exit`, and only the survivors' rows go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from calibration import Calibration
from service.runner import ChainRunner


@dataclass
class BatchResult:
    class_index: np.ndarray  # int64 [n]
    exit_index: np.ndarray  # int64 [n]
    estimate: np.ndarray  # float64 [n]
    target_met: np.ndarray  # bool [n]
    probabilities: np.ndarray | None  # float32 [n, C] where asked for (rows not asked for are zeros)


ExitCallback = Callable[[np.ndarray, BatchResult], None]
SegmentTimer = Callable[[int, float], None]


class ExitEngine:
    def __init__(self, runner: ChainRunner, calibration: Calibration):
        if calibration.num_exits != runner.num_exits:
            raise ValueError(f"calibration has {calibration.num_exits} exits, the model {runner.num_exits}")
        self.runner = runner
        self.calibration = calibration
        self.num_classes = len(runner.bundle.manifest.labels)

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
        result = BatchResult(
            class_index=np.zeros(n, np.int64),
            exit_index=np.zeros(n, np.int64),
            estimate=np.zeros(n, np.float64),
            target_met=np.zeros(n, bool),
            probabilities=np.zeros((n, self.num_classes), np.float32) if want_probabilities is not None and want_probabilities.any() else None,
        )
        active = np.arange(n)  # original row of each row still running
        state = self.runner.start(x)
        policy_names = [str(name) for name in np.unique(policies)]
        for k in range(self.runner.num_exits):
            started = time.perf_counter()
            state, logits = self.runner.run_segment(k, state)
            if segment_timer:
                segment_timer(k, time.perf_counter() - started)
            leave = np.zeros(len(active), bool)
            active_policies = policies[active]
            for name in policy_names:
                rows = np.flatnonzero(active_policies == name) if len(policy_names) > 1 else np.arange(len(active))
                if not len(rows):
                    continue
                step = self.calibration.step(name, k, logits[rows], deltas[active[rows]])
                out_rows = rows[step.exit_now]
                if not len(out_rows):
                    continue
                leave[out_rows] = True
                original = active[out_rows]
                result.class_index[original] = logits[out_rows].argmax(axis=1)
                result.exit_index[original] = k
                result.estimate[original] = step.estimate[step.exit_now]
                result.target_met[original] = step.target_met[step.exit_now]
                if result.probabilities is not None:
                    wanted = want_probabilities[original]
                    if wanted.any():
                        probs = self.calibration.probabilities(k, logits[out_rows[wanted]])
                        result.probabilities[original[wanted]] = probs
            left = active[leave]
            if on_exit is not None and len(left):
                on_exit(left, result)
            if leave.all():
                break
            keep = np.flatnonzero(~leave)
            if len(keep) < len(active):
                state = self.runner.select(state, keep)
            active = active[keep]
        return result
