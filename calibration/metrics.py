"""Confidence quality metrics (numpy only): ECE, and AUROC / AURC of confidence as a failure predictor.

Conventions follow arXiv 2508.21495: a sample is a failure when the prediction is wrong; a good
confidence ranks correct samples above failures (AUROC near 1) and, used to abstain on the least
confident samples, keeps the risk low at every coverage (AURC near the optimum, lower is better).
Ties in confidence are handled exactly: AUROC counts a tie as one half, and AURC is the expected
value under a random order among tied samples.
"""

from __future__ import annotations

import math

import numpy as np

from exitserve.calibration.binning import bin_index, make_edges


def _inputs(confidences: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidences, dtype=np.float64)
    hits = np.asarray(correct, dtype=bool)
    if conf.shape != hits.shape or conf.ndim != 1:
        raise ValueError(f"confidences {conf.shape} and correct {hits.shape} must be equal 1-D shapes")
    return conf, hits


def ece(confidences: np.ndarray, correct: np.ndarray, bins: int = 15, edges: np.ndarray | None = None) -> float:
    """Expected calibration error: sum over bins of (bin share) * |accuracy - mean confidence|."""
    conf, hits = _inputs(confidences, correct)
    if conf.size == 0:
        return math.nan
    edges = make_edges(conf, bins) if edges is None else np.asarray(edges, dtype=np.float64)
    m = edges.size - 1
    b = bin_index(edges, conf)
    keep = b < m
    conf_sum = np.bincount(b[keep], weights=conf[keep], minlength=m)
    hit_sum = np.bincount(b[keep], weights=hits[keep].astype(np.float64), minlength=m)
    return float(np.abs(hit_sum - conf_sum).sum() / conf.size)


def auroc(confidences: np.ndarray, correct: np.ndarray) -> float:
    """P(confidence of a correct sample > that of a failure), ties counting 1/2; NaN if one class is absent."""
    conf, hits = _inputs(confidences, correct)
    positives, negatives = int(hits.sum()), int((~hits).sum())
    if positives == 0 or negatives == 0:
        return math.nan
    # Mann–Whitney U from mid-ranks (average rank within tied groups).
    order = np.argsort(conf, kind="stable")
    sorted_conf = conf[order]
    _, start, size = np.unique(sorted_conf, return_index=True, return_counts=True)
    mid_rank = start + (size + 1) / 2.0
    ranks = np.empty(conf.size)
    ranks[order] = np.repeat(mid_rank, size)
    u = ranks[hits].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def risk_coverage(confidences: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage k/n, expected risk among the k most confident) for k = 1..n, ties in random order."""
    conf, hits = _inputs(confidences, correct)
    n = conf.size
    if n == 0:
        return np.empty(0), np.empty(0)
    order = np.argsort(-conf, kind="stable")
    c, err = conf[order], (~hits[order]).astype(np.float64)
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    sizes = np.diff(np.r_[starts, n])
    group_errors = np.add.reduceat(err, starts)
    errors_before = np.r_[0.0, np.cumsum(group_errors)[:-1]]
    group = np.repeat(np.arange(starts.size), sizes)
    within = np.arange(n) - starts[group] + 1
    expected_errors = errors_before[group] + within * group_errors[group] / sizes[group]
    k = np.arange(1, n + 1)
    return k / n, expected_errors / k


def aurc(confidences: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve: mean risk over coverages 1/n, 2/n, ..., 1."""
    _, risk = risk_coverage(confidences, correct)
    return float(risk.mean()) if risk.size else math.nan
