"""Temperature scaling: one scalar T per exit, fitted on validation logits by minimising the NLL.

The NLL is convex in beta = 1/T (a log-sum-exp of linear functions minus a linear one), so a
golden-section search over a bounded beta interval finds the global minimum without scipy.
"""

from __future__ import annotations

import numpy as np

from exitserve.calibration.confidence import log_softmax

T_MIN, T_MAX = 0.05, 20.0
_INV_PHI = (np.sqrt(5.0) - 1.0) / 2.0


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature)."""
    logp = log_softmax(logits, temperature)
    return float(-logp[np.arange(len(labels)), labels].mean())


def golden_section_min(f, lo: float, hi: float, tol: float = 1e-7, max_iter: int = 200) -> float:
    """Minimiser of a unimodal f on [lo, hi] (the better end point if the minimum is at a bound)."""
    a, b = lo, hi
    c, d = b - _INV_PHI * (b - a), a + _INV_PHI * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(max_iter):
        if b - a <= tol * max(1.0, abs(a) + abs(b)):
            break
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _INV_PHI * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _INV_PHI * (b - a)
            fd = f(d)
    best = (a + b) / 2.0
    return min((lo, hi, best), key=f)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, t_min: float = T_MIN, t_max: float = T_MAX) -> float:
    """The temperature in [t_min, t_max] minimising the validation NLL."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return 1.0
    beta = golden_section_min(lambda b: nll(logits, labels, 1.0 / b), 1.0 / t_max, 1.0 / t_min)
    return float(1.0 / beta)
