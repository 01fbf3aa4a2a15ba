"""Guarded tail tables: the confidence threshold rule of `pcee-lb-tail` and every baseline's promise.

Per-bin tables cannot promise a high δ: a bin holds few samples, so its lower bound stays far below
its accuracy, and fifteen equal-width bins lump the whole top of the confidence range together. A
*tail* — the samples whose confidence is at least a threshold — holds many samples, so its
Clopper–Pearson bound is tight. The rule (per exit and grid δ, on the samples that reach the exit):

    candidate thresholds are the fine bin edges, tested from the top down (fixed-sequence testing:
    the order is fixed before the labels are looked at, so no multiplicity correction is needed);
    the first candidate is the highest edge whose tail holds enough samples to pass at all
    (alpha ** (1 / n) >= δ, a label-free choice); the test of edge e passes when the one-sided
    (1 - alpha) Clopper–Pearson lower bound of the tail {confidence >= e} reaches δ; testing stops
    at the first failure. Samples at or above the lowest passing edge leave.

As a table: value[g, b] = min of the tail bounds over the tested edges from bin b up to the first
candidate (bins above the first candidate take its bound); `value >= δ_g` exactly for the bins at
or above the lowest passing edge, so the existing table machinery (`exit_allowed`, conditional
reach sets, a request's δ against the grid δ's table) applies unchanged, and the value is the
estimate a sample is answered with: a guarded lower bound on the accuracy of the samples at least
as confident as it is.

No monotone-in-δ constraint. The per-bin conditional policies let a bin pass at δ only if it also
passes at every smaller δ (`tables.exit_allowed`). For tails that costs too much: at small δ
almost every sample leaves at exit 0, the few that reach exit 1 are the hardest, their test fails,
and the constraint then shuts exit 1 for every larger δ. Measured on the default bundle's test set
(200 fine bins; coverage at δ 0.90 / 0.95 / 0.99, compute at 0.95): constrained by every smaller δ with a reach
set 0.826 / 0.682 / 0.319 (0.766); only by smaller δ at which the exit is open at all
0.668 / 0.599 / 0.454 (0.704); unconstrained 0.810 / 0.655 / 0.454 (0.679). Each grid δ's
thresholds come from its own test on its own reach sets, which is all the guarantee needs; the
price is that a larger δ may now and then let a sample leave one exit earlier than a smaller δ.
"""

from __future__ import annotations

import math

import numpy as np

from exitserve.calibration.bounds import clopper_pearson_lower
from exitserve.calibration.tables import window_sums

DEFAULT_TAIL_BINS = 100  # 200 measured the same coverage (BENCHMARKS.md §2) at 1.6x the file size


def minimum_tail(delta: np.ndarray, alpha: float) -> np.ndarray:
    """Fewest samples whose all-correct Clopper–Pearson bound reaches δ (alpha ** (1/n) >= δ); inf for δ = 1."""
    delta = np.asarray(delta, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(delta >= 1.0, np.inf, np.ceil(math.log(alpha) / np.log(np.minimum(delta, 1.0 - 1e-16))))


def tail_values(counts: np.ndarray, correct: np.ndarray, grid: np.ndarray, alpha: float,
                design_effect: float = 1.0) -> np.ndarray:
    """Fixed-sequence guarded tail values [G, M] from per-bin counts and correct counts [G, M] (or [M]);
    `design_effect` as in `bounds.clopper_pearson_lower` (the tail sizes tested count effective samples)."""
    counts = np.atleast_2d(np.asarray(counts, dtype=np.int64))
    correct = np.atleast_2d(np.asarray(correct, dtype=np.int64))
    grid = np.asarray(grid, dtype=np.float64)
    counts, correct = np.broadcast_to(counts, (grid.size, counts.shape[-1])), np.broadcast_to(correct, (grid.size, counts.shape[-1]))
    tail_n = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]
    tail_k = np.cumsum(correct[:, ::-1], axis=1)[:, ::-1]
    bound = clopper_pearson_lower(tail_k, tail_n, alpha, design_effect)
    tested = tail_n >= design_effect * minimum_tail(grid, alpha)[:, None]  # a prefix of the bins: tail_n falls with b
    running = np.minimum.accumulate(np.where(tested, bound, np.inf)[:, ::-1], axis=1)[:, ::-1]
    # Bins above the first candidate leave with it: they take its value.
    first = tested.sum(axis=1) - 1  # index of the first (highest) tested edge, -1 when none
    at_first = np.where(first >= 0, running[np.arange(grid.size), np.maximum(first, 0)], 0.0)
    return np.where(tested, running, at_first[:, None])


def bin_estimates(counts: np.ndarray, correct: np.ndarray, window: int, prior: tuple[float, float]) -> np.ndarray:
    """A sample's own estimate: accuracy of its fine bin pooled over ±window bins, under the Beta prior.

    The tail value is a promise about a set, too high for the samples near its threshold; this is
    calibrated per sample (0 where the pooled bins hold no evidence and the prior none either).
    """
    a, b = prior
    num = window_sums(np.asarray(correct, dtype=np.float64), window) + a
    den = window_sums(np.asarray(counts, dtype=np.float64), window) + a + b
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
