"""`pcee-lb-global`: one guarded confidence threshold for every exit (calibration.global_threshold)."""

from __future__ import annotations

import numpy as np
import pytest
from calibration_reference import make_logits

from exitserve.calibration import decide_all, fit_calibration
from exitserve.calibration.bounds import clopper_pearson_lower
from exitserve.calibration.global_threshold import candidate_thresholds, fit_global_threshold, pooled_answers


def test_pooled_answers_count_each_sample_at_its_first_confident_exit():
    conf = [np.array([0.9, 0.2, 0.6, np.nan]), np.array([0.95, 0.7, 0.4, 0.8])]
    correct = [np.array([True, False, False, False]), np.array([False, True, True, True])]
    counts, right = pooled_answers(conf, correct, np.array([0.85, 0.65, 0.1]))
    # t 0.85: s0 at exit 0 (right); s1..s3 never reach it.
    # t 0.65: s0 exit 0 (right), s1 exit 1 (right), s3 exit 1 (its exit 0 unobserved; right).
    # t 0.1: everyone at exit 0 where observed: s0 right, s1 wrong, s2 wrong; s3 at exit 1, right.
    np.testing.assert_array_equal(counts, [1, 3, 4])
    np.testing.assert_array_equal(right, [1, 3, 2])


def test_fixed_sequence_stops_at_the_first_failing_candidate():
    # One exit, confidences 1.0 > 0.9 > ... with a wrong answer in the middle of the ranking.
    conf = [np.linspace(1.0, 0.01, 100)]
    correct = [np.ones(100, bool)]
    correct[0][40] = False
    grid = np.array([0.9])
    chosen, counts, right = fit_global_threshold(conf, correct, grid, alpha=0.05, candidates=100)
    assert counts[0] >= 29  # the first candidate able to pass 0.9 at all holds >= 29 samples
    assert clopper_pearson_lower(right[0], counts[0], 0.05) >= 0.9
    # A lower threshold would add samples whose pooled bound falls below 0.9 at some point on the way.
    thresholds = candidate_thresholds(conf, 100)
    lower = thresholds[thresholds < chosen[0]]
    n_all, k_all = pooled_answers(conf, correct, lower[:1])
    assert clopper_pearson_lower(k_all, n_all, 0.05)[0] < 0.9


def test_no_threshold_where_nothing_can_be_proven():
    chosen, counts, _ = fit_global_threshold([np.array([0.9, 0.8])], [np.array([True, True])], np.array([0.9]), 0.05)
    assert np.isnan(chosen[0]) and counts[0] == 0


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(7)
    logits, labels = make_logits(rng, 6000, 6, 3, discrete=False, strength=2.5)
    return logits, labels


@pytest.mark.parametrize("delta", [0.6, 0.75, 0.9])
def test_the_policy_keeps_its_promise_on_fresh_data(problem, delta):
    logits, labels = problem
    cal = fit_calibration([z[:3000] for z in logits], labels[:3000])
    test = [z[3000:] for z in logits]
    d = decide_all(cal, "pcee-lb-global", test, delta)
    promised = d.target_met
    assert promised.mean() > 0.2
    assert (d.prediction[promised] == labels[3000:][promised]).mean() >= delta - 0.02
    # Every promised answer is given with confidence >= its grid δ's threshold, at whatever exit.
    g = int(cal.grid_index(np.array([delta]))[0])
    threshold = cal.to_dict()["global_threshold"]["thresholds"][g]
    assert np.all(d.confidence[promised] >= threshold)
