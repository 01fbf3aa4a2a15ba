"""Reliability tables: the per-bin values the PCEE policies compare with δ.

Three kinds of table value, all computed from per-bin counts and correct counts along the last
axis (so one call handles a single exit's [M] table or a conditional [G, M] stack):

- "accuracy": correct / count (`pcee`);
- "smoothed": pooled accuracy over bins b-H..b+H, i.e. count-weighted (`pcee-ws`);
- "lower":    one-sided Clopper–Pearson lower bound at level 1 - alpha (`pcee-lb`).

The unbounded kinds take an optional Beta prior (pseudo-counts) against one-sample bins.
An empty bin has no evidence: accuracy and smoothed are -inf there and the lower bound is 0, so
for any δ in (0, 1] it never lets a sample exit.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from exitserve.calibration.bounds import clopper_pearson_lower

TABLE_KINDS: tuple[str, ...] = ("accuracy", "smoothed", "lower")
EMPTY = -np.inf


def window_sums(values: np.ndarray, window: int) -> np.ndarray:
    """Sum over bins b-window..b+window (clipped at the ends) along the last axis."""
    if window <= 0:
        return values.astype(np.float64)
    m = values.shape[-1]
    zero = np.zeros(values.shape[:-1] + (1,))
    csum = np.concatenate([zero, np.cumsum(values, axis=-1, dtype=np.float64)], axis=-1)
    b = np.arange(m)
    hi = np.minimum(b + window + 1, m)
    lo = np.maximum(b - window, 0)
    return csum[..., hi] - csum[..., lo]


def table_values(
    kind: str, counts: np.ndarray, correct: np.ndarray, *, window: int = 1, alpha: float = 0.05,
    prior: tuple[float, float] = (0.0, 0.0), design_effect: float = 1.0,
) -> np.ndarray:
    """Table values along the last axis. `prior` (a, b): Beta pseudo-counts of correct and wrong
    samples added to every bin of the unbounded tables (posterior mean), so that a bin of one
    lucky sample says (1 + a) / (1 + a + b), not 1.0; (0, 0) is the plain accuracy."""
    counts = np.asarray(counts, dtype=np.int64)
    correct = np.asarray(correct, dtype=np.int64)
    empty = counts == 0
    if kind == "lower":
        return clopper_pearson_lower(correct, counts, alpha, design_effect)
    if kind == "accuracy":
        num, den = correct.astype(np.float64), counts.astype(np.float64)
    elif kind == "smoothed":
        num, den = window_sums(correct, window), window_sums(counts, window)
    else:
        raise ValueError(f"unknown table kind {kind!r}; choose from {', '.join(TABLE_KINDS)}")
    a, b = prior
    with np.errstate(divide="ignore", invalid="ignore"):
        values = (num + a) / (den + a + b)
    return np.where(empty, EMPTY, values)


def exit_allowed(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """For conditional tables [G, M]: may a sample in bin b leave at this exit under grid δ_g?

    Bin b passes at δ_g when its table value reaches δ_g. Passing is then made monotone in δ: a
    bin may let samples leave at δ_g only if it also passes at every smaller grid δ. Without this,
    a table built on a larger reach set (higher δ) could let a sample leave *earlier* for a higher
    target. It only removes exits, so every exit still has table value >= δ_g. Rows whose reach
    set was empty should borrow a table first (`borrow_empty_rows`), or they shut the exit above.
    """
    passes = values >= grid[:, None]
    return np.logical_and.accumulate(passes, axis=0)


def borrow_empty_rows(counts: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Conditional rows [G, M] whose reach set is empty take the nearest non-empty row at a higher δ.

    No validation sample reached this exit under such a δ, but a new sample can, and it needs a
    table. Borrowing from above keeps the monotonicity of `exit_allowed` without shutting the exit:
    the borrowed values pass wherever their own row passes (its δ is higher), so the accumulate
    never blocks a higher δ on a row without evidence, and raising δ still never moves a sample
    to an earlier exit. (Ignoring empty rows instead let a sample leave earlier at a higher δ.)
    Empty rows with no non-empty row above stay empty and let nobody leave.
    """
    counts, correct = np.array(counts, dtype=np.int64), np.array(correct, dtype=np.int64)
    source = len(counts)
    for g in range(len(counts) - 1, -1, -1):
        if counts[g].sum() > 0:
            source = g
        elif source < len(counts):
            counts[g], correct[g] = counts[source], correct[source]
    return counts, correct


def conditional_counts(
    allowed: Callable[[np.ndarray, np.ndarray], np.ndarray],
    bins_per_exit: list[np.ndarray],
    correct_per_exit: list[np.ndarray],
    num_bins: list[int],
    grid: np.ndarray,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per exit, [G, M] counts and correct counts over the samples that reach it under each grid δ.

    The samples reaching exit l under δ_g are those that did not leave at an earlier exit under
    the conditional rule itself (`allowed(counts, correct)` -> [G, M]: may bin b leave at δ_g,
    from that exit's tables, see `exit_allowed`). All grid
    values are simulated at once: one pass over exits, vectorised over (δ_g, sample).
    """
    g, n = grid.size, bins_per_exit[0].size
    alive = np.ones((g, n), dtype=bool)
    rows = np.repeat(np.arange(g), n).reshape(g, n)
    counts_out, correct_out = [], []
    last = len(bins_per_exit) - 1
    for exit_index, (bins, correct, m) in enumerate(zip(bins_per_exit, correct_per_exit, num_bins, strict=True)):
        valid = alive & (bins < m)[None, :]  # NaN-sentinel samples never count
        flat = rows[valid] * m + np.broadcast_to(bins, (g, n))[valid]
        hits = np.broadcast_to(np.asarray(correct, dtype=np.float64), (g, n))[valid]
        counts = np.bincount(flat, minlength=g * m).reshape(g, m).astype(np.int64)
        corr = np.rint(np.bincount(flat, weights=hits, minlength=g * m)).reshape(g, m).astype(np.int64)
        counts_out.append(counts)
        correct_out.append(corr)
        if exit_index < last:
            padded = np.concatenate([allowed(counts, corr), np.zeros((g, 1), dtype=bool)], axis=1)  # sentinel column
            leaves = alive & padded[rows, np.broadcast_to(bins, (g, n))]
            alive &= ~leaves
    return counts_out, correct_out
