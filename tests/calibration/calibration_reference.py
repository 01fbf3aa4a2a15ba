"""Test helpers: random multi-exit problems (a hypothesis strategy) and a naive per-sample reference rule.

The reference reads only the calibration.json document and decides one sample at a time with
plain Python (bins by linear scan, tables from counts, scipy for the Clopper–Pearson bound), so it
shares nothing with the vectorised implementation except the confidence values themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from hypothesis import strategies as st
from scipy import stats

from exitserve.calibration.confidence import confidence_from_probs, softmax, top2_margin


@dataclass
class Problem:
    logits: list[np.ndarray]
    labels: np.ndarray | None
    fit_kwargs: dict


def make_logits(
    rng: np.random.Generator, n: int, classes: int, exits: int, discrete: bool, strength: float = 1.0
) -> tuple[list[np.ndarray], np.ndarray]:
    """Exits that get better with depth; integer logits give many exact ties and edge confidences."""
    labels = rng.integers(0, classes, n)
    logits = []
    for k in range(exits):
        if discrete:
            z = rng.integers(-2, 3, size=(n, classes)).astype(np.float64)
            z[np.arange(n), labels] += rng.integers(0, 2 + k, size=n)
        else:
            z = rng.normal(size=(n, classes)) * rng.uniform(0.5, 3.0)
            z[np.arange(n), labels] += strength * rng.uniform(0.0, 1.5) * (k + 1) * rng.random(n)
        logits.append(z.astype(np.float32))
    return logits, labels


@st.composite
def problems(draw, max_n: int = 60, max_exits: int = 4) -> Problem:
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(1, max_n))
    exits = draw(st.integers(1, max_exits))
    classes = draw(st.integers(2, 5))
    rng = np.random.default_rng(seed)
    logits, labels = make_logits(rng, n, classes, exits, discrete=draw(st.booleans()))
    small_grid = draw(st.booleans())
    fit_kwargs = {
        "confidence": draw(st.sampled_from(["max-softmax", "entropy", "margin"])),
        "bins": draw(st.sampled_from([1, 2, 4, 7, 15])),
        "binning": draw(st.sampled_from(["equal-width", "equal-mass"])),
        "window": draw(st.integers(0, 2)),
        "alpha": draw(st.sampled_from([0.01, 0.05, 0.2])),
        "fit_temperature": draw(st.booleans()),
    }
    if small_grid:
        fit_kwargs["delta_grid"] = sorted(set(np.round(rng.uniform(0.3, 1.0, 4), 2).tolist()))
    return Problem(logits, labels if draw(st.booleans()) else None, fit_kwargs)


# --- naive reference ----------------------------------------------------------------------------


def _bin(edges: list[float], conf: float) -> int:
    if conf >= 1.0:
        return len(edges) - 2
    for b in range(len(edges) - 1):
        if edges[b] <= conf < edges[b + 1]:
            return b
    raise AssertionError(f"confidence {conf} outside the edges")


@cache
def _scipy_lower(k: int, n: int, alpha: float) -> float:
    return 0.0 if k == 0 else float(stats.beta.ppf(alpha, k, n - k + 1))


def _value(kind: str, counts: list[int], correct: list[int], b: int, window: int, alpha: float,
           prior: tuple[float, float] = (0.0, 0.0)) -> float:
    n, k = counts[b], correct[b]
    if kind == "lower":
        return _scipy_lower(k, n, alpha)
    if n == 0:
        return -math.inf
    pa, pb = prior
    if kind == "accuracy":
        return (k + pa) / (n + pa + pb)
    lo, hi = max(0, b - window), min(len(counts), b + window + 1)
    return (sum(correct[lo:hi]) + pa) / (sum(counts[lo:hi]) + pa + pb)


def _tail_value(counts: list[int], correct: list[int], b: int, delta: float, alpha: float) -> float:
    """Fixed-sequence tail test, one edge at a time: the smallest bound from the first tested edge down to b."""
    fewest = math.inf if delta >= 1.0 else next(n for n in range(1, 10**7) if alpha ** (1.0 / n) >= delta)
    tested = [j for j in range(len(counts)) if sum(counts[j:]) >= fewest]
    if not tested:
        return 0.0
    first = max(tested)
    bounds = [_scipy_lower(sum(correct[j:]), sum(counts[j:]), alpha) for j in range(min(b, first), first + 1)]
    return min(bounds)


_KIND = {"pcee": "accuracy", "pcee-ws": "smoothed", "pcee-lb": "lower"}
_BASELINES = ("confidence", "per-exit-threshold", "full")


def reference_decide(doc: dict, policy: str, logits: list[np.ndarray], deltas: np.ndarray) -> list[tuple[int, int, float, bool]]:
    """(exit, prediction, estimate, target_met) per sample, one sample at a time (schema 3 documents).

    Every rule decides at the grid δ a request maps to (nearest at or above; never below the request's
    own δ); every promise is the policy's guard on its own leavers reaching the request's δ."""
    num_exits, grid = doc["num_exits"], doc["delta_grid"]
    window, alpha, prior = doc["window"], doc["alpha"], tuple(doc["prior"])
    out = []
    for i, request_delta in enumerate(deltas):
        request_delta = float(request_delta)
        g = next((j for j, v in enumerate(grid) if v >= request_delta - 1e-9), len(grid) - 1)
        delta = max(grid[g], request_delta)  # what the rule decides at
        for k in range(num_exits):
            ex = doc["exits"][k]
            probs = softmax(logits[k][i : i + 1], ex["temperature"])
            conf = float(confidence_from_probs(probs, doc["confidence"])[0])
            b = _bin(ex["edges"], conf)
            last = k == num_exits - 1
            base = policy.removesuffix("-cond")

            def tail_value(name, gi=g, ex=ex, conf=conf):
                rows = ex["tail"][name]
                row = rows["grid_rows"][gi]
                return _tail_value(rows["counts"][row], rows["correct"][row], _bin(ex["tail"]["edges"], conf), grid[gi], alpha)

            def bin_estimate(name, gi=g, ex=ex, conf=conf):
                rows = ex["tail"][name]
                row = rows["grid_rows"][gi]
                tb = _bin(ex["tail"]["edges"], conf)
                lo, hi = max(0, tb - window), min(len(rows["counts"][row]), tb + window + 1)
                n, k = sum(rows["counts"][row][lo:hi]), sum(rows["correct"][row][lo:hi])
                return (k + prior[0]) / (n + prior[0] + prior[1]) if n + prior[0] + prior[1] > 0 else 0.0

            if policy in _KIND:
                value = _value(_KIND[policy], ex["counts"], ex["correct"], b, window, alpha, prior)
                leave = value >= delta
            elif policy.endswith("-cond"):
                cond = ex["conditional"][policy]

                def reached(gi, cond=cond):
                    return sum(cond["counts"][cond["grid_rows"][gi]]) > 0

                def source(gi):
                    # a grid δ nobody reached borrows the nearest reached row above it
                    return next((j for j in range(gi, len(grid)) if reached(j)), gi)

                def cond_value(gi, cond=cond, b=b, base=base):
                    row = cond["grid_rows"][source(gi)]
                    return _value(_KIND[base], cond["counts"][row], cond["correct"][row], b, window, alpha, prior)

                value = cond_value(g)
                # monotone in δ: every smaller grid δ must pass too
                leave = all(cond_value(j) >= grid[j] for j in range(g + 1))
                leave = leave and value >= delta
            elif policy == "pcee-lb-tail":
                value = tail_value(policy)
                leave = value >= grid[g] and value >= delta
            elif policy == "confidence":
                value, leave = 0.0, conf >= delta
            elif policy == "per-exit-threshold":
                value = 0.0
                pet = ex["per_exit_threshold"]
                chosen = [j for j, p in enumerate(pet["precision"]) if p >= delta]
                margin = float(top2_margin(probs)[0])
                leave = bool(chosen) and margin >= pet["thresholds"][chosen[0]]
            elif policy == "full":
                value, leave = 0.0, False
            elif policy == "pcee-lb-global":
                threshold = doc["global_threshold"]["thresholds"][g]
                value, leave = 0.0, threshold is not None and conf >= threshold
            else:
                raise AssertionError(policy)
            if leave or last:
                if policy == "pcee-lb-global":
                    # the promise: the pooled answers of every exit at confidence >= the threshold
                    rows = doc["global_threshold"]
                    threshold = rows["thresholds"][g]
                    bound = _scipy_lower(rows["correct"][g], rows["counts"][g], alpha)
                    met = threshold is not None and conf >= threshold and bound >= request_delta
                    estimate = bin_estimate(policy)
                elif policy in _BASELINES or policy == "pcee-lb-tail":
                    # the promise: the guarded tail of the samples answered here; the estimate: the own bin
                    met = tail_value(policy) >= request_delta
                    estimate = bin_estimate(policy)
                else:
                    # per-bin rules: their own table value is the estimate, the guard of their leavers the promise
                    estimate = max(value, 0.0)
                    met = tail_value(policy) >= request_delta
                out.append((k, int(np.argmax(logits[k][i])), estimate, bool(met)))
                break
    return out
