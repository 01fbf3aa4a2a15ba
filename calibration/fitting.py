"""Fitting: validation logits (and labels) -> the calibration.json document.

`calibration.policies.fit_calibration` wraps this and loads the document through
`Calibration.from_dict`, so a fitted calibration and one read back from disk are the same object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from exitserve.calibration.binning import bin_counts, bin_index, check_edges, make_edges
from exitserve.calibration.confidence import check_measure, confidence_from_probs, softmax, top2_margin
from exitserve.calibration.tables import conditional_counts, table_values
from exitserve.calibration.temperature import fit_temperature as fit_exit_temperature
from exitserve.calibration.threshold import margin_records

SCHEMA_VERSION = 1
DOCUMENT_KIND = "exitserve-calibration"
# 0.50, 0.51, ..., 0.99 and 1.00: every δ in (0.99, 1] maps to 1.00, below 0.50 to 0.50.
DEFAULT_DELTA_GRID: np.ndarray = np.round(np.linspace(0.50, 1.00, 51), 2)
CONDITIONAL_KINDS: dict[str, str] = {"pcee-cond": "accuracy", "pcee-ws-cond": "smoothed", "pcee-lb-cond": "lower"}


def check_grid(delta_grid: Sequence[float] | np.ndarray) -> np.ndarray:
    grid = np.asarray(delta_grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError("delta_grid must be a non-empty list of numbers")
    if np.any(~np.isfinite(grid)) or grid[0] <= 0.0 or grid[-1] > 1.0:
        raise ValueError("delta_grid values must lie in (0, 1]")
    if np.any(np.diff(grid) <= 0):
        raise ValueError("delta_grid must be strictly increasing")
    return grid


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


@dataclass(frozen=True)
class Observations:
    """Per-exit evidence the tables are counted from, one row per sample.

    confidence[k] / margin[k]: the exit's (temperature-scaled) confidence measure and top-2 margin,
    NaN where the sample was not observed at exit k; prediction[k]: its argmax, -1 where not
    observed. Validation data observes every sample at every exit; served traffic only at the exits
    a sample passed through (all of them for shadowed samples), so a deeper exit sees fewer samples.
    """

    confidence: list[np.ndarray]
    margin: list[np.ndarray]
    prediction: list[np.ndarray]

    def __post_init__(self) -> None:
        if not self.confidence or not (len(self.confidence) == len(self.margin) == len(self.prediction)):
            raise ValueError("observations need the same number (>= 1) of exits for confidence, margin and prediction")
        n = np.asarray(self.confidence[0]).shape
        for k, arrays in enumerate(zip(self.confidence, self.margin, self.prediction, strict=True)):
            if any(np.asarray(a).shape != n or np.asarray(a).ndim != 1 for a in arrays):
                raise ValueError(f"exit {k}: observations of shape other than {n}")

    @property
    def size(self) -> int:
        return int(np.asarray(self.confidence[0]).shape[0])

    def observed(self, k: int) -> np.ndarray:
        return np.isfinite(np.asarray(self.confidence[k], dtype=np.float64)) & (np.asarray(self.prediction[k]) >= 0)

    @staticmethod
    def concatenate(parts: Sequence[Observations]) -> Observations:
        exits = len(parts[0].confidence)
        if any(len(p.confidence) != exits for p in parts):
            raise ValueError("observations of different exit counts cannot be merged")
        return Observations(
            confidence=[np.concatenate([np.asarray(p.confidence[k], np.float64) for p in parts]) for k in range(exits)],
            margin=[np.concatenate([np.asarray(p.margin[k], np.float64) for p in parts]) for k in range(exits)],
            prediction=[np.concatenate([np.asarray(p.prediction[k], np.int64) for p in parts]) for k in range(exits)],
        )


def observe_logits(logits_per_exit: Sequence[np.ndarray], temperatures: Sequence[float], confidence: str) -> Observations:
    """Every exit observed for every sample: what validation logits give."""
    conf, margin, pred = [], [], []
    for z, temperature in zip(logits_per_exit, temperatures, strict=True):
        probs = softmax(z, temperature)
        conf.append(confidence_from_probs(probs, confidence))
        margin.append(top2_margin(probs))
        pred.append(np.asarray(z).argmax(axis=1).astype(np.int64))
    return Observations(conf, margin, pred)


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
) -> dict:
    arrays, labels = check_logits(logits_per_exit, labels)
    check_measure(confidence)
    grid = check_grid(delta_grid)
    _check_smoothing(window, alpha)
    temperatures = [
        fit_exit_temperature(z, labels) if (fit_temperature and labels is not None) else 1.0 for z in arrays
    ]
    observations = observe_logits(arrays, temperatures, confidence)
    edges = [check_edges(make_edges(conf, bins, binning)) for conf in observations.confidence]
    return tables_document(
        observations, labels, temperatures, edges, confidence=confidence, bins=bins, binning=binning,
        window=window, alpha=alpha, grid=grid, data_fingerprint=data_fingerprint,
    )


def refit_document(base: dict, observations: Observations, labels: np.ndarray, *, data_fingerprint: str) -> dict:
    """Rebuild every table of calibration document `base` from new labelled observations.

    The confidence measure, temperatures, bin edges, grid, window and alpha stay those of `base`:
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
    return tables_document(
        observations, labels.astype(np.int64), [float(e["temperature"]) for e in exits],
        [check_edges(np.asarray(e["edges"], dtype=np.float64)) for e in exits],
        confidence=base["confidence"], bins=int(base["bins"]), binning=base["binning"], window=int(base["window"]),
        alpha=float(base["alpha"]), grid=check_grid(base["delta_grid"]), data_fingerprint=data_fingerprint,
    )


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
    *,
    confidence: str,
    bins: int,
    binning: str,
    window: int,
    alpha: float,
    grid: np.ndarray,
    data_fingerprint: str,
) -> dict:
    """The calibration.json document for fixed temperatures and edges, counted from `observations`."""
    num_exits = len(observations.confidence)
    predictions = [np.asarray(p, dtype=np.int64) for p in observations.prediction]
    last_seen = observations.observed(num_exits - 1)
    # Without labels, correctness is agreement with the last exit (self-supervised).
    reference = labels if labels is not None else predictions[-1]
    exits, bins_per_exit, correct_per_exit, num_bins = [], [], [], []
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
            "accuracy": _nullable(table_values("accuracy", counts, hits)),
            "smoothed_accuracy": _nullable(table_values("smoothed", counts, hits, window=window)),
            "lower_bound": table_values("lower", counts, hits, alpha=alpha).tolist(),
            "per_exit_threshold": {"thresholds": thresholds.tolist(), "precision": precision.tolist()},
            "conditional": {},
            "agreement": {"counts": agree_counts.tolist(), "agree": agree_hits.tolist()},
        })
        bins_per_exit.append(b)
        correct_per_exit.append(correct)
        num_bins.append(m)

    for policy, kind in CONDITIONAL_KINDS.items():
        counts, hits = conditional_counts(kind, bins_per_exit, correct_per_exit, num_bins, grid, window=window, alpha=alpha)
        for k in range(num_exits):
            exits[k]["conditional"][policy] = _rows(counts[k], hits[k])

    return {
        "kind": DOCUMENT_KIND,
        "schema_version": SCHEMA_VERSION,
        "num_exits": num_exits,
        "confidence": confidence,
        "binning": binning,
        "bins": int(bins),
        "window": int(window),
        "alpha": float(alpha),
        "labels_known": labels is not None,
        "validation_size": observations.size,
        "data_fingerprint": str(data_fingerprint),
        "delta_grid": grid.tolist(),
        "exits": exits,
    }
