"""Tables rebuilt from observations (issue 8): the served-traffic case where deep exits are unseen,
and the per-bin agreement with the last exit that shadow checks compare against."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from calibration_reference import make_logits

from exitserve.calibration import Calibration, decide_all, fit_calibration
from exitserve.calibration.fitting import Observations, observe_logits, refit_document


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(5)
    logits, labels = make_logits(rng, 400, 5, 3, discrete=False)
    return logits, labels


@pytest.fixture(scope="module")
def base(problem) -> Calibration:
    logits, labels = problem
    return fit_calibration(logits, labels, data_fingerprint="val")


def censored(obs: Observations, depth: np.ndarray) -> Observations:
    """What a server sees: exits 0..depth[i] of sample i."""
    exits = range(len(obs.confidence))
    return Observations(
        [np.where(k <= depth, obs.confidence[k], np.nan) for k in exits],
        [np.where(k <= depth, obs.margin[k], np.nan) for k in exits],
        [np.where(k <= depth, obs.prediction[k], -1) for k in exits],
    )


def test_refit_on_the_same_full_data_gives_the_same_tables(problem, base) -> None:
    logits, labels = problem
    obs = observe_logits(logits, base.temperatures, base.measure)
    again = refit_document(base.to_dict(), obs, labels, data_fingerprint="val")
    assert again == base.to_dict()


def test_unobserved_exits_count_nowhere(problem, base) -> None:
    logits, labels = problem
    obs = observe_logits(logits, base.temperatures, base.measure)
    depth = decide_all(base, "pcee-cond", logits, 0.8).exit_index
    doc = refit_document(base.to_dict(), censored(obs, depth), labels, data_fingerprint="fb")
    cal = Calibration.from_dict(doc, num_exits=3)
    for k in range(3):
        seen = depth >= k
        counts, correct = cal.counts(k)
        assert counts.sum() == seen.sum()
        assert correct.sum() == (logits[k][seen].argmax(1) == labels[seen]).sum()
        # conditional tables only ever hold samples seen at that exit
        for row in doc["exits"][k]["conditional"]["pcee-cond"]["counts"]:
            assert sum(row) <= seen.sum()
    # agreement needs the last exit too: only samples that went all the way count
    agreement = doc["exits"][0]["agreement"]
    assert sum(agreement["counts"]) == (depth == 2).sum()


def test_refit_keeps_temperatures_edges_and_settings(problem, base) -> None:
    logits, labels = problem
    obs = observe_logits(logits, base.temperatures, base.measure)
    doc = refit_document(base.to_dict(), censored(obs, np.zeros(len(labels), np.int64)), labels, data_fingerprint="fb")
    for new, old in zip(doc["exits"], base.to_dict()["exits"], strict=True):
        assert new["temperature"] == old["temperature"] and new["edges"] == old["edges"]
    assert doc["data_fingerprint"] == "fb" and doc["validation_size"] == len(labels)
    # exit 1 and 2 saw nothing: empty tables let no one leave there, the last exit reports 0
    cal = Calibration.from_dict(doc, num_exits=3)
    d = decide_all(cal, "pcee", logits, 0.6)
    assert not (d.exit_index == 1).any()
    assert (d.estimate[d.exit_index == 2] == 0).all()


def test_refit_refuses_nothing_to_count(base) -> None:
    empty = Observations([np.full(3, np.nan)] * 3, [np.full(3, np.nan)] * 3, [np.full(3, -1)] * 3)
    with pytest.raises(ValueError, match="no observations"):
        refit_document(base.to_dict(), empty, np.zeros(3, np.int64), data_fingerprint="x")


def test_agreement_per_bin_and_overall(problem, base) -> None:
    logits, _ = problem
    last = logits[-1].argmax(1)
    for k in range(3):
        per_bin, overall = base.agreement(k)
        agree = logits[k].argmax(1) == last
        assert overall == pytest.approx(agree.mean())
        bins = base.bin_index(k, base.confidence(k, logits[k]))
        for b in np.unique(bins):
            assert per_bin[b] == pytest.approx(agree[bins == b].mean())
        assert per_bin[-1] == overall  # the NaN-sentinel slot falls back to the exit's rate
    assert base.agreement(2)[1] == 1.0


def test_documents_without_agreement_still_load(base) -> None:
    doc = base.to_dict()
    for ex in doc["exits"]:
        del ex["agreement"]
    cal = Calibration.from_dict(doc, num_exits=3)
    assert cal.agreement(0) is None


def test_inconsistent_agreement_is_refused(base) -> None:
    doc = copy.deepcopy(base.to_dict())
    ex = doc["exits"][1]["agreement"]
    b = int(np.argmax(ex["counts"]))
    ex["agree"][b] = ex["counts"][b] + 1
    with pytest.raises(ValueError, match="exit 1: agreement: a bin has more agreeing samples"):
        Calibration.from_dict(doc, num_exits=3)
    doc["exits"][1]["agreement"] = {"counts": [1, 2], "agree": [0, 0]}
    with pytest.raises(ValueError, match="exit 1: agreement: counts: shape"):
        Calibration.from_dict(doc, num_exits=3)
