"""Fitting: validation logits (and labels) -> the calibration.json document (fitting time only).

`fit_calibration` loads the document through `Calibration.from_dict`, so a fitted calibration and
one read back from disk are the same object. Nothing on the serving path imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from exitserve.calibration.binning import bin_counts, bin_index, check_edges, make_edges
from exitserve.calibration.bounds import design_effect
from exitserve.calibration.confidence import check_measure
from exitserve.calibration.document import (
    CONDITIONAL_KINDS,
    DEFAULT_DELTA_GRID,
    DEFAULT_PRIOR,
    DOCUMENT_KIND,
    SCHEMA_VERSION,
    check_grid,
)
from exitserve.calibration.global_threshold import fit_global_threshold
from exitserve.calibration.input_guard import DEFAULT_QUANTILE, fit_input_guard
from exitserve.calibration.observations import Observations, observe_logits
from exitserve.calibration.policies import POLICIES, POLICY, FitInputs
from exitserve.calibration.rules import Calibration, with_sentinel
from exitserve.calibration.tables import (
    TABLE_KINDS,
    borrow_empty_rows,
    conditional_counts,
    exit_allowed,
    table_values,
)
from exitserve.calibration.tails import DEFAULT_TAIL_BINS, tail_values
from exitserve.calibration.temperature import fit_temperature as fit_exit_temperature
from exitserve.calibration.threshold import margin_records

__all__ = ["Observations", "build_calibration_dict", "fit_calibration", "observe_logits", "refit_document",
           "tables_document"]


def check_logits(logits_per_exit: Sequence[np.ndarray], labels: np.ndarray | None) -> tuple[list[np.ndarray], np.ndarray | None]:
    if len(logits_per_exit) == 0:
        raise ValueError("need logits of at least one exit")
    arrays = [np.asarray(z) for z in logits_per_exit]
    n, classes = arrays[0].shape if arrays[0].ndim == 2 else (None, None)
    for k, z in enumerate(arrays):
        if z.ndim != 2 or z.shape != (n, classes):
            raise ValueError(f"exit {k}: logits of shape {z.shape}, expected ({n}, {classes}) like exit 0")
        if not np.all(np.isfinite(z)):
            raise ValueError(f"exit {k}: logits contain NaN or inf")
    if n == 0:
        raise ValueError("need at least one validation sample")
    if classes < 2:
        raise ValueError("need at least two classes")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be {n} integers, got shape {labels.shape} dtype {labels.dtype}")
        if labels.min() < 0 or labels.max() >= classes:
            raise ValueError(f"labels must lie in [0, {classes}), got {labels.min()}..{labels.max()}")
        labels = labels.astype(np.int64)
    return arrays, labels


def _rows(counts: np.ndarray, correct: np.ndarray) -> dict:
    """Compact [G, M] storage: distinct (counts, correct) rows plus the row used by each grid δ."""
    pairs = np.concatenate([counts, correct], axis=1)
    _, first, inverse = np.unique(pairs, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # rows in order of first use, so the file reads top-down
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return {
        "counts": counts[first[order]].tolist(),
        "correct": correct[first[order]].tolist(),
        "grid_rows": rank[inverse.ravel()].tolist(),
    }


def _nullable(values: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(v) else float(v) for v in values]


def build_calibration_dict(
    logits_per_exit: Sequence[np.ndarray],
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
    prior: tuple[float, float] = DEFAULT_PRIOR,
    tail_bins: int = DEFAULT_TAIL_BINS,
    features: InputFeatures | None = None,
    groups: np.ndarray | None = None,
) -> dict:
    """The calibration.json document; `features` (the first segment's pooled statistics of the same
    samples, and the bundle's name for them) adds the input guard. `groups` (one cluster id per
    sample, e.g. the answer a token belongs to) makes every lower bound count effective samples:
    the design effect of the clustering (`bounds.design_effect`) is measured and stored."""
    arrays, labels = check_logits(logits_per_exit, labels)
    check_measure(confidence)
    grid = check_grid(delta_grid)
    _check_smoothing(window, alpha)
    temperatures = [
        fit_exit_temperature(z, labels) if (fit_temperature and labels is not None) else 1.0 for z in arrays
    ]
    observations = observe_logits(arrays, temperatures, confidence)
    edges = [check_edges(make_edges(conf, bins, binning)) for conf in observations.confidence]
    tails = [check_edges(make_edges(conf, tail_bins, "equal-mass")) for conf in observations.confidence]
    effect = 1.0
    if groups is not None:
        if np.shape(groups) != (observations.size,):
            raise ValueError(f"groups: need one cluster id per sample ({observations.size}), got shape {np.shape(groups)}")
        reference = labels if labels is not None else observations.prediction[-1]
        effect = design_effect([np.asarray(p) == reference for p in observations.prediction], np.asarray(groups))
    document = tables_document(
        observations, labels, temperatures, edges, tails, confidence=confidence, bins=bins, binning=binning,
        window=window, alpha=alpha, grid=grid, data_fingerprint=data_fingerprint, prior=prior, tail_bins=tail_bins,
        design_effect=effect,
    )
    if features is not None:
        if len(features.values) != observations.size:
            raise ValueError(f"input guard: features of {len(features.values)} samples for {observations.size} logits")
        document["input_guard"] = fit_input_guard(features.values, features.name, features.quantile).to_document()
    return document


@dataclass(frozen=True)
class InputFeatures:
    """What the input guard is fitted on: the bundle's features output for the calibration samples."""

    name: str
    values: np.ndarray  # [n, D]
    quantile: float = DEFAULT_QUANTILE


def refit_document(base: dict, observations: Observations, labels: np.ndarray, *, data_fingerprint: str) -> dict:
    """Rebuild every table of calibration document `base` from new labelled observations.

    The confidence measure, temperatures, bin edges (tail bins too), grid, window and alpha stay those
    of `base` (a schema 1 base gets the default prior and equal-mass tail bins of the new observations):
    the observations (e.g. logged by the server) were computed with its temperatures, so refitting
    them would make the logged confidences meaningless. Samples missing at an exit (they left
    earlier) count nowhere there; for the conditional tables they simply never reach it.
    """
    exits = base["exits"]
    if len(observations.confidence) != len(exits):
        raise ValueError(f"observations of {len(observations.confidence)} exits for a calibration of {len(exits)}")
    labels = np.asarray(labels)
    if labels.shape != (observations.size,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {observations.size} integers")
    if observations.size == 0 or not observations.observed(0).any():
        raise ValueError("no observations to rebuild the tables from")
    tail_bins = int(base.get("tail_bins") or DEFAULT_TAIL_BINS)
    tails = [
        check_edges(np.asarray(e["tail"]["edges"], dtype=np.float64)) if e.get("tail")
        else check_edges(make_edges(np.asarray(observations.confidence[k], np.float64), tail_bins, "equal-mass"))
        for k, e in enumerate(exits)
    ]
    document = tables_document(
        observations, labels.astype(np.int64), [float(e["temperature"]) for e in exits],
        [check_edges(np.asarray(e["edges"], dtype=np.float64)) for e in exits], tails,
        confidence=base["confidence"], bins=int(base["bins"]), binning=base["binning"], window=int(base["window"]),
        alpha=float(base["alpha"]), grid=check_grid(base["delta_grid"]), data_fingerprint=data_fingerprint,
        prior=tuple(base.get("prior") or DEFAULT_PRIOR), tail_bins=tail_bins,
        design_effect=float(base.get("design_effect", 1.0)),  # served observations carry no clusters: keep it
    )
    # Served observations carry no features: the input guard stays the one fitted on the base's data.
    if base.get("input_guard") is not None:
        document["input_guard"] = base["input_guard"]
    return document


def _check_smoothing(window: int, alpha: float) -> None:
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def tables_document(
    observations: Observations,
    labels: np.ndarray | None,
    temperatures: Sequence[float],
    edges_per_exit: Sequence[np.ndarray],
    tail_edges_per_exit: Sequence[np.ndarray],
    *,
    confidence: str,
    bins: int,
    binning: str,
    window: int,
    alpha: float,
    grid: np.ndarray,
    data_fingerprint: str,
    prior: tuple[float, float] = DEFAULT_PRIOR,
    tail_bins: int = DEFAULT_TAIL_BINS,
    design_effect: float = 1.0,
) -> dict:
    """The calibration.json document for fixed temperatures and edges, counted from `observations`."""
    num_exits = len(observations.confidence)
    predictions = [np.asarray(p, dtype=np.int64) for p in observations.prediction]
    last_seen = observations.observed(num_exits - 1)
    # Without labels, correctness is agreement with the last exit (self-supervised).
    reference = labels if labels is not None else predictions[-1]
    exits, bins_per_exit, correct_per_exit, num_bins, tail_bins_per_exit, margins_per_exit = [], [], [], [], [], []
    records = []
    for k in range(num_exits):
        edges = edges_per_exit[k]
        m = edges.size - 1
        seen = observations.observed(k)
        conf = np.where(seen, np.asarray(observations.confidence[k], dtype=np.float64), np.nan)
        correct = seen & (predictions[k] == reference)
        b = bin_index(edges, conf)
        b[~seen] = m  # the NaN sentinel: counted nowhere, never leaves
        counts, hits = bin_counts(b, correct, m)
        margins = np.where(seen, np.asarray(observations.margin[k], dtype=np.float64), np.nan)
        thresholds, precision = margin_records(margins, correct)
        # Agreement with the last exit per bin: the reference for label-free shadow checks.
        both = seen & last_seen
        agree_counts, agree_hits = bin_counts(np.where(both, b, m), both & (predictions[k] == predictions[-1]), m)
        exits.append({
            "index": k,
            "temperature": float(temperatures[k]),
            "validation_accuracy": float(hits.sum() / counts.sum()) if counts.sum() else 0.0,
            "edges": edges.tolist(),
            "counts": counts.tolist(),
            "correct": hits.tolist(),
            "accuracy": _nullable(table_values("accuracy", counts, hits, prior=prior)),
            "smoothed_accuracy": _nullable(table_values("smoothed", counts, hits, window=window, prior=prior)),
            "lower_bound": table_values("lower", counts, hits, alpha=alpha, design_effect=design_effect).tolist(),
            "per_exit_threshold": {"thresholds": thresholds.tolist(), "precision": precision.tolist()},
            "conditional": {},
            "agreement": {"counts": agree_counts.tolist(), "agree": agree_hits.tolist()},
        })
        bins_per_exit.append(b)
        correct_per_exit.append(correct)
        num_bins.append(m)
        tail_b = bin_index(tail_edges_per_exit[k], conf)
        tail_b[~seen] = tail_edges_per_exit[k].size - 1
        tail_bins_per_exit.append(tail_b)
        margins_per_exit.append(margins)
        records.append((thresholds, precision))

    cond_leave: dict[str, list[np.ndarray]] = {policy: [] for policy in CONDITIONAL_KINDS}
    for policy, kind in CONDITIONAL_KINDS.items():
        values = partial(table_values, kind, window=window, alpha=alpha, prior=prior, design_effect=design_effect)
        def allowed(c: np.ndarray, h: np.ndarray, values: partial[np.ndarray] = values) -> np.ndarray:
            return exit_allowed(values(*borrow_empty_rows(c, h)), grid)

        reach_counts, reach_hits = conditional_counts(allowed, bins_per_exit, correct_per_exit, num_bins, grid)
        for k in range(num_exits):
            exits[k]["conditional"][policy] = _rows(reach_counts[k], reach_hits[k])
            # Which bins leave at each grid δ, as rules.Calibration decides from these counts.
            cond_values = values(*borrow_empty_rows(reach_counts[k], reach_hits[k]))
            cond_leave[policy].append(with_sentinel(exit_allowed(cond_values, grid) & (cond_values >= grid[:, None]), False))

    tail_sizes = [e.size - 1 for e in tail_edges_per_exit]
    tails = {"pcee-lb-tail": conditional_counts(
        lambda c, h: tail_values(c, h, grid, alpha, design_effect) >= grid[:, None],
        tail_bins_per_exit, correct_per_exit, tail_sizes, grid,
    )}
    confidences = [np.where(observations.observed(k), np.asarray(observations.confidence[k], np.float64), np.nan)
                   for k in range(num_exits)]
    global_t, global_n, global_k = fit_global_threshold(confidences, correct_per_exit, grid, alpha,
                                                        design_effect=design_effect)
    # Every other policy's guard is a tail table of the samples its own rule lets leave (policies.Policy.fit_leave).
    fit = FitInputs(
        grid=grid, confidence=confidences, margin=margins_per_exit, bins=bins_per_exit,
        table_decide={kind: [with_sentinel(table_values(kind, np.asarray(e["counts"]), np.asarray(e["correct"]),
                                                         window=window, alpha=alpha, prior=prior,
                                                         design_effect=design_effect), -np.inf)
                             for e in exits] for kind in TABLE_KINDS},
        conditional_leave=cond_leave,
        margin_thresholds=[_margin_thresholds(*records[k], grid) for k in range(num_exits)],
        global_thresholds=np.where(np.isnan(global_t), np.inf, global_t),
    )
    leave_rules = {name: POLICY[name].fit_leave(fit) for name in POLICIES if name != "pcee-lb-tail"}
    for policy, leave in leave_rules.items():
        tails[policy] = leaver_counts(leave, tail_bins_per_exit, correct_per_exit, tail_sizes, grid)
    for k in range(num_exits):
        exits[k]["tail"] = {"edges": tail_edges_per_exit[k].tolist(),
                            **{policy: _rows(counts[k], hits[k]) for policy, (counts, hits) in tails.items()}}

    return {
        "kind": DOCUMENT_KIND,
        "schema_version": SCHEMA_VERSION,
        "num_exits": num_exits,
        "confidence": confidence,
        "binning": binning,
        "bins": int(bins),
        "tail_bins": int(tail_bins),
        "window": int(window),
        "alpha": float(alpha),
        "design_effect": float(design_effect),
        "prior": [float(prior[0]), float(prior[1])],
        "labels_known": labels is not None,
        "validation_size": observations.size,
        "data_fingerprint": str(data_fingerprint),
        "delta_grid": grid.tolist(),
        "exits": exits,
        "global_threshold": {"thresholds": _nullable(global_t), "counts": global_n.tolist(), "correct": global_k.tolist()},
    }


def _margin_thresholds(thresholds: np.ndarray, precision: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """per-exit-threshold's margin threshold for each grid δ (inf where none reaches it)."""
    if precision.size == 0:
        return np.full(grid.size, np.inf)
    j = np.searchsorted(precision, grid, side="left")
    return np.where(j < precision.size, thresholds[np.minimum(j, precision.size - 1)], np.inf)


def leaver_counts(
    leave: Callable[[int], np.ndarray],
    bins_per_exit: list[np.ndarray],
    correct_per_exit: list[np.ndarray],
    num_bins: list[int],
    grid: np.ndarray,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per exit, [G, M] counts of the samples that *leave* there under a rule, for every grid δ.

    `leave(k)` -> [G, n]: would the sample leave at exit k under δ_g (the rule's own decision,
    whatever it is); at the last exit every sample still running leaves. A baseline's promise at an
    exit is then a guarded tail table over exactly the samples it answers there.
    """
    g, n = grid.size, bins_per_exit[0].size
    alive = np.ones((g, n), dtype=bool)
    rows = np.repeat(np.arange(g), n).reshape(g, n)
    last = len(bins_per_exit) - 1
    counts_out, correct_out = [], []
    for k, (bins, correct, m) in enumerate(zip(bins_per_exit, correct_per_exit, num_bins, strict=True)):
        seen = (bins < m)[None, :]
        leaves = alive & seen & (True if k == last else leave(k))
        flat = rows[leaves] * m + np.broadcast_to(bins, (g, n))[leaves]
        hits = np.broadcast_to(np.asarray(correct, dtype=np.float64), (g, n))[leaves]
        counts_out.append(np.bincount(flat, minlength=g * m).reshape(g, m).astype(np.int64))
        correct_out.append(np.rint(np.bincount(flat, weights=hits, minlength=g * m)).reshape(g, m).astype(np.int64))
        alive &= ~leaves
    return counts_out, correct_out


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
    prior: tuple[float, float] = DEFAULT_PRIOR,
    tail_bins: int = DEFAULT_TAIL_BINS,
    features: InputFeatures | None = None,
    groups: np.ndarray | None = None,
) -> Calibration:
    """Fit temperatures and every table on validation logits [n, C] per exit.

    labels None => self-supervised: a sample is "correct" at an exit when it agrees with the last
    exit's prediction, and temperatures stay 1. The delta grid (default 0.50, 0.51, ..., 1.00) is
    where conditional tables are built; `prior` is the Beta pseudo-counts of the unbounded tables,
    `tail_bins` the number of equal-mass candidate thresholds per exit of the tail tables.
    """
    document = build_calibration_dict(
        logits_per_exit, labels, confidence=confidence, bins=bins, binning=binning, window=window,
        alpha=alpha, delta_grid=delta_grid, fit_temperature=fit_temperature, data_fingerprint=data_fingerprint,
        prior=prior, tail_bins=tail_bins, features=features, groups=groups,
    )
    return Calibration.from_dict(document)
