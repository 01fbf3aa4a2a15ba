"""ECE, AUROC and AURC against hand-computed values and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exitserve.calibration.metrics import aurc, auroc, ece, risk_coverage


def test_ece_by_hand():
    conf = np.array([0.9, 0.9, 0.6, 0.6, 0.6, 0.2])
    correct = np.array([1, 0, 1, 1, 0, 0], dtype=bool)
    # 5 bins of 0.2: [0.2,0.4): 1 sample, conf .2 acc 0; [0.6,0.8): 3, conf .6 acc 2/3; [0.8,1]: 2, conf .9 acc .5
    expected = (1 * 0.2 + 3 * abs(2 / 3 - 0.6) + 2 * abs(0.5 - 0.9)) / 6
    assert ece(conf, correct, bins=5) == pytest.approx(expected, abs=1e-15)
    assert ece(np.array([1.0, 1.0]), np.array([True, True])) == 0.0


def test_auroc_by_hand_with_ties():
    conf = np.array([0.9, 0.8, 0.8, 0.3])
    correct = np.array([True, True, False, False])
    # pairs (correct, wrong): (.9,.8) 1, (.9,.3) 1, (.8,.8) tie 1/2, (.8,.3) 1 -> 3.5 / 4
    assert auroc(conf, correct) == pytest.approx(0.875, abs=1e-15)
    assert math.isnan(auroc(conf, np.ones(4, dtype=bool)))


def test_aurc_by_hand():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, False, True, False])
    # risk at coverage 1..4: 0/1, 1/2, 1/3, 2/4
    assert aurc(conf, correct) == pytest.approx((0 + 1 / 2 + 1 / 3 + 2 / 4) / 4, abs=1e-15)
    # a tie: the expected risk over both orders, 0.5 at coverage 1 and 1/2 at coverage 2
    assert aurc(np.array([0.5, 0.5]), np.array([True, False])) == pytest.approx(0.5, abs=1e-15)
    coverage, risk = risk_coverage(conf, correct)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0, 1 / 2, 1 / 3, 2 / 4])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=60))
def test_auroc_matches_sklearn(samples):
    from sklearn.metrics import roc_auc_score

    conf = np.array([c / 6 for c, _ in samples])
    correct = np.array([h for _, h in samples])
    if correct.all() or not correct.any():
        assert math.isnan(auroc(conf, correct))
    else:
        assert auroc(conf, correct) == pytest.approx(roc_auc_score(correct, conf), abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=1, max_size=7))
def test_aurc_with_ties_is_the_mean_over_tie_orders(samples):
    """Brute force: average the plain (tie-free) AURC over every ordering of tied samples."""
    from itertools import permutations

    conf = np.array([c / 4 for c, _ in samples])
    correct = np.array([h for _, h in samples])
    total, count = 0.0, 0
    for perm in set(permutations(range(conf.size))):
        order = np.array(perm)
        if np.any(np.diff(conf[order]) > 0):  # only orders sorted by decreasing confidence
            continue
        errors = np.cumsum(~correct[order])
        total += float(np.mean(errors / np.arange(1, conf.size + 1)))
        count += 1
    assert aurc(conf, correct) == pytest.approx(total / count, abs=1e-12)
