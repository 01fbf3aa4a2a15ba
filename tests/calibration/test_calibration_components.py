"""Building blocks: confidence measures, temperature, bins, Clopper–Pearson, tables, thresholds."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from exitserve.calibration.binning import bin_counts, bin_index, make_edges
from exitserve.calibration.bounds import beta_ppf, betainc, clopper_pearson_lower
from exitserve.calibration.confidence import confidence_from_probs, softmax
from exitserve.calibration.tables import exit_allowed, table_values, window_sums
from exitserve.calibration.temperature import fit_temperature, nll
from exitserve.calibration.threshold import choose_thresholds, margin_records

# --- confidence -------------------------------------------------------------------------------


def test_confidence_measures_by_hand():
    probs = np.array([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(confidence_from_probs(probs, "max-softmax"), [0.5, 0.25, 1.0])
    np.testing.assert_allclose(confidence_from_probs(probs, "margin"), [0.2, 0.0, 1.0])
    entropy = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    np.testing.assert_allclose(confidence_from_probs(probs, "entropy"), [1 - entropy / math.log(4), 0.0, 1.0], atol=1e-15)
    with pytest.raises(ValueError, match="unknown confidence measure"):
        confidence_from_probs(probs, "energy")


def test_softmax_with_temperature_matches_definition():
    logits = np.array([[2.0, 1.0, -1.0]], dtype=np.float32)
    z = logits[0].astype(np.float64) / 2.0
    expected = np.exp(z) / np.exp(z).sum()
    np.testing.assert_allclose(softmax(logits, 2.0)[0], expected, rtol=1e-12)
    assert softmax(np.array([[1000.0, 0.0]]))[0, 0] == 1.0  # no overflow


def test_fitted_temperature_minimises_nll_and_recovers_a_known_scale():
    rng = np.random.default_rng(3)
    n, classes = 4000, 5
    true_logits = rng.normal(scale=2.0, size=(n, classes))
    labels = np.array([rng.choice(classes, p=p) for p in softmax(true_logits)])
    # The model reports logits 3x too large: the fitted temperature should be about 3.
    t = fit_temperature((3.0 * true_logits).astype(np.float32), labels)
    assert t == pytest.approx(3.0, rel=0.1)
    for other in (t * 0.9, t * 1.1):
        assert nll(3.0 * true_logits, labels, t) < nll(3.0 * true_logits, labels, other)


# --- bins -------------------------------------------------------------------------------------


def test_bin_index_edges_one_nan_and_overshoot():
    edges = make_edges(np.empty(0), 4)
    np.testing.assert_array_equal(edges, [0.0, 0.25, 0.5, 0.75, 1.0])
    conf = np.array([0.0, 0.25, 0.5, 0.75, 1.0, np.nextafter(0.25, 0), 0.9999999, np.nan, 1.0 + 1e-12, -1e-18])
    np.testing.assert_array_equal(bin_index(edges, conf), [0, 1, 2, 3, 3, 0, 3, 4, 3, 0])


def test_every_edge_of_fifteen_bins_starts_its_own_bin():
    edges = make_edges(np.empty(0), 15)
    np.testing.assert_array_equal(bin_index(edges, edges), [*range(15), 14])
    np.testing.assert_array_equal(bin_index(edges, np.nextafter(edges[1:], 0)), range(15))


def test_equal_mass_edges_are_quantiles_deduplicated():
    conf = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])
    edges = make_edges(conf, 4, "equal-mass")
    np.testing.assert_allclose(edges, [0.0, 0.275, 0.5, 0.725, 1.0])
    counts, _ = bin_counts(bin_index(edges, conf), np.ones(8), edges.size - 1)
    np.testing.assert_array_equal(counts, [2, 2, 2, 2])
    saturated = np.array([0.5, 1.0, 1.0, 1.0, 1.0, 1.0])  # quantiles at 1.0 collapse into the last edge
    edges = make_edges(saturated, 3, "equal-mass")
    np.testing.assert_array_equal(edges, [0.0, 1.0])
    with pytest.raises(ValueError, match="unknown binning"):
        make_edges(conf, 4, "equal-height")


def test_bin_counts_drop_nan_sentinel():
    counts, correct = bin_counts(np.array([0, 1, 1, 2, 3]), np.array([True, True, False, True, True]), 3)
    np.testing.assert_array_equal(counts, [1, 2, 1])
    np.testing.assert_array_equal(correct, [1, 1, 1])


# --- Clopper–Pearson --------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.2])
def test_clopper_pearson_matches_scipy_beta_ppf(alpha):
    rng = np.random.default_rng(7)
    n = np.concatenate([np.arange(1, 40), rng.integers(40, 20000, 300)])
    k = np.concatenate([np.arange(1, 40) // 2, rng.integers(0, 20000, 300) % (n[39:] + 1)])
    lower = clopper_pearson_lower(k, n, alpha)
    inner = k > 0
    expected = np.zeros(n.size)
    expected[inner] = stats.beta.ppf(alpha, k[inner], n[inner] - k[inner] + 1)
    np.testing.assert_allclose(lower, expected, atol=1e-9, rtol=0)


def test_betainc_and_ppf_match_scipy():
    rng = np.random.default_rng(11)
    a, b, x = rng.uniform(0.5, 500, 200), rng.uniform(0.5, 500, 200), rng.uniform(0, 1, 200)
    from scipy import special

    np.testing.assert_allclose(betainc(a, b, x), special.betainc(a, b, x), atol=1e-11)
    q = rng.uniform(0.001, 0.999, 200)
    np.testing.assert_allclose(beta_ppf(q, a, b), stats.beta.ppf(q, a, b), atol=1e-9)


def test_clopper_pearson_edge_cases():
    np.testing.assert_array_equal(clopper_pearson_lower([0, 0, 5], [0, 5, 5], 0.05)[:2], [0.0, 0.0])
    assert clopper_pearson_lower(5, 5, 0.05) == pytest.approx(0.05 ** (1 / 5), abs=1e-15)
    with pytest.raises(ValueError, match="correct <= count"):
        clopper_pearson_lower([3], [2])
    with pytest.raises(ValueError, match="alpha"):
        clopper_pearson_lower([1], [2], alpha=1.5)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), frac=st.floats(0, 1), alpha=st.floats(0.001, 0.4))
def test_lower_bound_never_exceeds_the_observed_accuracy(n, frac, alpha):
    k = int(round(frac * n))
    lower = float(clopper_pearson_lower(k, n, alpha))
    assert 0.0 <= lower <= k / n
    if k > 0:
        # The defining equation: P(X >= k | n, lower) = alpha.
        assert float(1.0 - stats.binom.cdf(k - 1, n, lower)) == pytest.approx(alpha, rel=1e-6)


# --- tables -----------------------------------------------------------------------------------


def test_table_values_with_an_interior_empty_bin():
    counts, correct = np.array([4, 0, 6, 10]), np.array([2, 0, 3, 9])
    acc = table_values("accuracy", counts, correct)
    np.testing.assert_array_equal(acc, [0.5, -np.inf, 0.5, 0.9])
    ws = table_values("smoothed", counts, correct, window=1)
    np.testing.assert_allclose(ws, [2 / 4, -np.inf, 12 / 16, 12 / 16])  # empty centre stays -inf
    np.testing.assert_array_equal(table_values("smoothed", counts, correct, window=0), acc)
    lb = table_values("lower", counts, correct, alpha=0.05)
    assert lb[1] == 0.0 and np.all(lb[[0, 2, 3]] < acc[[0, 2, 3]])
    np.testing.assert_array_equal(window_sums(np.array([[1, 2, 3], [4, 5, 6]]), 1), [[3, 6, 5], [9, 15, 11]])


def test_exit_allowed_is_monotone_in_delta():
    grid = np.array([0.5, 0.85, 0.9])
    values = np.array([[0.4, 0.9, 0.6], [0.8, 0.9, 0.86], [0.95, 0.9, 0.7]])
    # bin 0 passes only at 0.9 (not at 0.5): never allowed; bin 2 passes at 0.5, 0.85, then fails.
    np.testing.assert_array_equal(exit_allowed(values, grid), [[False, True, True], [False, True, True], [False, True, False]])


# --- per-exit thresholds ----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.booleans()), min_size=1, max_size=40),
       st.lists(st.floats(0.01, 1.0), min_size=1, max_size=8))
def test_margin_records_pick_the_smallest_threshold_reaching_epsilon(samples, epsilons):
    margins = np.array([m / 8 for m, _ in samples])
    correct = np.array([c for _, c in samples])
    thresholds, precision = margin_records(margins, correct)
    chosen = choose_thresholds(precision, np.array(epsilons))
    for eps, j in zip(epsilons, chosen, strict=True):
        # Brute force: the smallest distinct margin t whose {margin >= t} has precision >= eps.
        brute = [t for t in np.unique(margins) if correct[margins >= t].mean() >= eps]
        if not brute:
            assert j == thresholds.size
        else:
            assert thresholds[j] == brute[0]
            assert precision[j] == correct[margins >= brute[0]].mean()


def test_calibration_imports_neither_torch_nor_scipy_nor_service():
    code = ("import sys, exitserve.calibration, exitserve.calibration.rules, exitserve.calibration.replay, "
            "exitserve.calibration.document, exitserve.calibration.fitting, exitserve.calibration.evaluation, "
            "exitserve.calibration.metrics, exitserve.calibration.plots, exitserve.calibration.io; "
            "bad = [m for m in ('torch', 'scipy', 'exitserve.service', 'exitserve.models', 'matplotlib') "
            "if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_deciding_needs_no_fitting_module():
    """What the serving path uses (load a document, step, replay, observations) imports no fitting code."""
    code = ("import sys, exitserve.calibration as c, exitserve.calibration.observations; "
            "from exitserve.calibration import Calibration, decide_all, normalise_deltas; "
            "bad = [m for m in ('exitserve.calibration.fitting', 'exitserve.calibration.temperature', "
            "'exitserve.calibration.threshold', 'exitserve.calibration.evaluation', 'tqdm') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
