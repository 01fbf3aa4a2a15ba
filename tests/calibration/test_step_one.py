"""`Calibration.step_one` (the engine's one-row path, issue 16) decides exactly as `step` does.

Bit for bit: exit_now, estimate, target_met and confidence of every row, for every policy and exit,
over random fitted problems (all confidence measures, binnings, schema-2 tail tables), δ on the grid,
next to it (±1e-9, the grid tolerance), between grid values, below and above it, and rows whose
logits are NaN or infinite (the sentinel bin).
"""

from __future__ import annotations

import numpy as np
import pytest
from calibration_reference import make_logits, problems
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exitserve.calibration import POLICIES, Calibration, fit_calibration
from exitserve.calibration.rules import GRID_TOLERANCE


def _deltas(rng: np.random.Generator, grid: np.ndarray, n: int) -> np.ndarray:
    pool = np.concatenate([grid, grid + GRID_TOLERANCE, grid + 2 * GRID_TOLERANCE, grid - GRID_TOLERANCE,
                           np.clip(grid - 0.004, 0.001, 1.0), rng.uniform(0.001, 1.0, 16), [1.0, 0.001, 1e-9]])
    return rng.choice(np.clip(pool, 1e-9, 1.0), n)


def _odd_rows(rng: np.random.Generator, classes: int) -> np.ndarray:
    """Rows that stress the edges: NaN, ±inf, ties, one dominant class, all equal."""
    rows = [np.full(classes, np.nan), np.full(classes, np.inf), np.full(classes, -np.inf), np.zeros(classes),
            np.r_[np.inf, np.zeros(classes - 1)], np.r_[np.nan, np.ones(classes - 1)], np.r_[80.0, np.zeros(classes - 1)]]
    tie = rng.normal(size=classes)
    tie[1] = tie[0] = tie.max() + 1.0
    rows.append(tie)
    return np.array(rows, np.float32)


def assert_same_decisions(cal: Calibration, logits: list[np.ndarray], deltas: np.ndarray) -> dict[str, int]:
    """step_one on each row against step on the whole batch and on that row alone; per policy, the
    rows compared at early exits and how many of them left there."""
    seen = {policy: [0, 0] for policy in POLICIES}
    with np.errstate(invalid="ignore"):  # the NaN / inf rows
        _compare(cal, logits, deltas, seen)
    return {policy: (counts[0], counts[1]) for policy, counts in seen.items()}


def _compare(cal: Calibration, logits: list[np.ndarray], deltas: np.ndarray, seen: dict[str, list[int]]) -> None:
    for policy in POLICIES:
        for k, exit_logits in enumerate(logits):
            whole = cal.step(policy, k, exit_logits, deltas)
            for i in range(len(exit_logits)):
                row = exit_logits[i : i + 1]
                alone = cal.step(policy, k, row, deltas[i : i + 1])
                one = cal.step_one(policy, k, row, float(deltas[i]))
                for field in ("exit_now", "estimate", "target_met", "confidence"):
                    got = getattr(one, field)
                    assert type(got) is (bool if field in ("exit_now", "target_met") else float), (field, type(got))
                    for batch in (whole, alone):
                        want = getattr(batch, field)[i if batch is whole else 0]
                        # Bit-identical, NaN included (a NaN confidence is NaN in both).
                        assert np.array_equal(np.float64(got), np.float64(want), equal_nan=True), (
                            policy, k, i, field, got, want, float(deltas[i]))
                if k < len(logits) - 1:
                    seen[policy][0] += 1
                    seen[policy][1] += one.exit_now


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_n=40), st.integers(0, 2**32 - 1))
def test_step_one_equals_step_on_random_problems(problem, seed):
    cal = fit_calibration(problem.logits, problem.labels, **problem.fit_kwargs)
    rng = np.random.default_rng(seed)
    classes = problem.logits[0].shape[1]
    fresh, _ = make_logits(rng, 12, classes, len(problem.logits), discrete=bool(rng.integers(2)))
    odd = _odd_rows(rng, classes)
    logits = [np.concatenate([a, b, odd]) for a, b in zip(problem.logits, fresh, strict=True)]
    deltas = _deltas(rng, cal.delta_grid, len(logits[0]))
    seen = assert_same_decisions(cal, logits, deltas)
    assert all(rows == (len(logits) - 1) * len(logits[0]) for rows, _ in seen.values())


@pytest.mark.parametrize("measure", ["max-softmax", "entropy", "margin"])
def test_step_one_equals_step_on_a_larger_fit(measure):
    """Many bins and samples: every table cell kind is reached, early exits fire for every policy."""
    rng = np.random.default_rng(11)
    logits, labels = make_logits(rng, 1500, 10, 4, discrete=False, strength=2.0)
    cal = fit_calibration(logits, labels, confidence=measure, bins=15)
    test, _ = make_logits(rng, 150, 10, 4, discrete=False, strength=2.0)
    deltas = _deltas(rng, cal.delta_grid, 150)
    seen = assert_same_decisions(cal, test, deltas)
    # The comparison saw both outcomes under every policy that can exit early: leaving and running on.
    for policy, (rows, left) in seen.items():
        assert (left == 0) if policy == "full" else (0 < left < rows), (policy, rows, left)


def test_step_one_refuses_what_step_refuses():
    rng = np.random.default_rng(0)
    logits, labels = make_logits(rng, 100, 4, 2, discrete=False)
    cal = fit_calibration(logits, labels)
    with pytest.raises(ValueError, match="unknown policy"):
        cal.step_one("nope", 0, logits[0][:1], 0.9)
    with pytest.raises(ValueError, match="out of range"):
        cal.step_one("pcee", 2, logits[0][:1], 0.9)
    with pytest.raises(ValueError, match="one sample"):
        cal.step_one("pcee", 0, logits[0][:2], 0.9)
