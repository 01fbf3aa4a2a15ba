"""Per-exit margin thresholds (the seed method of arXiv 2407.21082), answerable for any ε.

For a target precision ε the method picks, per exit, the smallest margin t such that the
calibration samples with margin >= t agree with the reference (the label, or the last exit's
prediction without labels) at a rate >= ε. Because ε (our δ) varies per request, we store the
candidates instead of one threshold: the sorted distinct margins u_1 < ... < u_J with the
precision p_j of {margin >= u_j}. The smallest j with p_j >= ε is the first j whose running
maximum of p reaches ε, so only the "record" candidates (p_j above every p_i, i < j) are needed,
and their precisions are strictly increasing: one searchsorted answers a whole batch of ε.
"""

from __future__ import annotations

import numpy as np


def margin_records(margins: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds, precision) of the record candidates, both ascending."""
    margins = np.asarray(margins, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    keep = np.isfinite(margins)
    margins, correct = margins[keep], correct[keep]
    if margins.size == 0:
        return np.empty(0), np.empty(0)
    order = np.argsort(margins, kind="stable")
    m, c = margins[order], correct[order]
    # Samples with margin >= m[i] are exactly the suffix i.. of the ascending sort.
    hits_from = np.cumsum(c[::-1])[::-1]
    values, first = np.unique(m, return_index=True)
    precision = hits_from[first] / (m.size - first)
    running = np.maximum.accumulate(precision)
    record = np.ones(values.size, dtype=bool)
    record[1:] = precision[1:] > running[:-1]
    return values[record], precision[record]


def choose_thresholds(records_precision: np.ndarray, epsilons: np.ndarray) -> np.ndarray:
    """Index of the chosen record for each ε; len(records) where no threshold reaches ε."""
    return np.searchsorted(records_precision, epsilons, side="left")
