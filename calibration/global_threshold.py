"""`pcee-lb-global`: one confidence threshold for every exit, chosen with a Clopper–Pearson guard.

A sample leaves at the first exit whose (temperature-scaled) confidence reaches the threshold t; the
last exit answers the rest. The promise covers every answer given with confidence >= t, whichever
exit gave it, so it is judged on all of them pooled: a set many times larger than one exit's tail
(`pcee-lb-tail`), whose bound is therefore tighter, which buys coverage at the same δ.

Per grid δ, fixed-sequence testing as in `tails`: candidate thresholds are equal-mass quantiles of the
calibration confidences of every exit, tested from the top down (the order is fixed before labels
are looked at); the first candidate is the highest whose answer set is large enough to pass at all;
testing stops at the first candidate whose pooled answers' one-sided (1 - alpha) lower bound falls
below δ. The answer sets grow as t falls (a sample answered with confidence >= t is answered so at
every lower t too, possibly at an earlier exit), so the first failure ends the search.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from exitserve.calibration.bounds import clopper_pearson_lower
from exitserve.calibration.tails import minimum_tail

DEFAULT_CANDIDATES = 400


def candidate_thresholds(confidences: Sequence[np.ndarray], candidates: int = DEFAULT_CANDIDATES) -> np.ndarray:
    """Equal-mass quantiles of every exit's observed confidences, distinct, from the top down."""
    pooled = np.concatenate([np.asarray(c, dtype=np.float64) for c in confidences])
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size == 0:
        return np.zeros(0)
    return np.unique(np.quantile(pooled, np.linspace(0.0, 1.0, candidates + 1)))[::-1]


def pooled_answers(confidences: Sequence[np.ndarray], correct: Sequence[np.ndarray], thresholds: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """For each threshold: how many samples are answered with confidence >= it, and how many of those rightly.

    confidences[k], correct[k]: [n] per exit, NaN confidence where a sample was not observed there
    (it left earlier when the observations were served traffic); such a sample counts only where its
    answer is known."""
    conf = np.stack([np.asarray(c, dtype=np.float64) for c in confidences])  # [K, n]
    hits = np.stack([np.asarray(c, dtype=bool) for c in correct])
    counts = np.zeros(thresholds.size, np.int64)
    right = np.zeros(thresholds.size, np.int64)
    for i, t in enumerate(thresholds):
        reaches = conf >= t  # NaN compares False: unobserved exits never answer
        answered = reaches.any(axis=0)
        first = np.argmax(reaches, axis=0)
        counts[i] = int(answered.sum())
        right[i] = int(hits[first, np.arange(conf.shape[1])][answered].sum())
    return counts, right


def fit_global_threshold(confidences: Sequence[np.ndarray], correct: Sequence[np.ndarray], grid: np.ndarray,
                         alpha: float, candidates: int = DEFAULT_CANDIDATES, design_effect: float = 1.0,
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([G] thresholds, NaN where none passes; [G] counts and [G] correct counts of the answers behind each)."""
    thresholds = candidate_thresholds(confidences, candidates)
    counts, right = pooled_answers(confidences, correct, thresholds)
    bounds = clopper_pearson_lower(right, counts, alpha, design_effect)
    need = design_effect * minimum_tail(grid, alpha)
    chosen = np.full(grid.size, np.nan)
    chosen_counts = np.zeros(grid.size, np.int64)
    chosen_right = np.zeros(grid.size, np.int64)
    for g, delta in enumerate(grid):
        for i in np.flatnonzero(counts >= need[g]):  # candidates top-down, from the first able to pass
            if bounds[i] < delta:
                break
            chosen[g], chosen_counts[g], chosen_right[g] = thresholds[i], counts[i], right[i]
    return chosen, chosen_counts, chosen_right
