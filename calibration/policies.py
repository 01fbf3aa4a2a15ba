"""The exit policies: one class each, in one registry (`POLICY`), found by name.

A policy is an exit rule, given three ways that must agree: `rule` for a batch (numpy, what
`Calibration.step` runs), `rule_one` for one sample (Python scalars, `Calibration.step_one`: a lone
request's row would pay numpy's per-call dispatch ~25 times), and `fit_leave` over the calibration
samples (which of them leave at each grid δ: the samples its guard is counted on). `ceiling` says
the largest δ at which an exit can let anyone leave (the server skips exits that cannot fire).

The promise is the same for every policy and lives in `Calibration.step`: the policy's guard (a
Clopper–Pearson tail table of its own leavers, `promised`) reaching the request's δ. Adding a policy
is one class here, its name in `POLICIES`, and its tests; its name is the stable code decision
records store.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from exitserve.calibration.binning import bin_index
from exitserve.calibration.confidence import top2_margin
from exitserve.calibration.document import GLOBAL_POLICY
from exitserve.calibration.one_row import bin_one, top2_margin_one

if TYPE_CHECKING:
    from exitserve.calibration.one_row import _Lists
    from exitserve.calibration.rules import Calibration, _ExitTables

# (leaves, or None at the last exit; estimate; the guard's value where the rule read it, else None for
# Calibration.step to look up: it is not read twice on the exit loop)
Decision = tuple["np.ndarray | None", np.ndarray, "np.ndarray | None"]
OneRule = tuple[bool, float, "float | None"]  # the same for one sample (leaves is True at the last exit)


@dataclass(frozen=True)
class FitInputs:
    """What fitting knows about the calibration samples at each exit, for `Policy.fit_leave`.

    Arrays are per exit, over the n calibration samples; NaN where a sample was not observed there."""

    grid: np.ndarray  # [G]
    confidence: list[np.ndarray]  # [n] per exit
    margin: list[np.ndarray]  # [n] per exit (top-2 margin of the temperature-scaled probabilities)
    bins: list[np.ndarray]  # [n] per exit: the sample's bin of the per-bin tables (M: not observed)
    table_decide: dict[str, list[np.ndarray]]  # table kind -> per exit [M + 1] decision values
    conditional_leave: dict[str, list[np.ndarray]]  # conditional policy -> per exit [G, M + 1] bool
    margin_thresholds: list[np.ndarray]  # per exit [G]: per-exit-threshold's margin threshold per grid δ
    global_thresholds: np.ndarray  # [G]: pcee-lb-global's threshold (inf where none)


class Policy:
    name: ClassVar[str]
    # Schema 2 documents hold a guard (tail table) for it; older policies there promise as fitted.
    guarded_in_schema_2: ClassVar[bool] = False

    def resolve(self, cal: Calibration) -> Policy:
        """The policy that decides in this document's place (an older document may lack its tables)."""
        return self

    def rule(self, cal: Calibration, ex: _ExitTables, last: bool, probs: np.ndarray, conf: np.ndarray,
             deltas: np.ndarray, g: np.ndarray) -> Decision:
        raise NotImplementedError

    def rule_one(self, cal: Calibration, ex: _ExitTables, lists: _Lists, last: bool, row: list[float], conf: float,
                 g: int, delta: float) -> OneRule:
        raise NotImplementedError

    def ceiling(self, cal: Calibration, ex: _ExitTables) -> np.ndarray:
        """[G]: the largest δ at which this exit lets some sample leave, for requests on grid row g."""
        raise NotImplementedError

    def fit_leave(self, fit: FitInputs) -> Callable[[int], np.ndarray]:
        """leave(k) -> [G, n]: would the calibration sample leave at exit k under grid δ_g."""
        raise NotImplementedError

    def promised(self, cal: Calibration, ex: _ExitTables, conf: np.ndarray, g: np.ndarray) -> np.ndarray:
        """The guard behind each answer at this exit (schema 3): its leavers' tail table."""
        assert ex.tail_edges is not None
        return ex.tail_guard[self.name][g, bin_index(ex.tail_edges, conf)]

    def promised_one(self, cal: Calibration, ex: _ExitTables, lists: _Lists, conf: float, g: int) -> float:
        assert lists.tail_edges is not None
        return float(ex.tail_guard[self.name][g, bin_one(lists.tail_edges, conf)])


# --- the per-bin PCEE tables ------------------------------------------------------------------


class TablePolicy(Policy):
    """pcee, pcee-ws, pcee-lb: leave at the first exit whose table value for the sample's confidence
    bin (bin accuracy, window-smoothed accuracy — both under the Beta prior — or Clopper–Pearson lower
    bound) reaches δ."""

    kind: ClassVar[str]

    def rule(self, cal, ex, last, probs, conf, deltas, g):
        b = bin_index(ex.edges, conf)
        exit_now = None if last else ex.decide[self.kind][b] >= deltas
        return exit_now, ex.report[self.kind][b], None

    def rule_one(self, cal, ex, lists, last, row, conf, g, delta):
        b = bin_one(lists.edges, conf)
        estimate = float(ex.report[self.kind][b])
        return last or float(ex.decide[self.kind][b]) >= delta, estimate, None

    def ceiling(self, cal, ex):
        return np.full(cal.delta_grid.size, ex.decide[self.kind].max())

    def fit_leave(self, fit):
        return lambda k: fit.table_decide[self.kind][k][fit.bins[k]][None, :] >= fit.grid[:, None]


class Pcee(TablePolicy):
    name, kind = "pcee", "accuracy"


class PceeWs(TablePolicy):
    name, kind = "pcee-ws", "smoothed"


class PceeLb(TablePolicy):
    name, kind = "pcee-lb", "lower"


class ConditionalPolicy(Policy):
    """pcee-cond, pcee-ws-cond, pcee-lb-cond: the same over conditional tables, built per grid δ on the
    calibration samples that reach each exit under that δ; a bin leaves at δ only if it does at every
    smaller grid δ too (tables.exit_allowed)."""

    def rule(self, cal, ex, last, probs, conf, deltas, g):
        b = bin_index(ex.edges, conf)
        estimate = ex.cond_report[self.name][g, b]
        if last:
            return None, estimate, None
        exit_now = ex.cond_allowed[self.name][g, b] & (ex.cond_decide[self.name][g, b] >= deltas)
        return exit_now, estimate, None

    def rule_one(self, cal, ex, lists, last, row, conf, g, delta):
        b = bin_one(lists.edges, conf)
        estimate = float(ex.cond_report[self.name][g, b])
        if last:
            return True, estimate, None
        return bool(ex.cond_allowed[self.name][g, b]) and float(ex.cond_decide[self.name][g, b]) >= delta, estimate, None

    def ceiling(self, cal, ex):
        return np.where(ex.cond_allowed[self.name], ex.cond_decide[self.name], -np.inf).max(axis=1)

    def fit_leave(self, fit):
        return lambda k: fit.conditional_leave[self.name][k][:, fit.bins[k]]


class PceeCond(ConditionalPolicy):
    name = "pcee-cond"


class PceeWsCond(ConditionalPolicy):
    name = "pcee-ws-cond"


class PceeLbCond(ConditionalPolicy):
    name = "pcee-lb-cond"


# --- guarded thresholds -----------------------------------------------------------------------


class PceeLbTail(Policy):
    """The default: per exit and grid δ, the lowest confidence threshold whose Clopper–Pearson bound on
    the samples reaching that exit with at least that confidence still reaches δ (calibration.tails).
    A schema 1 document has no tail tables: there it decides as pcee-lb-cond."""

    name = "pcee-lb-tail"
    guarded_in_schema_2 = True

    def resolve(self, cal):
        return self if cal.has_tail_tables else POLICY["pcee-lb-cond"]

    def rule(self, cal, ex, last, probs, conf, deltas, g):
        assert ex.tail_edges is not None and ex.tail_allowed is not None
        b = bin_index(ex.tail_edges, conf)
        guard = ex.tail_guard[self.name][g, b]
        estimate = ex.tail_estimate[self.name][g, b]
        return (None if last else ex.tail_allowed[g, b] & (guard >= deltas)), estimate, guard

    def rule_one(self, cal, ex, lists, last, row, conf, g, delta):
        assert lists.tail_edges is not None and ex.tail_allowed is not None
        b = bin_one(lists.tail_edges, conf)
        guard = float(ex.tail_guard[self.name][g, b])
        estimate = float(ex.tail_estimate[self.name][g, b])
        return last or (bool(ex.tail_allowed[g, b]) and guard >= delta), estimate, guard

    def ceiling(self, cal, ex):
        assert ex.tail_allowed is not None
        return np.where(ex.tail_allowed, ex.tail_guard[self.name], -np.inf).max(axis=1)

    def fit_leave(self, fit):
        raise TypeError("pcee-lb-tail's tables are counted on the samples reaching each exit (fitting.tables_document)")


class PceeLbGlobal(Policy):
    """One confidence threshold for every exit, guarded on the answers of all exits pooled
    (calibration.global_threshold). An older document decides it as pcee-lb-tail."""

    name = GLOBAL_POLICY

    def resolve(self, cal):
        return self if cal.global_threshold is not None else POLICY["pcee-lb-tail"].resolve(cal)

    def rule(self, cal, ex, last, probs, conf, deltas, g):
        assert cal.global_threshold is not None and ex.tail_edges is not None
        estimate = ex.tail_estimate[self.name][g, bin_index(ex.tail_edges, conf)]
        return (None if last else conf >= cal.global_threshold[0][g]), estimate, None

    def rule_one(self, cal, ex, lists, last, row, conf, g, delta):
        assert lists.tail_edges is not None
        estimate = float(ex.tail_estimate[self.name][g, bin_one(lists.tail_edges, conf)])
        return last or conf >= cal.global_rows[g][0], estimate, None

    def ceiling(self, cal, ex):
        assert cal.global_threshold is not None
        # Confidences reach 1: an exit can fire wherever the grid δ has a threshold at all.
        return np.where(np.isfinite(cal.global_threshold[0]), np.inf, -np.inf)

    def fit_leave(self, fit):
        return lambda k: fit.confidence[k][None, :] >= fit.global_thresholds[:, None]

    def promised(self, cal, ex, conf, g):
        assert cal.global_threshold is not None
        thresholds, bounds = cal.global_threshold
        return np.where(conf >= thresholds[g], bounds[g], 0.0)

    def promised_one(self, cal, ex, lists, conf, g):
        threshold, bound = cal.global_rows[g]
        return bound if conf >= threshold else 0.0


# --- baselines: their own exit rule, the guard's promise ----------------------------------------


class Baseline(Policy):
    """A baseline's own exit rule; its estimate and its guard come from the tail table of its leavers
    (schema 2 on), or, in a schema 1 document, its own estimate as it was fitted (and no guard)."""

    guarded_in_schema_2 = True

    def rule(self, cal, ex, last, probs, conf, deltas, g):
        exit_now, estimate = self.own_rule(ex, last, probs, conf, deltas)
        if ex.tail_edges is None:  # schema 1: the baseline's own estimate, as it was fitted
            return exit_now, estimate, None
        b = bin_index(ex.tail_edges, conf)
        return exit_now, ex.tail_estimate[self.name][g, b], ex.tail_guard[self.name][g, b]

    def rule_one(self, cal, ex, lists, last, row, conf, g, delta):
        leaves, estimate = self.own_rule_one(ex, lists, last, row, conf, delta)
        if lists.tail_edges is None:
            return leaves, estimate, None
        b = bin_one(lists.tail_edges, conf)
        return leaves, float(ex.tail_estimate[self.name][g, b]), float(ex.tail_guard[self.name][g, b])

    def own_rule(self, ex: _ExitTables, last: bool, probs: np.ndarray, conf: np.ndarray, deltas: np.ndarray
                 ) -> tuple[np.ndarray | None, np.ndarray]:
        raise NotImplementedError

    def own_rule_one(self, ex: _ExitTables, lists: _Lists, last: bool, row: list[float], conf: float, delta: float
                     ) -> tuple[bool, float]:
        raise NotImplementedError


class Confidence(Baseline):
    """Exit when the (temperature-scaled) confidence itself reaches δ."""

    name = "confidence"

    def own_rule(self, ex, last, probs, conf, deltas):
        return (None if last else conf >= deltas), conf.copy()

    def own_rule_one(self, ex, lists, last, row, conf, delta):
        return last or conf >= delta, conf

    def ceiling(self, cal, ex):
        return np.full(cal.delta_grid.size, np.inf)  # any δ in [0, 1] may be reached by some logits

    def fit_leave(self, fit):
        return lambda k: fit.confidence[k][None, :] >= fit.grid[:, None]


class PerExitThreshold(Baseline):
    """Exit when the top-2 margin reaches the exit's smallest margin threshold whose calibration
    precision reaches δ."""

    name = "per-exit-threshold"

    def own_rule(self, ex, last, probs, conf, deltas):
        if last:
            return None, ex.report["accuracy"][bin_index(ex.edges, conf)]
        if ex.precision.size == 0:
            return np.zeros(deltas.size, dtype=bool), np.zeros(deltas.size)
        j = np.searchsorted(ex.precision, deltas, side="left")
        found = j < ex.precision.size
        j = np.minimum(j, ex.precision.size - 1)
        threshold = np.where(found, ex.thresholds[j], np.inf)
        return top2_margin(probs) >= threshold, np.where(found, ex.precision[j], 0.0)

    def own_rule_one(self, ex, lists, last, row, conf, delta):
        if last:  # the last exit reports the bin accuracy, as full does
            return True, float(ex.report["accuracy"][bin_one(lists.edges, conf)])
        if not lists.precision:
            return False, 0.0
        j = bisect_left(lists.precision, delta)
        if j >= len(lists.precision):  # no record reaches δ: the threshold is +inf, which no margin reaches
            return False, 0.0
        return top2_margin_one(row) >= lists.thresholds[j], lists.precision[j]

    def ceiling(self, cal, ex):
        return np.full(cal.delta_grid.size, ex.precision.max() if ex.precision.size else -np.inf)

    def fit_leave(self, fit):
        return lambda k: fit.margin[k][None, :] >= fit.margin_thresholds[k][:, None]


class Full(Baseline):
    """Always the last exit."""

    name = "full"

    def own_rule(self, ex, last, probs, conf, deltas):
        estimate = ex.report["accuracy"][bin_index(ex.edges, conf)]
        return (None if last else np.zeros(deltas.size, dtype=bool)), estimate

    def own_rule_one(self, ex, lists, last, row, conf, delta):
        return last, float(ex.report["accuracy"][bin_one(lists.edges, conf)])

    def ceiling(self, cal, ex):
        return np.full(cal.delta_grid.size, -np.inf)

    def fit_leave(self, fit):
        return lambda k: np.zeros((fit.grid.size, fit.confidence[k].size), dtype=bool)


POLICY: dict[str, Policy] = {p.name: p for p in (
    Pcee(), PceeWs(), PceeLb(), PceeCond(), PceeWsCond(), PceeLbCond(), PceeLbTail(),
    Confidence(), PerExitThreshold(), Full(), PceeLbGlobal(),
)}
# Registry order is the order decision records stored policies in before they stored names: append only.
POLICIES: tuple[str, ...] = tuple(POLICY)
