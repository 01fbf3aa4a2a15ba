"""Confidence bins: edges 0 = e_0 < ... < e_M = 1, bin b = [e_b, e_{b+1}), 1.0 in the last bin."""

from __future__ import annotations

import numpy as np

BINNINGS: tuple[str, ...] = ("equal-width", "equal-mass")


def make_edges(confidences: np.ndarray, bins: int = 15, binning: str = "equal-width") -> np.ndarray:
    """Bin edges for one exit. Equal-mass edges are quantiles of `confidences`, deduplicated."""
    if bins < 1:
        raise ValueError(f"need at least one bin, got {bins}")
    if binning == "equal-width":
        return np.linspace(0.0, 1.0, bins + 1)
    if binning == "equal-mass":
        conf = np.asarray(confidences, dtype=np.float64)
        conf = conf[np.isfinite(conf)]
        inner = np.quantile(conf, np.arange(1, bins) / bins) if conf.size else np.empty(0)
        # Quantiles may repeat (saturated confidences) or hit 0/1: keep strictly inside (0, 1).
        inner = np.unique(inner[(inner > 0.0) & (inner < 1.0)])
        return np.concatenate([[0.0], inner, [1.0]])
    raise ValueError(f"unknown binning {binning!r}; choose from {', '.join(BINNINGS)}")


def check_edges(edges: np.ndarray) -> np.ndarray:
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2:
        raise ValueError("bin edges need at least two values")
    if edges[0] != 0.0 or edges[-1] != 1.0:
        raise ValueError(f"bin edges must start at 0 and end at 1, got {edges[0]} .. {edges[-1]}")
    if np.any(np.diff(edges) <= 0):
        raise ValueError("bin edges must be strictly increasing")
    return edges


def bin_index(edges: np.ndarray, confidences: np.ndarray) -> np.ndarray:
    """Bin of each confidence: b with e_b <= c < e_{b+1}; c >= 1 goes to the last bin M - 1.

    A NaN confidence gets index M, one past the last bin: tables carry a sentinel there that
    never lets a sample exit.
    """
    conf = np.asarray(confidences, dtype=np.float64)
    last = edges.size - 2
    idx = np.searchsorted(edges, conf, side="right") - 1
    idx[conf >= 1.0] = last  # 1.0 (and any float overshoot) belongs to the last bin
    np.maximum(idx, 0, out=idx)  # negative rounding noise belongs to the first bin
    return idx


def bin_counts(bins_of_samples: np.ndarray, correct: np.ndarray, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Per bin: number of samples and number of correct samples (NaN-sentinel samples dropped)."""
    keep = bins_of_samples < num_bins
    b = bins_of_samples[keep]
    counts = np.bincount(b, minlength=num_bins).astype(np.int64)
    hits = np.bincount(b, weights=np.asarray(correct, dtype=np.float64)[keep], minlength=num_bins)
    return counts, np.rint(hits).astype(np.int64)
