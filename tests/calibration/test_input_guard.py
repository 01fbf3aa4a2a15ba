"""The input guard (calibration.input_guard): fitting, the document block, and its effect on the promise."""

from __future__ import annotations

import numpy as np
import pytest
from calibration_reference import make_logits

from exitserve.calibration import Calibration, decide_all, fit_calibration
from exitserve.calibration.fitting import InputFeatures
from exitserve.calibration.input_guard import InputGuard, fit_input_guard
from exitserve.calibration.reasons import BELOW_TARGET, OUT_OF_DISTRIBUTION, PROMISED, REASON_NAMES


def features(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    """Correlated Gaussian features, as pooled activations are."""
    mix = np.linspace(0.5, 1.5, 36).reshape(6, 6)
    return (rng.normal(size=(n, 6)) @ mix + shift).astype(np.float32)


def test_the_threshold_withholds_the_fitted_share_of_the_calibration_samples():
    rng = np.random.default_rng(0)
    calibration_features = features(rng, 4000)
    guard = fit_input_guard(calibration_features, "features_0", quantile=0.95)
    assert 1 - guard.in_distribution(calibration_features).mean() == pytest.approx(0.05, abs=0.002)
    fresh = features(rng, 4000)  # the same distribution: about the same share withheld
    assert 1 - guard.in_distribution(fresh).mean() == pytest.approx(0.05, abs=0.015)
    assert not guard.in_distribution(features(rng, 500, shift=4.0)).any()  # far away: always withheld


def test_scores_are_squared_mahalanobis_distances():
    rng = np.random.default_rng(1)
    x = features(rng, 3000)
    guard = fit_input_guard(x, "f")
    centred = x[:5] - x.mean(axis=0)
    covariance = np.cov(x.T, bias=True)
    ridge = 1e-3 * np.trace(covariance) / 6
    expected = np.einsum("ij,jk,ik->i", centred, np.linalg.inv(covariance + ridge * np.eye(6)), centred)
    np.testing.assert_allclose(guard.scores(x[:5]), expected, rtol=1e-4)  # float32 features
    with pytest.raises(ValueError, match=r"expected \[n, 6\]"):
        guard.scores(x[:, :5])


def test_nan_features_are_never_in_distribution():
    guard = fit_input_guard(features(np.random.default_rng(2), 100), "f")
    assert not guard.in_distribution(np.full((1, 6), np.nan)).any()


@pytest.mark.parametrize("bad, message", [
    (np.zeros((1, 4)), "at least 2 samples"),
    (np.array([[0.0, np.inf], [1.0, 2.0]]), "NaN or inf"),
])
def test_fitting_refuses_unusable_features(bad, message):
    with pytest.raises(ValueError, match=message):
        fit_input_guard(bad, "f")


@pytest.fixture(scope="module")
def guarded():
    rng = np.random.default_rng(3)
    logits, labels = make_logits(rng, 3000, 5, 3, discrete=False, strength=2.0)
    x = features(rng, 3000)
    cal = fit_calibration(logits, labels, features=InputFeatures("features_0", x))
    return cal, logits, labels, x


def test_the_guard_lives_in_the_document_and_reads_back_the_same(guarded):
    cal, *_ = guarded
    doc = cal.to_dict()
    assert doc["schema_version"] == 3 and doc["input_guard"]["features"] == "features_0"
    again = Calibration.from_dict(doc)
    assert isinstance(again.input_guard, InputGuard)
    np.testing.assert_array_equal(again.input_guard.precision, cal.input_guard.precision)
    assert again.input_guard.threshold == cal.input_guard.threshold
    broken = cal.to_dict()
    broken["input_guard"]["precision"] = broken["input_guard"]["precision"][:-1]
    with pytest.raises(ValueError, match="input_guard: mean of 6 values needs a 6x6 precision"):
        Calibration.from_dict(broken)


def test_a_calibration_without_features_has_no_guard():
    rng = np.random.default_rng(4)
    logits, labels = make_logits(rng, 200, 3, 2, discrete=False)
    assert fit_calibration(logits, labels).input_guard is None


def test_inputs_the_guard_rejects_get_no_promise_and_say_why(guarded):
    cal, logits, labels, x = guarded
    typical = cal.input_guard.in_distribution(x)
    assert 0 < (~typical).sum() < 0.05 * len(x)
    free = decide_all(cal, "pcee-lb-tail", logits, 0.7)
    held = decide_all(cal, "pcee-lb-tail", logits, 0.7, typical)
    # The guard never moves an exit; it only withholds promises, and names the reason.
    np.testing.assert_array_equal(held.exit_index, free.exit_index)
    np.testing.assert_array_equal(held.target_met, free.target_met & typical)
    assert np.all(held.reason[~typical] == OUT_OF_DISTRIBUTION)
    assert np.all(held.reason[typical & held.target_met] == PROMISED)
    assert np.all(held.reason[typical & ~held.target_met] == BELOW_TARGET)
    assert REASON_NAMES[OUT_OF_DISTRIBUTION] == "out_of_distribution"


def test_step_one_applies_the_guard_like_step(guarded):
    cal, logits, _, _ = guarded
    for k in range(cal.num_exits):
        for i in range(20):
            for typical in (True, False):
                many = cal.step("pcee-lb-tail", k, logits[k][i : i + 1], 0.7, in_distribution=np.array([typical]))
                one = cal.step_one("pcee-lb-tail", k, logits[k][i : i + 1], 0.7, typical)
                assert (one.exit_now, one.target_met, one.reason) == (bool(many.exit_now[0]), bool(many.target_met[0]),
                                                                     int(many.reason[0]))
                assert one.promised == float(many.promised[0])
