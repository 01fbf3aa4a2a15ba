"""`Calibration.step` for one sample, in scalar Python (issue 16).

A lone request reaches the exit rule as a batch of one row, where `step`'s ~25 numpy calls (each a
microsecond or more of dispatch for a single value) cost more than the decision itself. Here the same
rule runs on Python floats: bins and grid rows by `bisect` on the same edges (same comparisons as
`np.searchsorted`, NaN included), table cells read by integer index. The softmax and the entropy stay
the numpy functions `step` calls, on the same [1, C] row, so every value is bit-identical;
tests/calibration/test_step_one.py checks that against `step` over random problems, policies and δ.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from exitserve.calibration.confidence import confidence_from_probs, softmax
from exitserve.calibration.document import CONDITIONAL_KINDS, GLOBAL_POLICY, TABLE_POLICIES, TAIL_POLICIES_V2

if TYPE_CHECKING:
    from exitserve.calibration.rules import _ExitTables

_GUARDED = tuple(p for p in TAIL_POLICIES_V2 if p != "pcee-lb-tail")  # the baselines: their own rule, the tail's promise


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


def _bin(edges: list[float], conf: float) -> int:
    """`binning.bin_index` for one value: NaN lands on the sentinel M (bisect puts it past every edge)."""
    if conf >= 1.0:
        return len(edges) - 2
    return max(bisect_right(edges, conf) - 1, 0)


def _top2_margin(probs: list[float]) -> float:
    if len(probs) < 2:
        return 1.0
    second, first = sorted(probs)[-2:]
    return first - second


def _confidence(measure: str, probs: np.ndarray, row: list[float]) -> float:
    if measure == "max-softmax":
        return max(row)  # a row is all NaN or has none: max is NaN exactly when np.max is
    if measure == "margin":
        return _top2_margin(row)
    return float(confidence_from_probs(probs, measure)[0])


def bin_one(edges: list[float], conf: float) -> int:
    return _bin(edges, conf)


def decide_one(ex: _ExitTables, lists: _Lists, measure: str, policy: str, last: bool, grid_row: int,
             logits: np.ndarray, delta: float, global_row: tuple[float, float] | None = None
             ) -> tuple[bool, float, bool, float]:
    """The exit rule of `Calibration.step(policy, k, logits, ...)` for one row of logits [1, C], at the δ
    the rule decides at: (leaves, estimate, the promise as an older document fitted it, confidence).
    `global_row`: pcee-lb-global's (threshold, bound) at this grid row. The promise itself is made by
    `Calibration.step_one` from the guard tables."""
    probs = softmax(logits, ex.temperature)
    row = probs[0].tolist()
    conf = _confidence(measure, probs, row)
    g = grid_row
    if policy in TABLE_POLICIES:
        kind = TABLE_POLICIES[policy]
        b = _bin(lists.edges, conf)
        estimate = float(ex.report[kind][b])
        if last:
            return True, estimate, estimate >= delta, conf
        leaves = float(ex.decide[kind][b]) >= delta
        return leaves, estimate, leaves, conf
    if policy in CONDITIONAL_KINDS or (policy == "pcee-lb-tail" and (ex.tail_edges is None or ex.tail_allowed is None)):
        name = policy if policy in CONDITIONAL_KINDS else "pcee-lb-cond"
        b = _bin(lists.edges, conf)
        estimate = float(ex.cond_report[name][g, b])
        if last:
            return True, estimate, estimate >= delta, conf
        leaves = bool(ex.cond_allowed[name][g, b]) and float(ex.cond_decide[name][g, b]) >= delta
        return leaves, estimate, leaves, conf
    if policy == "pcee-lb-tail":
        assert lists.tail_edges is not None and ex.tail_allowed is not None
        b = _bin(lists.tail_edges, conf)
        promised = float(ex.tail_guard[policy][g, b]) >= delta
        estimate = float(ex.tail_estimate[policy][g, b])
        if last:
            return True, estimate, promised, conf
        leaves = bool(ex.tail_allowed[g, b]) and promised
        return leaves, estimate, leaves, conf
    if policy == GLOBAL_POLICY:
        assert global_row is not None and lists.tail_edges is not None
        estimate = float(ex.tail_estimate[policy][g, _bin(lists.tail_edges, conf)])
        return last or conf >= global_row[0], estimate, False, conf
    if policy not in _GUARDED:
        raise ValueError(f"unknown policy {policy!r}")
    leaves, estimate = _baseline(ex, lists, policy, last, row, conf, delta)
    if lists.tail_edges is None:  # schema 1: the baseline's own estimate, as it was fitted
        return leaves, estimate, estimate >= delta if last else leaves, conf
    b = _bin(lists.tail_edges, conf)
    promised = float(ex.tail_guard[policy][g, b]) >= delta
    return leaves, float(ex.tail_estimate[policy][g, b]), promised if last else leaves and promised, conf


def _baseline(ex: _ExitTables, lists: _Lists, policy: str, last: bool, row: list[float], conf: float,
              delta: float) -> tuple[bool, float]:
    """A baseline's own exit rule (rules.py `_confidence_rule`, `_threshold_rule`, `_full_rule`): (leaves, estimate)."""
    if policy == "confidence":
        return last or conf >= delta, conf
    if policy == "full" or last:  # per-exit-threshold at the last exit reports the bin accuracy, as full does
        return last, float(ex.report["accuracy"][_bin(lists.edges, conf)])
    if not lists.precision:
        return False, 0.0
    j = bisect_left(lists.precision, delta)
    if j >= len(lists.precision):  # no record reaches δ: the threshold is +inf, which no margin reaches
        return False, 0.0
    return _top2_margin(row) >= lists.thresholds[j], lists.precision[j]
