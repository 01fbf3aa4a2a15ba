"""The exit rule (DESIGN.md §3): one implementation shared by the server engine and offline evaluation.

`Calibration.step` decides, for the samples still running after exit k, which of them leave now.
The engine calls it after every segment on the rows it still holds; `decide_all` replays exactly
that loop offline. Every lookup table is precomputed in `from_dict`, so `step` is a handful of
vectorised numpy operations per call and never loops over samples.

Policies
  pcee, pcee-ws, pcee-lb    exit at the first exit l < L whose table value (bin accuracy, window-
                            smoothed accuracy, Clopper–Pearson lower bound) for the sample's
                            confidence bin is >= δ; otherwise the last exit answers.
  pcee-cond, -ws-cond,      the same over conditional tables, built per grid δ on the validation
  -lb-cond                  samples that reach each exit under that δ. A request uses the tables and
                            decisions of the grid δ nearest at or above its own (a δ within 1e-9 above
                            a grid value counts as it; below the grid: its bottom, more cautious than
                            asked; above the grid top: the top). An early exit also needs the table
                            value >= the request's own δ, so early exits always meet the target (this
                            bites only above the grid top). A bin lets samples leave at grid δ only
                            if it also does at every smaller grid δ (tables.exit_allowed), so
                            raising δ never moves a sample to an earlier exit.
  confidence                exit when the confidence itself is >= δ; the estimate is the confidence.
  per-exit-threshold        exit when the top-2 margin is >= the exit's smallest margin threshold
                            whose calibration precision is >= δ; the estimate is that precision.
  full                      always the last exit.

At the last exit every sample leaves; its estimate is the last exit's table value for its bin
(pcee accuracy for confidence-free policies, the confidence for `confidence`), and `target_met`
says whether that estimate reaches δ. Estimates are reported >= 0: a bin with no validation
samples has no evidence and reports 0 (its decision value is -inf, so it never lets anyone exit).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from exitserve.calibration.binning import BINNINGS, bin_index, check_edges
from exitserve.calibration.confidence import MEASURES, confidence_from_probs, softmax, top2_margin
from exitserve.calibration.fitting import (
    CONDITIONAL_KINDS,
    DEFAULT_DELTA_GRID,
    DOCUMENT_KIND,
    SCHEMA_VERSION,
    build_calibration_dict,
    check_grid,
)
from exitserve.calibration.tables import TABLE_KINDS, exit_allowed, table_values

POLICIES: tuple[str, ...] = (
    "pcee", "pcee-ws", "pcee-lb", "pcee-cond", "pcee-ws-cond", "pcee-lb-cond",
    "confidence", "per-exit-threshold", "full",
)
TABLE_POLICIES: dict[str, str] = {"pcee": "accuracy", "pcee-ws": "smoothed", "pcee-lb": "lower"}
GRID_TOLERANCE = 1e-9  # a δ this close above a grid value counts as that grid value
_STORED_TABLES = {"accuracy": "accuracy", "smoothed": "smoothed_accuracy", "lower": "lower_bound"}
_CONSISTENCY_TOLERANCE = 1e-6


@dataclass(frozen=True)
class StepDecision:
    """The decision at one exit for the n samples still running there (row order preserved).

    exit_now:   leave at this exit (all True at the last exit).
    estimate:   the estimated accuracy the decision relied on, for the prediction at this exit
                (table value of the sample's bin; the confidence for `confidence`; the margin
                threshold's calibration precision for `per-exit-threshold`); 0 where there is no
                evidence (empty bin, no threshold).
    target_met: estimate >= δ for samples that leave here; at an early exit it equals exit_now.
    confidence: the calibration's confidence measure of this exit (temperature-scaled).
    """

    exit_now: np.ndarray
    estimate: np.ndarray
    target_met: np.ndarray
    confidence: np.ndarray


@dataclass(frozen=True)
class Decisions:
    """Per-sample outcome of a whole multi-exit pass (`decide_all`)."""

    exit_index: np.ndarray
    prediction: np.ndarray
    estimate: np.ndarray
    target_met: np.ndarray
    confidence: np.ndarray


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
    cond_allowed_upto: dict[str, np.ndarray]  # conditional policy -> [M + 1] last grid index allowed, -1 none
    thresholds: np.ndarray  # per-exit-threshold record candidates, ascending
    precision: np.ndarray  # their precision, strictly ascending
    agreement: tuple[np.ndarray, np.ndarray] | None  # per bin: samples seen at the last exit too, agreeing with it


class Calibration:
    """Reliability tables and exit rules of one bundle. Build with `fit_calibration` or `from_dict`."""

    def __init__(self, document: dict, exits: list[_ExitTables], grid: np.ndarray):
        self._document = document
        self._exits = exits
        self.delta_grid = grid
        self.num_exits: int = len(exits)
        self.labels_known: bool = document["labels_known"]
        self.measure: str = document["confidence"]
        self.binning: str = document["binning"]
        self.alpha: float = document["alpha"]
        self.window: int = document["window"]
        self.validation_size: int = document["validation_size"]
        self.data_fingerprint: str = document["data_fingerprint"]
        self.temperatures: np.ndarray = np.array([e.temperature for e in exits])
        self._rules: dict[str, Callable[[_ExitTables, bool, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
            **{p: self._table_rule(kind) for p, kind in TABLE_POLICIES.items()},
            **{p: self._conditional_rule(p) for p in CONDITIONAL_KINDS},
            "confidence": self._confidence_rule,
            "per-exit-threshold": self._threshold_rule,
            "full": self._full_rule,
        }

    # --- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict, num_exits: int | None = None) -> Calibration:
        """Validate a calibration.json document and precompute the lookup tables.

        Raises ValueError naming the field that is wrong; `num_exits` (the bundle's) is checked.
        """
        if not isinstance(data, dict):
            raise ValueError(f"calibration: expected a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"calibration: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
        if data.get("kind", DOCUMENT_KIND) != DOCUMENT_KIND:
            raise ValueError(f"calibration: kind {data.get('kind')!r} is not {DOCUMENT_KIND!r}")
        exits_raw = _field(data, "exits", list, "calibration")
        declared = _field(data, "num_exits", int, "calibration")
        if declared != len(exits_raw):
            raise ValueError(f"calibration: num_exits is {declared} but {len(exits_raw)} exit tables are given")
        if num_exits is not None and len(exits_raw) != num_exits:
            raise ValueError(f"calibration: {len(exits_raw)} exit tables for a model with {num_exits} exits "
                             "(was it calibrated for another bundle?)")
        if not exits_raw:
            raise ValueError("calibration: needs at least one exit table")
        measure = _field(data, "confidence", str, "calibration")
        if measure not in MEASURES:
            raise ValueError(f"calibration: unknown confidence measure {measure!r}; expected one of {', '.join(MEASURES)}")
        binning = _field(data, "binning", str, "calibration")
        if binning not in BINNINGS:
            raise ValueError(f"calibration: unknown binning {binning!r}; expected one of {', '.join(BINNINGS)}")
        _field(data, "bins", int, "calibration")
        window = _field(data, "window", int, "calibration")
        alpha = float(_field(data, "alpha", (int, float), "calibration"))
        if window < 0 or not 0.0 < alpha < 1.0:
            raise ValueError(f"calibration: need window >= 0 and 0 < alpha < 1, got {window} and {alpha}")
        _field(data, "labels_known", bool, "calibration")
        validation_size = _field(data, "validation_size", int, "calibration")
        _field(data, "data_fingerprint", str, "calibration")
        try:
            grid = check_grid(_field(data, "delta_grid", list, "calibration"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"calibration: delta_grid: {exc}") from exc

        exits = [_parse_exit(raw, k, grid, window, alpha, validation_size) for k, raw in enumerate(exits_raw)]
        keys = ("kind", "schema_version", "num_exits", "confidence", "binning", "bins", "window", "alpha",
                "labels_known", "validation_size", "data_fingerprint", "delta_grid", "exits")
        document = copy.deepcopy({key: data[key] for key in keys if key in data})
        document["kind"] = DOCUMENT_KIND
        document["alpha"] = alpha
        return cls(document, exits, grid)

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

    def _exit(self, exit_index: int) -> _ExitTables:
        if not 0 <= exit_index < self.num_exits:
            raise ValueError(f"exit index {exit_index} out of range: the model has {self.num_exits} exits")
        return self._exits[exit_index]

    # --- the decision -------------------------------------------------------------------------

    def step(self, policy: str, exit_index: int, logits: np.ndarray, deltas: np.ndarray | float) -> StepDecision:
        """Decide for the n samples still running at exit `exit_index` (logits [n, C], deltas [n])."""
        rule = self._rules.get(policy)
        if rule is None:
            raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
        ex = self._exit(exit_index)
        logits = np.asarray(logits)
        if logits.ndim != 2:
            raise ValueError(f"logits must be [n, classes], got shape {logits.shape}")
        n = logits.shape[0]
        deltas = np.asarray(deltas, dtype=np.float64)
        if deltas.ndim == 0:
            deltas = np.full(n, float(deltas))
        elif deltas.shape != (n,):
            raise ValueError(f"deltas must be a scalar or have shape ({n},), got {deltas.shape}")
        if n and not (deltas.min() > 0.0 and deltas.max() <= 1.0):
            raise ValueError("every delta must lie in (0, 1]")
        probs = softmax(logits, ex.temperature)
        conf = confidence_from_probs(probs, self.measure)
        last = exit_index == self.num_exits - 1
        exit_now, estimate = rule(ex, last, probs, conf, deltas)
        if last:
            exit_now = np.ones(n, dtype=bool)
            target_met = estimate >= deltas
        else:
            target_met = exit_now.copy()
        return StepDecision(exit_now=exit_now, estimate=estimate, target_met=target_met, confidence=conf)

    @staticmethod
    def _table_rule(kind: str):
        def rule(ex: _ExitTables, last: bool, probs: np.ndarray, conf: np.ndarray, deltas: np.ndarray):
            b = bin_index(ex.edges, conf)
            exit_now = None if last else ex.decide[kind][b] >= deltas
            return exit_now, ex.report[kind][b]

        return rule

    def _conditional_rule(self, policy: str):
        top = self.delta_grid.size - 1

        def rule(ex: _ExitTables, last: bool, probs: np.ndarray, conf: np.ndarray, deltas: np.ndarray):
            g = np.searchsorted(self.delta_grid, deltas - GRID_TOLERANCE, side="left")
            np.minimum(g, top, out=g)
            b = bin_index(ex.edges, conf)
            estimate = ex.cond_report[policy][g, b]
            if last:
                return None, estimate
            exit_now = (ex.cond_allowed_upto[policy][b] >= g) & (ex.cond_decide[policy][g, b] >= deltas)
            return exit_now, estimate

        return rule

    @staticmethod
    def _confidence_rule(ex: _ExitTables, last: bool, probs: np.ndarray, conf: np.ndarray, deltas: np.ndarray):
        return (None if last else conf >= deltas), conf.copy()

    @staticmethod
    def _threshold_rule(ex: _ExitTables, last: bool, probs: np.ndarray, conf: np.ndarray, deltas: np.ndarray):
        if last:
            return None, ex.report["accuracy"][bin_index(ex.edges, conf)]
        if ex.precision.size == 0:
            return np.zeros(deltas.size, dtype=bool), np.zeros(deltas.size)
        j = np.searchsorted(ex.precision, deltas, side="left")
        found = j < ex.precision.size
        j = np.minimum(j, ex.precision.size - 1)
        threshold = np.where(found, ex.thresholds[j], np.inf)
        exit_now = top2_margin(probs) >= threshold
        return exit_now, np.where(found, ex.precision[j], 0.0)

    @staticmethod
    def _full_rule(ex: _ExitTables, last: bool, probs: np.ndarray, conf: np.ndarray, deltas: np.ndarray):
        estimate = ex.report["accuracy"][bin_index(ex.edges, conf)]
        return (None if last else np.zeros(deltas.size, dtype=bool)), estimate

    def __repr__(self) -> str:
        return (f"Calibration({self.num_exits} exits, {self.measure}, {self.validation_size} validation samples, "
                f"labels_known={self.labels_known})")


# --- parsing ----------------------------------------------------------------------------------


def _field(data: dict, key: str, types, where: str):
    if not isinstance(data, dict) or key not in data:
        raise ValueError(f"{where}: missing field {key!r}")
    value = data[key]
    wanted = types if isinstance(types, tuple) else (types,)
    # bool is an int in Python; only accept it where asked for.
    if not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted):
        names = " or ".join(t.__name__ for t in wanted)
        raise ValueError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def _int_array(value, where: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: not a rectangular list of integers") from exc
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{where}: must hold integers")
    array = array.astype(np.int64)
    if shape is not None and array.shape != shape:
        raise ValueError(f"{where}: shape {array.shape}, expected {shape}")
    if np.any(array < 0):
        raise ValueError(f"{where}: counts cannot be negative")
    return array


def _float_array(value, where: str) -> np.ndarray:
    try:
        array = np.asarray([math.nan if v is None else v for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: must be a list of numbers") from exc
    return array


def _check_consistent(stored: np.ndarray, computed: np.ndarray, where: str) -> None:
    """Stored derived tables are for readers; they must agree with what the counts imply."""
    if stored.shape != computed.shape:
        raise ValueError(f"{where}: {stored.size} values for {computed.size} bins")
    finite = np.isfinite(computed)
    if np.any(np.isfinite(stored) != finite) or np.any(np.abs(stored[finite] - computed[finite]) > _CONSISTENCY_TOLERANCE):
        raise ValueError(f"{where}: does not match the counts and correct counts (edited by hand?)")


def _with_sentinel(values: np.ndarray, fill: float) -> np.ndarray:
    pad = np.full(values.shape[:-1] + (1,), fill)
    return np.concatenate([values, pad], axis=-1)


def _parse_exit(raw: dict, k: int, grid: np.ndarray, window: int, alpha: float, validation_size: int) -> _ExitTables:
    where = f"calibration: exit {k}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object")
    if _field(raw, "index", int, where) != k:
        raise ValueError(f"{where}: index is {raw['index']}, expected {k}")
    temperature = float(_field(raw, "temperature", (int, float), where))
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{where}: temperature must be a positive number, got {temperature}")
    try:
        edges = check_edges(_float_array(_field(raw, "edges", list, where), f"{where}: edges"))
    except ValueError as exc:
        raise ValueError(f"{where}: edges: {exc}") from exc
    m = edges.size - 1
    counts = _int_array(_field(raw, "counts", list, where), f"{where}: counts", (m,))
    correct = _int_array(_field(raw, "correct", list, where), f"{where}: correct", (m,))
    if np.any(correct > counts):
        raise ValueError(f"{where}: a bin has more correct samples than samples")
    if counts.sum() > validation_size:
        raise ValueError(f"{where}: {counts.sum()} samples in the bins but validation_size is {validation_size}")

    values = {kind: table_values(kind, counts, correct, window=window, alpha=alpha) for kind in TABLE_KINDS}
    for kind, key in _STORED_TABLES.items():
        _check_consistent(_float_array(_field(raw, key, list, where), f"{where}: {key}"), values[kind], f"{where}: {key}")
    if "validation_accuracy" in raw and counts.sum():
        _check_consistent(np.array([float(raw["validation_accuracy"])]), np.array([correct.sum() / counts.sum()]),
                          f"{where}: validation_accuracy")

    agreement = _parse_agreement(raw.get("agreement"), m, where)

    pet = _field(raw, "per_exit_threshold", dict, where)
    thresholds = _float_array(_field(pet, "thresholds", list, f"{where}: per_exit_threshold"), f"{where}: thresholds")
    precision = _float_array(_field(pet, "precision", list, f"{where}: per_exit_threshold"), f"{where}: precision")
    if thresholds.shape != precision.shape or np.any(~np.isfinite(thresholds)) or np.any(~np.isfinite(precision)):
        raise ValueError(f"{where}: per_exit_threshold needs finite thresholds and precision of equal length")
    if np.any(np.diff(thresholds) <= 0) or np.any(np.diff(precision) <= 0):
        raise ValueError(f"{where}: per_exit_threshold thresholds and precision must be strictly increasing")

    conditional = _field(raw, "conditional", dict, where)
    cond_decide, cond_report, cond_allowed = {}, {}, {}
    for policy, kind in CONDITIONAL_KINDS.items():
        cwhere = f"{where}: conditional {policy}"
        block = _field(conditional, policy, dict, f"{where}: conditional")
        rows_counts = _int_array(_field(block, "counts", list, cwhere), f"{cwhere}: counts")
        rows_correct = _int_array(_field(block, "correct", list, cwhere), f"{cwhere}: correct")
        grid_rows = _int_array(_field(block, "grid_rows", list, cwhere), f"{cwhere}: grid_rows", (grid.size,))
        if rows_counts.ndim != 2 or rows_counts.shape[1] != m or rows_correct.shape != rows_counts.shape:
            raise ValueError(f"{cwhere}: counts and correct must be lists of rows of {m} bins")
        if np.any(rows_correct > rows_counts):
            raise ValueError(f"{cwhere}: a bin has more correct samples than samples")
        if np.any(grid_rows >= rows_counts.shape[0]):
            raise ValueError(f"{cwhere}: grid_rows points past the {rows_counts.shape[0]} stored rows")
        cond_values = table_values(kind, rows_counts[grid_rows], rows_correct[grid_rows], window=window, alpha=alpha)
        allowed = exit_allowed(cond_values, grid)
        cond_decide[policy] = _with_sentinel(cond_values, -np.inf)
        cond_report[policy] = _with_sentinel(np.maximum(cond_values, 0.0), 0.0)
        cond_allowed[policy] = np.append(allowed.sum(axis=0) - 1, -1).astype(np.int64)

    return _ExitTables(
        temperature=temperature,
        edges=edges,
        counts=counts,
        correct=correct,
        values=values,
        decide={kind: _with_sentinel(v, -np.inf) for kind, v in values.items()},
        report={kind: _with_sentinel(np.maximum(v, 0.0), 0.0) for kind, v in values.items()},
        cond_decide=cond_decide,
        cond_report=cond_report,
        cond_allowed_upto=cond_allowed,
        thresholds=thresholds,
        precision=precision,
        agreement=agreement,
    )


def _parse_agreement(raw: object, m: int, where: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Optional per-bin agreement with the last exit (documents written before it lack it)."""
    if raw is None:
        return None
    where = f"{where}: agreement"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object")
    counts = _int_array(_field(raw, "counts", list, where), f"{where}: counts", (m,))
    agree = _int_array(_field(raw, "agree", list, where), f"{where}: agree", (m,))
    if np.any(agree > counts):
        raise ValueError(f"{where}: a bin has more agreeing samples than samples")
    return counts, agree


# --- fitting and offline decisions --------------------------------------------------------------


def fit_calibration(
    logits_per_exit: list[np.ndarray],
    labels: np.ndarray | None,
    *,
    confidence: str = "max-softmax",
    bins: int = 15,
    binning: str = "equal-width",
    window: int = 1,
    alpha: float = 0.05,
    delta_grid: Sequence[float] | np.ndarray = DEFAULT_DELTA_GRID,
    fit_temperature: bool = True,
    data_fingerprint: str = "",
) -> Calibration:
    """Fit temperatures and every table on validation logits [n, C] per exit.

    labels None => self-supervised: a sample is "correct" at an exit when it agrees with the last
    exit's prediction, and temperatures stay 1. The delta grid (default 0.50, 0.51, ..., 1.00) is
    where conditional tables are built.
    """
    document = build_calibration_dict(
        logits_per_exit, labels, confidence=confidence, bins=bins, binning=binning, window=window,
        alpha=alpha, delta_grid=delta_grid, fit_temperature=fit_temperature, data_fingerprint=data_fingerprint,
    )
    return Calibration.from_dict(document)


def decide_all(
    calibration: Calibration, policy: str, logits_per_exit: Sequence[np.ndarray], deltas: np.ndarray | float
) -> Decisions:
    """Run the exit rule over whole logits, exit by exit, on the still-running rows only.

    This is the engine's loop without the network: after each exit the answered rows are removed
    and the rest are compacted, so offline results are exactly what the server would answer.
    """
    if len(logits_per_exit) != calibration.num_exits:
        raise ValueError(f"logits of {len(logits_per_exit)} exits for a calibration of {calibration.num_exits}")
    n = np.asarray(logits_per_exit[0]).shape[0]
    deltas = np.asarray(deltas, dtype=np.float64)
    deltas = np.full(n, float(deltas)) if deltas.ndim == 0 else deltas
    if deltas.shape != (n,):
        raise ValueError(f"deltas must be a scalar or have shape ({n},), got {deltas.shape}")
    exit_index = np.full(n, -1, dtype=np.int64)
    prediction = np.full(n, -1, dtype=np.int64)
    estimate = np.zeros(n)
    target_met = np.zeros(n, dtype=bool)
    confidence = np.zeros(n)
    remaining = np.arange(n)
    for k in range(calibration.num_exits):
        if remaining.size == 0:
            break
        logits = np.asarray(logits_per_exit[k])[remaining]
        decision = calibration.step(policy, k, logits, deltas[remaining])
        done = remaining[decision.exit_now]
        exit_index[done] = k
        prediction[done] = logits[decision.exit_now].argmax(axis=1)
        estimate[done] = decision.estimate[decision.exit_now]
        target_met[done] = decision.target_met[decision.exit_now]
        confidence[done] = decision.confidence[decision.exit_now]
        remaining = remaining[~decision.exit_now]
    return Decisions(exit_index=exit_index, prediction=prediction, estimate=estimate, target_met=target_met,
                     confidence=confidence)
