"""The exit rules (DESIGN.md §3) and the one decision function, `Calibration.step`.

The server's engine calls `step` after every segment on the rows it still holds; the offline replay
(`calibration.replay.decide_all`, used by `exitserve evaluate` and the benchmarks) runs exactly that
loop. Every lookup table is precomputed when a document is loaded, so `step` is a handful of
vectorised numpy operations per call and never loops over samples.

Policies live in calibration/policies.py, one class each (the registry `POLICY`): pcee, pcee-ws,
pcee-lb (per-bin tables), their -cond variants (conditional tables per grid δ), pcee-lb-tail (the
default: guarded per-exit confidence thresholds), pcee-lb-global (one guarded threshold for every
exit), and the baselines confidence, per-exit-threshold and full. A request uses the tables of the
grid δ nearest at or above its own (a δ within 1e-9 above a grid value counts as it; below the grid:
its bottom; above the grid top: the top, never deciding more loosely than the request's δ).

No policy's promise comes from its exit rule: `target_met` comes from a guarded tail table of the
samples that leave at that exit under that rule at the grid δ (schema 3: every policy; schema 2: the
baselines and pcee-lb-tail), so samples answered with target_met are correct at a rate >= δ
whichever policy chose the exit. For the baselines and the tail rules the promise is a property of the
set (a tail whose bound reached δ), so `estimate` is the sample's own calibrated accuracy, the
per-fine-bin accuracy of that set (Beta prior, ±window bins): it may lie below δ for a promised
sample near the threshold, and its mean over answered samples tracks their accuracy, which is what
the monitoring's "accuracy below promise" alert compares. At the last exit every sample leaves and
`target_met` says whether its guard reaches δ. Estimates are >= 0: a bin without evidence reports 0 (its
decision value is -inf, so it never lets anyone exit).
"""

from __future__ import annotations

import bisect
import copy
import math
from dataclasses import dataclass
from functools import partial

import numpy as np

from exitserve.calibration.binning import bin_index, check_edges
from exitserve.calibration.bounds import clopper_pearson_lower
from exitserve.calibration.confidence import confidence_from_probs, softmax
from exitserve.calibration.document import (
    CONDITIONAL_KINDS,
    DOCUMENT_KIND,
    TAIL_POLICIES_V2,
    Deltas,
    ExitDocument,
    GlobalThreshold,
    GridRows,
    check_grid,
    normalise_deltas,
    parse_document,
)
from exitserve.calibration.input_guard import InputGuard
from exitserve.calibration.one_row import OneDecision, confidence_one, exit_lists
from exitserve.calibration.policies import POLICIES, POLICY, Policy
from exitserve.calibration.reasons import BELOW_TARGET, OUT_OF_DISTRIBUTION, POLICY_UNGUARDED, PROMISED
from exitserve.calibration.tables import TABLE_KINDS, borrow_empty_rows, exit_allowed, table_values
from exitserve.calibration.tails import bin_estimates, tail_values

DEFAULT_POLICY = "pcee-lb-tail"
GRID_TOLERANCE = 1e-9  # a δ this close above a grid value counts as that grid value
_STORED_TABLES = {"accuracy": "accuracy", "smoothed": "smoothed_accuracy", "lower": "lower_bound"}
_CONSISTENCY_TOLERANCE = 1e-6


@dataclass(frozen=True)
class StepDecision:
    """The decision at one exit for the n samples still running there (row order preserved).

    exit_now:   leave at this exit (all True at the last exit).
    estimate:   the estimated accuracy of the prediction at this exit: the policy's table value
                for the sample's bin; for pcee-lb-tail and the baselines the accuracy of its fine
                bin among the samples answered there (schema 1 documents: the confidence, the
                margin threshold's precision, the bin accuracy); 0 where there is no evidence.
    target_met: the promise: the sample leaves here and belongs to a set guaranteed to be correct at
                a rate >= δ (for the per-bin PCEE policies: its estimate reaches δ; every early
                leaver of a PCEE policy; a baseline may let a sample leave without a promise).
    confidence: the calibration's confidence measure of this exit (temperature-scaled).
    """

    exit_now: np.ndarray
    estimate: np.ndarray
    target_met: np.ndarray
    confidence: np.ndarray
    promised: np.ndarray  # the guarded accuracy the promise rests on: >= δ wherever target_met
    reason: np.ndarray  # uint8 codes (calibration.reasons): why target_met is False (PROMISED where it is True)


@dataclass(frozen=True)
class _ExitTables:
    """Everything `step` needs for one exit; every table has a sentinel column M for NaN confidences."""

    temperature: float
    edges: np.ndarray
    counts: np.ndarray
    correct: np.ndarray
    values: dict[str, np.ndarray]  # kind -> [M] table values (-inf / 0 for empty bins)
    decide: dict[str, np.ndarray]  # kind -> [M + 1] decision values
    report: dict[str, np.ndarray]  # kind -> [M + 1] reported estimates (>= 0)
    cond_decide: dict[str, np.ndarray]  # conditional policy -> [G, M + 1]
    cond_report: dict[str, np.ndarray]  # conditional policy -> [G, M + 1]
    cond_allowed: dict[str, np.ndarray]  # conditional policy -> [G, M + 1] may the bin leave at grid δ
    thresholds: np.ndarray  # per-exit-threshold record candidates, ascending
    precision: np.ndarray  # their precision, strictly ascending
    agreement: tuple[np.ndarray, np.ndarray] | None  # per bin: samples seen at the last exit too, agreeing with it
    tail_edges: np.ndarray | None  # fine bins of the tail tables (None: schema 1)
    tail_guard: dict[str, np.ndarray]  # tail policy -> [G, M' + 1] guarded tail values (>= 0): the promise
    tail_estimate: dict[str, np.ndarray]  # tail policy -> [G, M' + 1] per-bin accuracy (prior, ±window): the estimate
    tail_allowed: np.ndarray | None  # pcee-lb-tail: [G, M' + 1] may the bin leave at grid δ


FIRING_CACHE = 4096  # (policy, δ) pairs whose firing exits a Calibration remembers


class Calibration:
    """Reliability tables and exit rules of one bundle. Build with `fit_calibration` or `from_dict`."""

    def __init__(self, document: dict, exits: list[_ExitTables], grid: np.ndarray,
                 global_threshold: tuple[np.ndarray, np.ndarray] | None = None, input_guard: InputGuard | None = None):
        self._document = document
        self._exits = exits
        self.delta_grid = grid
        self.num_exits: int = len(exits)
        self.schema_version: int = document["schema_version"]
        self.labels_known: bool = document["labels_known"]
        self.measure: str = document["confidence"]
        self.binning: str = document["binning"]
        self.alpha: float = document["alpha"]
        self.design_effect: float = document.get("design_effect", 1.0)
        self.window: int = document["window"]
        self.validation_size: int = document["validation_size"]
        self.data_fingerprint: str = document["data_fingerprint"]
        self.temperatures: np.ndarray = np.array([e.temperature for e in exits])
        self.has_tail_tables: bool = all(e.tail_edges is not None for e in exits)
        # Schema 3: every policy decides at the grid δ its guard was fitted at, and promises by that guard.
        self.guarded_everywhere: bool = self.schema_version >= 3
        # pcee-lb-global: ([G] thresholds, inf where none; [G] their bounds), and the same as Python pairs
        self.global_threshold = global_threshold
        self.input_guard: InputGuard | None = input_guard
        self._ceilings = {policy: self._ceiling(policy) for policy in POLICIES}
        self._firing: dict[tuple[str, float], tuple[np.ndarray, tuple[int, ...]]] = {}  # see _firing_at
        self._lists = [exit_lists(ex) for ex in exits]  # step_one's bisect needs Python lists
        self._grid_list: list[float] = grid.tolist()
        self.global_rows: list[tuple[float, float]] = [] if global_threshold is None else list(
            zip(global_threshold[0].tolist(), global_threshold[1].tolist(), strict=True))

    # --- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict, num_exits: int | None = None) -> Calibration:
        """Validate a calibration.json document and precompute the lookup tables.

        Raises ValueError naming the field that is wrong; `num_exits` (the bundle's) is checked.
        """
        doc = parse_document(data)
        if num_exits is not None and len(doc.exits) != num_exits:
            raise ValueError(f"calibration: {len(doc.exits)} exit tables for a model with {num_exits} exits "
                             "(was it calibrated for another bundle?)")
        try:
            grid = check_grid(doc.delta_grid)
        except ValueError as exc:
            raise ValueError(f"calibration: delta_grid: {exc}") from exc
        settings = _Settings(window=doc.window, alpha=doc.alpha, prior=doc.beta_prior,
                             validation_size=doc.validation_size, schema=doc.schema_version,
                             design_effect=doc.design_effect)
        exits = [_parse_exit(raw, k, grid, settings) for k, raw in enumerate(doc.exits)]
        global_threshold = None if doc.global_threshold is None else _global_threshold(
            doc.global_threshold, grid, doc.alpha, doc.design_effect)
        try:
            guard = None if doc.input_guard is None else InputGuard.from_document(doc.input_guard)
        except ValueError as exc:
            raise ValueError(f"calibration: {exc}") from exc
        document = copy.deepcopy(dict(data))
        document["kind"] = DOCUMENT_KIND
        document["alpha"] = float(doc.alpha)
        return cls(document, exits, grid, global_threshold, guard)

    def to_dict(self) -> dict:
        """The calibration.json document (JSON-serialisable; a deep copy)."""
        return copy.deepcopy(self._document)

    # --- per-exit quantities ------------------------------------------------------------------

    def probabilities(self, exit_index: int, logits: np.ndarray) -> np.ndarray:
        """softmax(logits / T_exit) in float64."""
        return softmax(logits, self._exit(exit_index).temperature)

    def confidence(self, exit_index: int, logits: np.ndarray) -> np.ndarray:
        """The confidence measure of exit `exit_index` for each row of logits."""
        return confidence_from_probs(self.probabilities(exit_index, logits), self.measure)

    def edges(self, exit_index: int) -> np.ndarray:
        return self._exit(exit_index).edges.copy()

    def bin_index(self, exit_index: int, confidences: np.ndarray) -> np.ndarray:
        return bin_index(self._exit(exit_index).edges, confidences)

    def counts(self, exit_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(count, correct count) per bin of the unconditional table."""
        ex = self._exit(exit_index)
        return ex.counts.copy(), ex.correct.copy()

    def agreement(self, exit_index: int) -> tuple[np.ndarray, float] | None:
        """Calibration-time agreement of this exit's prediction with the last exit's: per bin
        (with the exit's overall rate where a bin is empty) and overall. None when not recorded."""
        stored = self._exit(exit_index).agreement
        if stored is None:
            return None
        counts, agree = stored
        if not counts.sum():
            return None
        overall = float(agree.sum() / counts.sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            per_bin = np.where(counts > 0, agree / counts, overall)
        return np.append(per_bin, overall), overall  # the extra entry serves the NaN-sentinel bin

    def table(self, kind: str, exit_index: int) -> np.ndarray:
        """Unconditional table values per bin: kind in accuracy, smoothed, lower (-inf / 0 when empty)."""
        if kind not in TABLE_KINDS:
            raise ValueError(f"unknown table kind {kind!r}; choose from {', '.join(TABLE_KINDS)}")
        return self._exit(exit_index).values[kind].copy()

    def grid_index(self, deltas: np.ndarray) -> np.ndarray:
        """Row of the grid δ each request δ uses: nearest at or above (clipped to the grid's ends)."""
        g = np.searchsorted(self.delta_grid, np.asarray(deltas, dtype=np.float64) - GRID_TOLERANCE, side="left")
        return np.minimum(g, self.delta_grid.size - 1)

    def _exit(self, exit_index: int) -> _ExitTables:
        if not 0 <= exit_index < self.num_exits:
            raise ValueError(f"exit index {exit_index} out of range: the model has {self.num_exits} exits")
        return self._exits[exit_index]

    # --- which exits can fire ------------------------------------------------------------------

    def firing_exits(self, policy: str, deltas: np.ndarray | float) -> np.ndarray:
        """[num_exits] bool: could exit k let at least one of these samples leave, whatever its logits?

        False means `step(policy, k, …)` says exit_now = False for every row at these δ: the server
        need not compute exit k's head, nor stop its hidden-state chain there (issue 16). The last
        exit always fires. Exact for the table and tail rules (a bin's value must reach δ), conservative
        for `confidence` (any exit may fire).
        """
        ceilings = self._ceilings.get(policy)
        if ceilings is None:
            raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
        deltas = np.atleast_1d(np.asarray(deltas, dtype=np.float64))
        g = self.grid_index(deltas)
        decided_at = np.maximum(self.delta_grid[g], deltas) if self.guarded_everywhere else deltas  # see step
        fires: np.ndarray = np.any(decided_at[None, :] <= ceilings[:, g], axis=1)
        fires[-1] = True
        return fires

    def firing_exits_at(self, policy: str, delta: float) -> np.ndarray:
        """`firing_exits` for one δ, remembered: the servers ask it per batch or decoding step. Bounded,
        because δ comes from clients; read-only (the array is shared)."""
        return self._firing_at(policy, delta)[0]

    def next_firing_exits_at(self, policy: str, delta: float) -> tuple[int, ...]:
        """For each exit k, the first exit at or after k that can let a sample leave at δ (the last
        always can): where a lone sample's next stop is, remembered with `firing_exits_at`."""
        return self._firing_at(policy, delta)[1]

    def _firing_at(self, policy: str, delta: float) -> tuple[np.ndarray, tuple[int, ...]]:
        key = (policy, float(delta))
        entry = self._firing.get(key)
        if entry is None:
            if len(self._firing) >= FIRING_CACHE:
                self._firing.clear()
            fires = self.firing_exits(policy, delta)
            fires.flags.writeable = False
            flags = fires.tolist()
            stops = tuple(next(j for j in range(k, len(flags)) if flags[j]) for k in range(len(flags)))
            entry = self._firing[key] = (fires, stops)
        return entry

    def _ceiling(self, policy: str) -> np.ndarray:
        """[num_exits, G]: the largest δ at which exit k lets some bin leave, for requests on grid row g."""
        rule = POLICY[policy].resolve(self)
        return np.array([rule.ceiling(self, ex) for ex in self._exits], dtype=np.float64)

    # --- the decision -------------------------------------------------------------------------

    def step(self, policy: str, exit_index: int, logits: np.ndarray, deltas: Deltas | np.ndarray | float,
             in_distribution: np.ndarray | None = None) -> StepDecision:
        """Decide for the n samples still running at exit `exit_index` (logits [n, C], deltas [n] or one δ).

        `deltas`: a `Deltas` (checked at a protocol's edge: the engine's) is trusted; anything else is
        checked here.
        `in_distribution`: [n] bool from the input guard (None: not applied); False withholds the promise.

        Schema 3: the exit rule decides at the grid δ a request's δ maps to (nearest at or above), so
        the samples that leave are exactly those the policy's guard table was counted on; the promise
        is that guard (`promised`, a lower bound on the accuracy of the samples the policy answers
        there at least as confident as this one) reaching the request's own δ. Older documents decide
        and promise as they were fitted; policies they hold no guard for promise nothing."""
        chosen = POLICY.get(policy)
        if chosen is None:
            raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
        rule = chosen.resolve(self)
        ex = self._exit(exit_index)
        logits = np.asarray(logits)
        if logits.ndim != 2:
            raise ValueError(f"logits must be [n, classes], got shape {logits.shape}")
        n = logits.shape[0]
        if not isinstance(deltas, Deltas) or deltas.shape != (n,):
            deltas = normalise_deltas(deltas, n, where="deltas")
        probs = softmax(logits, ex.temperature)
        conf = confidence_from_probs(probs, self.measure)
        last = exit_index == self.num_exits - 1
        g = self.grid_index(deltas)
        # Above the grid's top (a grid not ending at 1) a request is never decided more loosely than asked.
        decided_at = np.maximum(self.delta_grid[g], deltas) if self.guarded_everywhere else deltas
        leaves, estimate, guard = rule.rule(self, ex, last, probs, conf, decided_at, g)
        # The last exit answers everyone; a rule says None there (and only there) for "no decision".
        exit_now = np.ones(n, dtype=bool) if last or leaves is None else leaves
        if self._guarded_by(rule):  # schema 3: every policy; schema 2: pcee-lb-tail and the baselines
            promised = guard if guard is not None else rule.promised(self, ex, conf, g)
            target_met = exit_now & (promised >= deltas)
            reason = np.where(target_met, PROMISED, BELOW_TARGET).astype(np.uint8)
        else:  # no guard in this document: say so instead of promising a point estimate
            promised = np.zeros(n)
            target_met = np.zeros(n, dtype=bool)
            reason = np.full(n, POLICY_UNGUARDED, dtype=np.uint8)
        if in_distribution is not None:
            foreign = ~np.asarray(in_distribution, dtype=bool)
            reason[foreign] = OUT_OF_DISTRIBUTION
            target_met = target_met & ~foreign
        return StepDecision(exit_now=exit_now, estimate=estimate, target_met=target_met, confidence=conf,
                            promised=promised, reason=reason)

    def guards(self, policy: str) -> bool:
        """Does this document hold a guard for `policy`'s promise (else its answers promise nothing)?"""
        return self._guarded_by(POLICY[policy].resolve(self))

    def _guarded_by(self, rule: Policy) -> bool:
        return self.guarded_everywhere or (self.has_tail_tables and rule.guarded_in_schema_2)

    def step_one(self, policy: str, exit_index: int, logits: np.ndarray, delta: float,
                 in_distribution: bool = True) -> OneDecision:
        """`step` for one sample: logits [1, C], δ a float that went through `normalise_deltas` (the engine's).

        The same decision, bit for bit, as Python scalars: a lone request's batch of one row would pay
        numpy's per-call dispatch ~25 times for one value (calibration/one_row.py)."""
        chosen = POLICY.get(policy)
        if chosen is None:
            raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
        rule = chosen.resolve(self)
        ex = self._exit(exit_index)
        if logits.ndim != 2 or logits.shape[0] != 1:
            raise ValueError(f"step_one takes the logits of one sample, [1, classes], got shape {logits.shape}")
        # grid_index for one δ: bisect_left on the same floats is np.searchsorted(side="left").
        g = min(bisect.bisect_left(self._grid_list, delta - GRID_TOLERANCE), len(self._grid_list) - 1)
        decided_at = max(self._grid_list[g], delta) if self.guarded_everywhere else delta
        lists = self._lists[exit_index]
        # The softmax and the confidence are the numpy functions `step` calls, on the same [1, C] row.
        probs = softmax(logits, ex.temperature)
        row = probs[0].tolist()
        conf = confidence_one(self.measure, probs, row)
        leaves, estimate, guard = rule.rule_one(self, ex, lists, exit_index == self.num_exits - 1, row, conf, g, decided_at)
        if self._guarded_by(rule):
            promised = guard if guard is not None else rule.promised_one(self, ex, lists, conf, g)
            target_met = leaves and promised >= delta
        else:
            return OneDecision(leaves, estimate, False, conf, 0.0,
                               POLICY_UNGUARDED if in_distribution else OUT_OF_DISTRIBUTION)
        if not in_distribution:
            return OneDecision(leaves, estimate, False, conf, promised, OUT_OF_DISTRIBUTION)
        return OneDecision(leaves, estimate, target_met, conf, promised, PROMISED if target_met else BELOW_TARGET)

    def __repr__(self) -> str:
        return (f"Calibration({self.num_exits} exits, {self.measure}, {self.validation_size} validation samples, "
                f"labels_known={self.labels_known})")


# --- parsing ----------------------------------------------------------------------------------


def _global_threshold(raw: GlobalThreshold, grid: np.ndarray, alpha: float, design_effect: float,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """([G] thresholds, +inf where none passed; [G] their guarded bounds), checked against the counts."""
    where = "calibration: global_threshold"
    if not len(raw.thresholds) == len(raw.counts) == len(raw.correct) == grid.size:
        raise ValueError(f"{where}: thresholds, counts and correct need one value per grid δ ({grid.size})")
    counts = _int_array(raw.counts, f"{where}: counts")
    correct = _int_array(raw.correct, f"{where}: correct")
    if np.any(correct > counts):
        raise ValueError(f"{where}: more correct answers than answers")
    thresholds = _float_array(raw.thresholds, f"{where}: thresholds")
    found = np.isfinite(thresholds)
    bounds = np.where(found, clopper_pearson_lower(correct, counts, alpha, design_effect), 0.0)
    if np.any(bounds[found] < grid[found] - _CONSISTENCY_TOLERANCE):
        raise ValueError(f"{where}: a threshold whose answers' bound is below its δ (edited by hand?)")
    return np.where(found, thresholds, np.inf), bounds


# --- parsing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    window: int
    alpha: float
    prior: tuple[float, float]
    validation_size: int
    schema: int
    design_effect: float = 1.0


def _int_array(value: list, where: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: not a rectangular list of integers") from exc
    if shape is not None and array.shape != shape:
        raise ValueError(f"{where}: shape {array.shape}, expected {shape}")
    if np.any(array < 0):
        raise ValueError(f"{where}: counts cannot be negative")
    return array


def _float_array(value: list, where: str) -> np.ndarray:
    return np.asarray([math.nan if v is None else v for v in value], dtype=np.float64)


def _check_consistent(stored: np.ndarray, computed: np.ndarray, where: str) -> None:
    """Stored derived tables are for readers; they must agree with what the counts imply."""
    if stored.shape != computed.shape:
        raise ValueError(f"{where}: {stored.size} values for {computed.size} bins")
    finite = np.isfinite(computed)
    if np.any(np.isfinite(stored) != finite) or np.any(np.abs(stored[finite] - computed[finite]) > _CONSISTENCY_TOLERANCE):
        raise ValueError(f"{where}: does not match the counts and correct counts (edited by hand?)")


def with_sentinel(values: np.ndarray, fill: float | bool) -> np.ndarray:
    """values [..., M] with a column M for the sentinel bin (NaN confidences, unobserved samples)."""
    pad = np.full(values.shape[:-1] + (1,), fill)
    return np.concatenate([values, pad], axis=-1)


def _grid_rows(block: GridRows, m: int, grid: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The [G, M] counts and correct counts a compact block stands for."""
    counts = _int_array(block.counts, f"{where}: counts")
    correct = _int_array(block.correct, f"{where}: correct")
    rows = _int_array(block.grid_rows, f"{where}: grid_rows", (grid.size,))
    if counts.ndim != 2 or counts.shape[1] != m or correct.shape != counts.shape:
        raise ValueError(f"{where}: counts and correct must be lists of rows of {m} bins")
    if np.any(correct > counts):
        raise ValueError(f"{where}: a bin has more correct samples than samples")
    if np.any(rows >= counts.shape[0]):
        raise ValueError(f"{where}: grid_rows points past the {counts.shape[0]} stored rows")
    return counts[rows], correct[rows]


def _allowed(allowed: np.ndarray) -> np.ndarray:
    """[G, M] permission with the sentinel column (NaN confidences never leave)."""
    return with_sentinel(allowed, False).astype(bool)


def _parse_exit(raw: ExitDocument, k: int, grid: np.ndarray, settings: _Settings) -> _ExitTables:
    where = f"calibration: exit {k}"
    if raw.index != k:
        raise ValueError(f"{where}: index is {raw.index}, expected {k}")
    temperature = float(raw.temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{where}: temperature must be a positive number, got {temperature}")
    try:
        edges = check_edges(_float_array(raw.edges, f"{where}: edges"))
    except ValueError as exc:
        raise ValueError(f"{where}: edges: {exc}") from exc
    m = edges.size - 1
    counts = _int_array(raw.counts, f"{where}: counts", (m,))
    correct = _int_array(raw.correct, f"{where}: correct", (m,))
    if np.any(correct > counts):
        raise ValueError(f"{where}: a bin has more correct samples than samples")
    if counts.sum() > settings.validation_size:
        raise ValueError(f"{where}: {counts.sum()} samples in the bins but validation_size is {settings.validation_size}")

    values_of = partial(table_values, window=settings.window, alpha=settings.alpha, prior=settings.prior,
                        design_effect=settings.design_effect)
    values = {kind: values_of(kind, counts, correct) for kind in TABLE_KINDS}
    for kind, key in _STORED_TABLES.items():
        _check_consistent(_float_array(getattr(raw, key), f"{where}: {key}"), values[kind], f"{where}: {key}")
    if raw.validation_accuracy is not None and counts.sum():
        _check_consistent(np.array([raw.validation_accuracy]), np.array([correct.sum() / counts.sum()]),
                          f"{where}: validation_accuracy")

    agreement = None
    if raw.agreement is not None:
        agree_counts = _int_array(raw.agreement.counts, f"{where}: agreement: counts", (m,))
        agree = _int_array(raw.agreement.agree, f"{where}: agreement: agree", (m,))
        if np.any(agree > agree_counts):
            raise ValueError(f"{where}: agreement: a bin has more agreeing samples than samples")
        agreement = (agree_counts, agree)

    thresholds = _float_array(raw.per_exit_threshold.thresholds, f"{where}: thresholds")
    precision = _float_array(raw.per_exit_threshold.precision, f"{where}: precision")
    if thresholds.shape != precision.shape or np.any(~np.isfinite(thresholds)) or np.any(~np.isfinite(precision)):
        raise ValueError(f"{where}: per_exit_threshold needs finite thresholds and precision of equal length")
    if np.any(np.diff(thresholds) <= 0) or np.any(np.diff(precision) <= 0):
        raise ValueError(f"{where}: per_exit_threshold thresholds and precision must be strictly increasing")

    # Schema 1 reach sets were counted with strict monotonicity (every smaller δ constrains).
    strict = settings.schema < 2
    cond_decide, cond_report, cond_allowed = {}, {}, {}
    for policy, kind in CONDITIONAL_KINDS.items():
        rows_counts, rows_correct = _grid_rows(raw.conditional.of(policy), m, grid, f"{where}: conditional {policy}")
        if not strict:
            rows_counts, rows_correct = borrow_empty_rows(rows_counts, rows_correct)
        cond_values = values_of(kind, rows_counts, rows_correct)
        allowed = exit_allowed(cond_values, grid)
        cond_decide[policy] = with_sentinel(cond_values, -np.inf)
        cond_report[policy] = with_sentinel(np.maximum(cond_values, 0.0), 0.0)
        cond_allowed[policy] = _allowed(allowed)

    tail_edges, tail_guard, tail_estimate, tail_allowed = None, {}, {}, None
    if raw.tail is not None:
        try:
            tail_edges = check_edges(_float_array(raw.tail.edges, f"{where}: tail edges"))
        except ValueError as exc:
            raise ValueError(f"{where}: tail: edges: {exc}") from exc
        for policy in POLICIES if settings.schema >= 3 else TAIL_POLICIES_V2:
            block = raw.tail.of(policy)
            if block is None:
                raise ValueError(f"{where}: tail: no table for {policy}")
            rows_counts, rows_correct = _grid_rows(block, tail_edges.size - 1, grid, f"{where}: tail {policy}")
            tail = tail_values(rows_counts, rows_correct, grid, settings.alpha, settings.design_effect)
            tail_guard[policy] = with_sentinel(tail, 0.0)
            tail_estimate[policy] = with_sentinel(bin_estimates(rows_counts, rows_correct, settings.window, settings.prior), 0.0)
            if policy == "pcee-lb-tail":
                tail_allowed = _allowed(tail >= grid[:, None])  # no monotone-in-δ constraint: see tails.py

    return _ExitTables(
        temperature=temperature,
        edges=edges,
        counts=counts,
        correct=correct,
        values=values,
        decide={kind: with_sentinel(v, -np.inf) for kind, v in values.items()},
        report={kind: with_sentinel(np.maximum(v, 0.0), 0.0) for kind, v in values.items()},
        cond_decide=cond_decide,
        cond_report=cond_report,
        cond_allowed=cond_allowed,
        thresholds=thresholds,
        precision=precision,
        agreement=agreement,
        tail_edges=tail_edges,
        tail_guard=tail_guard,
        tail_estimate=tail_estimate,
        tail_allowed=tail_allowed,
    )
