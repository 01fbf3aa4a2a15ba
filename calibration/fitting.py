"""Fitting: validation logits (and labels) -> the calibration.json document.

`calibration.policies.fit_calibration` wraps this and loads the document through
`Calibration.from_dict`, so a fitted calibration and one read back from disk are the same object.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from calibration.binning import bin_counts, bin_index, check_edges, make_edges
from calibration.confidence import check_measure, confidence_from_probs, softmax, top2_margin
from calibration.tables import conditional_counts, table_values
from calibration.temperature import fit_temperature as fit_exit_temperature
from calibration.threshold import margin_records

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
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")

    num_exits = len(arrays)
    predictions = [z.argmax(axis=1) for z in arrays]
    # Without labels, correctness is agreement with the last exit (self-supervised).
    reference = labels if labels is not None else predictions[-1]
    exits, bins_per_exit, correct_per_exit, num_bins = [], [], [], []
    for k, z in enumerate(arrays):
        temperature = fit_exit_temperature(z, labels) if (fit_temperature and labels is not None) else 1.0
        probs = softmax(z, temperature)
        conf = confidence_from_probs(probs, confidence)
        correct = predictions[k] == reference
        edges = check_edges(make_edges(conf, bins, binning))
        b = bin_index(edges, conf)
        counts, hits = bin_counts(b, correct, edges.size - 1)
        thresholds, precision = margin_records(top2_margin(probs), correct)
        exits.append({
            "index": k,
            "temperature": float(temperature),
            "validation_accuracy": float(correct.mean()),
            "edges": edges.tolist(),
            "counts": counts.tolist(),
            "correct": hits.tolist(),
            "accuracy": _nullable(table_values("accuracy", counts, hits)),
            "smoothed_accuracy": _nullable(table_values("smoothed", counts, hits, window=window)),
            "lower_bound": table_values("lower", counts, hits, alpha=alpha).tolist(),
            "per_exit_threshold": {"thresholds": thresholds.tolist(), "precision": precision.tolist()},
            "conditional": {},
        })
        bins_per_exit.append(b)
        correct_per_exit.append(correct)
        num_bins.append(edges.size - 1)

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
        "validation_size": int(arrays[0].shape[0]),
        "data_fingerprint": str(data_fingerprint),
        "delta_grid": grid.tolist(),
        "exits": exits,
    }
