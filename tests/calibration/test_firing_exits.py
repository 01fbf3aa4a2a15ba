"""Issue 16: `Calibration.firing_exits` says which exits can let a sample leave, so the server may skip the rest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from calibration_reference import make_logits

from exitserve.calibration import POLICIES, Calibration, fit_calibration

BUNDLE_CALIBRATION = Path(__file__).parents[2] / "bundles" / "cifar10-resnet-large" / "calibration.json"
# Exactly the rules whose exit depends on a table bin reaching δ: for them "fires" must mean "some bin lets a sample leave".
EXACT = ("pcee", "pcee-ws", "pcee-lb", "pcee-cond", "pcee-ws-cond", "pcee-lb-cond", "pcee-lb-tail")
DELTAS = (0.05, 0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 1.0)


def dense_logits(classes: int, temperature: float) -> np.ndarray:
    """Rows whose max-softmax confidence (after the exit's temperature) sweeps [1/C, 1) densely."""
    confidence = np.concatenate([np.linspace(1 / classes, 0.999, 20000), 1 - np.geomspace(1e-3, 1e-12, 2000)])
    top = np.log(confidence * (classes - 1) / (1 - confidence)) * temperature
    logits = np.zeros((confidence.size, classes))
    logits[:, 0] = top
    return logits


@pytest.fixture(scope="module", params=["bundle", "fitted"])
def calibration(request) -> Calibration:
    if request.param == "bundle":
        return Calibration.from_dict(json.loads(BUNDLE_CALIBRATION.read_text()))
    logits, labels = make_logits(np.random.default_rng(5), 3000, 10, 3, discrete=False)
    return fit_calibration(logits, labels)


@pytest.mark.parametrize("policy", POLICIES)
def test_an_exit_that_does_not_fire_lets_nobody_leave(calibration, policy):
    rng = np.random.default_rng(0)
    classes = 10
    for delta in DELTAS:
        fires = calibration.firing_exits(policy, delta)
        assert fires[-1]
        for k in range(calibration.num_exits - 1):
            random = rng.normal(0, 1, (3000, classes)) * rng.choice([0.1, 1, 5, 30], (3000, 1))
            logits = np.concatenate([random, dense_logits(classes, calibration.temperatures[k])])
            leaves = calibration.step(policy, k, logits, delta).exit_now.any()
            if not fires[k]:
                assert not leaves, (policy, delta, k)
            elif policy in EXACT and calibration.measure == "max-softmax":
                # Not just conservative: a firing exit has a confidence at which someone leaves.
                assert leaves, (policy, delta, k)


def test_mixed_deltas_fire_where_any_sample_could_leave(calibration):
    for policy in ("pcee-lb-tail", "pcee-lb-cond", "pcee"):
        deltas = np.array([0.5, 0.9, 0.99])
        union = np.any([calibration.firing_exits(policy, d) for d in deltas], axis=0)
        np.testing.assert_array_equal(calibration.firing_exits(policy, deltas), union)


def test_full_fires_only_the_last_exit_and_high_targets_skip_exits(calibration):
    expected = np.zeros(calibration.num_exits, bool)
    expected[-1] = True
    np.testing.assert_array_equal(calibration.firing_exits("full", 0.5), expected)
    # Some exit is skipped at δ = 1 by every table rule: no finite evidence promises certainty.
    for policy in EXACT:
        assert not calibration.firing_exits(policy, 1.0)[:-1].all(), policy


def test_unknown_policy_is_refused(calibration):
    with pytest.raises(ValueError, match="unknown policy"):
        calibration.firing_exits("nope", 0.9)


@pytest.mark.parametrize("policy", POLICIES)
def test_next_firing_exit_is_the_first_firing_exit_at_or_after_each_position(calibration, policy):
    for delta in DELTAS:
        fires = calibration.firing_exits_at(policy, delta)
        stops = calibration.next_firing_exits_at(policy, delta)
        assert len(stops) == calibration.num_exits and stops[-1] == calibration.num_exits - 1
        for k, stop in enumerate(stops):
            assert stop >= k and fires[stop] and not fires[k:stop].any()
