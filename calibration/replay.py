"""The offline replay: the engine's exit loop over whole logits, without the network.

`decide_all` calls `Calibration.step` exit by exit on the still-running rows only, exactly as the
server's engine does, so offline results (`exitserve evaluate`, the benchmarks) are what the server
would answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from exitserve.calibration.document import normalise_deltas
from exitserve.calibration.rules import Calibration


@dataclass(frozen=True)
class Decisions:
    """Per-sample outcome of a whole multi-exit pass (`decide_all`)."""

    exit_index: np.ndarray
    prediction: np.ndarray
    estimate: np.ndarray
    target_met: np.ndarray
    confidence: np.ndarray
    promised: np.ndarray  # the guarded accuracy behind each answer (calibration.rules.StepDecision)
    reason: np.ndarray  # uint8 codes (calibration.reasons)


def decide_all(
    calibration: Calibration, policy: str, logits_per_exit: Sequence[np.ndarray], deltas: np.ndarray | float,
    in_distribution: np.ndarray | None = None,
) -> Decisions:
    """Run the exit rule over whole logits, exit by exit, on the still-running rows only.

    After each exit the answered rows are removed and the rest are compacted, as in the engine.
    `in_distribution`: the input guard's verdict per sample (`Calibration.input_guard`), None for none.
    """
    if len(logits_per_exit) != calibration.num_exits:
        raise ValueError(f"logits of {len(logits_per_exit)} exits for a calibration of {calibration.num_exits}")
    n = np.asarray(logits_per_exit[0]).shape[0]
    deltas = normalise_deltas(deltas, n, where="deltas")
    exit_index = np.full(n, -1, dtype=np.int64)
    prediction = np.full(n, -1, dtype=np.int64)
    estimate = np.zeros(n)
    target_met = np.zeros(n, dtype=bool)
    confidence = np.zeros(n)
    promised = np.zeros(n)
    reason = np.zeros(n, dtype=np.uint8)
    remaining = np.arange(n)
    for k in range(calibration.num_exits):
        if remaining.size == 0:
            break
        logits = np.asarray(logits_per_exit[k])[remaining]
        decision = calibration.step(policy, k, logits, deltas[remaining],
                                    in_distribution=None if in_distribution is None else in_distribution[remaining])
        done = remaining[decision.exit_now]
        exit_index[done] = k
        prediction[done] = logits[decision.exit_now].argmax(axis=1)
        estimate[done] = decision.estimate[decision.exit_now]
        target_met[done] = decision.target_met[decision.exit_now]
        confidence[done] = decision.confidence[decision.exit_now]
        promised[done] = decision.promised[decision.exit_now]
        reason[done] = decision.reason[decision.exit_now]
        remaining = remaining[~decision.exit_now]
    return Decisions(exit_index=exit_index, prediction=prediction, estimate=estimate, target_met=target_met,
                     confidence=confidence, promised=promised, reason=reason)
