"""Clustered calibration data (issue 28): tokens of one answer rise and fall together, so the guards
count effective samples (Kish's design effect), not tokens."""

from __future__ import annotations

import numpy as np
import pytest

from exitserve.calibration import Calibration, decide_all, fit_calibration
from exitserve.calibration.bounds import clopper_pearson_lower, design_effect


def test_independent_samples_have_no_design_effect_and_identical_ones_the_cluster_size() -> None:
    rng = np.random.default_rng(0)
    independent = rng.random(20_000) < 0.8
    groups = np.repeat(np.arange(1_000), 20)
    assert design_effect([independent], groups) == pytest.approx(1.0, abs=0.15)
    # every sample of a cluster alike: 20 samples carry the evidence of one
    alike = np.repeat(rng.random(1_000) < 0.8, 20)
    assert design_effect([alike], groups) == pytest.approx(20.0, rel=0.05)
    # the largest over the exits; an exit right everywhere is skipped; never below 1
    assert design_effect([independent, alike, np.ones(20_000, bool)], groups) == pytest.approx(20.0, rel=0.05)
    assert design_effect([np.ones(20_000, bool)], groups) == 1.0
    with pytest.raises(ValueError, match="ids for"):
        design_effect([independent], groups[:10])


def test_the_bound_counts_effective_samples() -> None:
    plain = clopper_pearson_lower(90, 100, 0.05)
    assert clopper_pearson_lower(90, 100, 0.05, design_effect=1.0) == plain
    # 100 samples at design effect 10 bound like 10 independent samples with 9 right
    assert clopper_pearson_lower(90, 100, 0.05, design_effect=10.0) == pytest.approx(clopper_pearson_lower(9, 10, 0.05))
    assert clopper_pearson_lower(90, 100, 0.05, design_effect=10.0) < plain
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="design_effect"):
            clopper_pearson_lower(90, 100, 0.05, design_effect=bad)


def _clustered_logits(seed: int, clusters: int = 300, size: int = 40) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Two exits; the early one is right on whole clusters or wrong on whole clusters at the same confidence."""
    rng = np.random.default_rng(seed)
    n = clusters * size
    labels = rng.integers(0, 4, n)
    groups = np.repeat(np.arange(clusters), size)
    right = np.repeat(rng.random(clusters) < 0.9, size)
    early = np.full((n, 4), -2.0)
    predicted = np.where(right, labels, (labels + 1) % 4)
    early[np.arange(n), predicted] = rng.uniform(0.5, 3.0, n)
    last = np.full((n, 4), -4.0)
    last[np.arange(n), labels] = 4.0
    return [early, last], labels, groups


def test_clustered_data_gives_more_careful_guards_and_the_document_keeps_the_effect() -> None:
    logits, labels, groups = _clustered_logits(0)
    plain = fit_calibration(logits, labels, fit_temperature=False)
    careful = fit_calibration(logits, labels, fit_temperature=False, groups=groups)
    assert plain.design_effect == 1.0 and careful.design_effect > 20
    again = Calibration.from_dict(careful.to_dict())  # a saved document loads with the same guards
    assert again.design_effect == careful.design_effect
    for policy in ("pcee-lb", "pcee-lb-tail", "pcee-lb-global"):
        d_plain = decide_all(plain, policy, logits, 0.85)
        d_careful = decide_all(careful, policy, logits, 0.85)
        d_again = decide_all(again, policy, logits, 0.85)
        assert np.array_equal(d_careful.exit_index, d_again.exit_index)
        # fewer samples leave early: 300 clusters are not 12,000 independent samples
        assert (d_careful.exit_index == 0).sum() <= (d_plain.exit_index == 0).sum(), policy
    with pytest.raises(ValueError, match="one cluster id per sample"):
        fit_calibration(logits, labels, groups=groups[:5])


def test_a_document_with_a_design_effect_below_one_is_refused() -> None:
    logits, labels, _ = _clustered_logits(1, clusters=50, size=4)
    document = fit_calibration(logits, labels, fit_temperature=False).to_dict()
    document["design_effect"] = 0.5
    with pytest.raises(ValueError, match="design_effect"):
        Calibration.from_dict(document)
