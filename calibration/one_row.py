"""`Calibration.step` for one sample, in scalar Python (issue 16): its types and helpers.

A lone request reaches the exit rule as a batch of one row, where `step`'s ~25 numpy calls (each a
microsecond or more of dispatch for a single value) cost more than the decision itself. Each policy
(calibration.policies) gives its rule for one sample on Python floats: bins and grid rows by
`bisect` on the same edges (same comparisons as `np.searchsorted`, NaN included), table cells read
by integer index. The softmax and the entropy stay the numpy functions `step` calls, on the same
[1, C] row, so every value is bit-identical; tests/calibration/test_step_one.py checks that against
`step` over random problems, policies and δ.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from exitserve.calibration.confidence import confidence_from_probs

if TYPE_CHECKING:
    from exitserve.calibration.rules import _ExitTables


class OneDecision(NamedTuple):
    """`StepDecision` of one sample, as Python scalars."""

    exit_now: bool
    estimate: float
    target_met: bool
    confidence: float
    promised: float
    reason: int


@dataclass(frozen=True)
class _Lists:
    """One exit's edges and per-exit-threshold records as Python lists (for bisect)."""

    edges: list[float]
    tail_edges: list[float] | None
    precision: list[float]
    thresholds: list[float]


def exit_lists(ex: _ExitTables) -> _Lists:
    return _Lists(ex.edges.tolist(), None if ex.tail_edges is None else ex.tail_edges.tolist(),
                  ex.precision.tolist(), ex.thresholds.tolist())


def confidence_one(measure: str, probs: np.ndarray, row: list[float]) -> float:
    """The confidence of one row of probabilities [1, C] (`row` is the same as a list)."""
    if measure == "max-softmax":
        return max(row)  # a row is all NaN or has none: max is NaN exactly when np.max is
    if measure == "margin":
        return top2_margin_one(row)
    return float(confidence_from_probs(probs, measure)[0])


def bin_one(edges: list[float], conf: float) -> int:
    """`binning.bin_index` for one value: NaN lands on the sentinel M (bisect puts it past every edge)."""
    if conf >= 1.0:
        return len(edges) - 2
    return max(bisect_right(edges, conf) - 1, 0)


def top2_margin_one(probs: list[float]) -> float:
    if len(probs) < 2:
        return 1.0
    second, first = sorted(probs)[-2:]
    return first - second
