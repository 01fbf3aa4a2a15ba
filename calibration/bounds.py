"""One-sided Clopper–Pearson lower bounds in pure numpy (scipy is not available at serving time).

The lower bound at level 1 - alpha for k successes in n trials is the alpha quantile of
Beta(k, n - k + 1). The quantile is found by safeguarded Newton iteration on the regularised
incomplete beta function, which is evaluated with Lentz's continued fraction (Numerical Recipes'
betacf) and the usual symmetry switch.
"""

from __future__ import annotations

import math

import numpy as np

_lgamma = np.vectorize(math.lgamma, otypes=[np.float64])
_TINY = 1e-300
_EPS = 1e-15


def _log_beta(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _lgamma(a) + _lgamma(b) - _lgamma(a + b)


def _betacf(a: np.ndarray, b: np.ndarray, x: np.ndarray, max_iter: int = 100_000) -> np.ndarray:
    """Continued fraction of I_x(a, b), vectorised; converges fast for x < (a + 1) / (a + b + 2).

    Elements leave the loop as they converge, so a few slow ones do not make every element iterate.
    """
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = 1.0 / np.where(np.abs(d) < _TINY, _TINY, d)
    h = d.copy()
    out = h.copy()
    live = np.arange(x.size)
    for m in range(1, max_iter + 1):
        a_, b_, x_, qab_, qap_, qam_ = a[live], b[live], x[live], qab[live], qap[live], qam[live]
        m2 = 2.0 * m
        aa = m * (b_ - m) * x_ / ((qam_ + m2) * (a_ + m2))
        d = 1.0 + aa * d
        d = 1.0 / np.where(np.abs(d) < _TINY, _TINY, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < _TINY, _TINY, c)
        h *= d * c
        aa = -(a_ + m) * (qab_ + m) * x_ / ((a_ + m2) * (qap_ + m2))
        d = 1.0 + aa * d
        d = 1.0 / np.where(np.abs(d) < _TINY, _TINY, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < _TINY, _TINY, c)
        step = d * c
        h *= step
        converged = np.abs(step - 1.0) < _EPS
        if converged.any():
            out[live[converged]] = h[converged]
            keep = ~converged
            live, c, d, h = live[keep], c[keep], d[keep], h[keep]
            if live.size == 0:
                return out
    out[live] = h
    return out


def betainc(a, b, x, log_beta: np.ndarray | None = None) -> np.ndarray:
    """Regularised incomplete beta I_x(a, b) for a, b > 0 and x in [0, 1], elementwise."""
    a, b, x = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (a, b, x)))
    lb = _log_beta(a, b) if log_beta is None else log_beta
    out = np.where(x >= 1.0, 1.0, 0.0)
    inner = (x > 0.0) & (x < 1.0)
    if not inner.any():
        return out
    a_, b_, x_, lb_ = a[inner], b[inner], x[inner], np.broadcast_to(lb, a.shape)[inner]
    log_front = a_ * np.log(x_) + b_ * np.log1p(-x_) - lb_
    direct = x_ < (a_ + 1.0) / (a_ + b_ + 2.0)
    # Evaluate each element on the side where the continued fraction converges.
    aa, bb, xx = np.where(direct, a_, b_), np.where(direct, b_, a_), np.where(direct, x_, 1.0 - x_)
    frac = np.exp(log_front) * _betacf(aa, bb, xx) / aa
    out[inner] = np.where(direct, frac, 1.0 - frac)
    return out


def _normal_quantile(p: float) -> float:
    """Φ^-1(p) for a scalar p in (0, 1), by bisection on math.erfc (only a starting point needs it)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(-mid / math.sqrt(2.0)) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def beta_ppf(q, a, b, tol: float = 1e-14, max_iter: int = 200, start: np.ndarray | None = None) -> np.ndarray:
    """Quantile x with I_x(a, b) = q, elementwise, for q in (0, 1) and a, b > 0.

    `start` (optional, same shape) is a first guess; a close one saves most of the iterations.
    """
    q, a, b = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (q, a, b)))
    q, a, b = q.ravel(), a.ravel(), b.ravel()
    lb = _log_beta(a, b)
    lo, hi = np.zeros_like(q), np.ones_like(q)
    guess = a / (a + b) if start is None else np.asarray(start, dtype=np.float64).ravel()  # default: the mean
    x = np.clip(guess, 1e-12, 1.0 - 1e-12)
    active = np.ones(q.shape, dtype=bool)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        xa, aa, ba = x[idx], a[idx], b[idx]
        f = betainc(aa, ba, xa, lb[idx]) - q[idx]
        below = f < 0
        lo[idx] = np.where(below, xa, lo[idx])
        hi[idx] = np.where(below, hi[idx], xa)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            pdf = np.exp((aa - 1.0) * np.log(xa) + (ba - 1.0) * np.log1p(-xa) - lb[idx])
            newton = xa - f / pdf
        # Newton step when it stays inside the bracket; otherwise halfway from x towards the bracket
        # end it overshot (not the bracket's midpoint, which would throw a good start away).
        ok = np.isfinite(newton) & (newton > lo[idx]) & (newton < hi[idx])
        towards = np.where(np.isfinite(newton), np.clip(newton, lo[idx], hi[idx]), 0.5 * (lo[idx] + hi[idx]))
        new = np.where(ok, newton, 0.5 * (xa + towards))
        done = (np.abs(new - xa) <= tol * np.maximum(xa, 1e-300)) | (hi[idx] - lo[idx] <= tol) | (f == 0)
        x[idx] = np.where(f == 0, xa, new)
        active[idx[done]] = False
    return x.reshape(np.broadcast_shapes(q.shape))


def check_design_effect(design_effect: float) -> None:
    if not (math.isfinite(design_effect) and design_effect >= 1.0):
        raise ValueError(f"design_effect must be a finite number >= 1, got {design_effect}")


def design_effect(correct_per_exit: list[np.ndarray], groups: np.ndarray) -> float:
    """Kish's design effect of each exit's success rate when samples come in clusters (`groups`, one
    id per sample): the cluster-robust variance of the rate over the binomial one; the largest over
    the exits, and at least 1. An exit right (or wrong) everywhere says nothing and is skipped."""
    _, cluster = np.unique(np.asarray(groups), return_inverse=True)
    count = int(cluster.max()) + 1 if cluster.size else 0
    rates = [np.asarray(correct, dtype=np.float64) for correct in correct_per_exit]
    for y in rates:
        if y.shape != cluster.shape:
            raise ValueError(f"groups: {cluster.size} ids for {y.size} samples")
    worst = 1.0
    if count < 2:
        return worst
    for y in rates:
        p = float(y.mean())
        if p <= 0.0 or p >= 1.0:
            continue
        residual = np.bincount(cluster, weights=y - p, minlength=count)
        clustered = count / (count - 1) * float(np.square(residual).sum()) / y.size**2
        worst = max(worst, clustered / (p * (1.0 - p) / y.size))
    return worst


def clopper_pearson_lower(correct, count, alpha: float = 0.05, design_effect: float = 1.0) -> np.ndarray:
    """One-sided (1 - alpha) Clopper–Pearson lower bound on the success rate, elementwise.

    0 for an empty bin (no evidence) and for k = 0; alpha ** (1 / n) in closed form for k = n.
    Unique (k, n) pairs are solved once, since tables repeat them a lot. `design_effect` (>= 1)
    divides both counts: samples that come in correlated clusters (the tokens of one answer) carry
    the evidence of fewer independent ones (Kish's effective sample size).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    check_design_effect(design_effect)
    k_int, n_int = np.broadcast_arrays(np.asarray(correct, dtype=np.int64), np.asarray(count, dtype=np.int64))
    # effective counts; whole numbers (as before) when the samples are independent
    k, n = k_int / design_effect, n_int / design_effect
    if np.any(k < 0) or np.any(k > n):
        raise ValueError("need 0 <= correct <= count in every bin")
    out = np.zeros(k.shape, dtype=np.float64)
    full = (n > 0) & (k == n)
    out[full] = alpha ** (1.0 / n[full])
    mid = (k > 0) & (k < n)
    if mid.any():
        pairs, inverse = np.unique(np.stack([k[mid], n[mid]], axis=1), axis=0, return_inverse=True)
        kk, nn = pairs[:, 0].astype(np.float64), pairs[:, 1].astype(np.float64)
        # Start Newton at the Wilson score bound, close to the exact one: a few steps instead of dozens.
        z = _normal_quantile(1.0 - alpha)
        p = kk / nn
        wilson = (p + z * z / (2 * nn) - z * np.sqrt(p * (1 - p) / nn + z * z / (4 * nn * nn))) / (1 + z * z / nn)
        bounds = beta_ppf(alpha, kk, nn - kk + 1, tol=1e-12, start=wilson)
        out[mid] = bounds[inverse.ravel()]
    return out
