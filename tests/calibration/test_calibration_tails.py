"""Issue 15: the guarded tail rule, the baselines' guarded promise, small bins, monotonicity, schema 1 documents."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from calibration_reference import _tail_value, make_logits

from exitserve.calibration import Calibration, decide_all, fit_calibration, normalise_deltas
from exitserve.calibration.document import TAIL_POLICIES
from exitserve.calibration.tables import borrow_empty_rows, exit_allowed, table_values
from exitserve.calibration.tails import minimum_tail, tail_values


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(11)
    return make_logits(rng, 3000, 10, 3, discrete=False)


@pytest.fixture(scope="module")
def cal(problem):
    logits, labels = problem
    return fit_calibration(logits, labels)


def test_minimum_tail_is_the_fewest_all_correct_samples_that_can_pass():
    grid = np.array([0.5, 0.9, 0.95, 0.99, 1.0])
    n = minimum_tail(grid, 0.05)
    np.testing.assert_array_equal(n, [5, 29, 59, 299, np.inf])
    assert np.all(0.05 ** (1 / n[:4]) >= grid[:4]) and np.all(0.05 ** (1 / (n[:4] - 1)) < grid[:4])


def test_tail_values_equal_the_one_edge_at_a_time_reference():
    rng = np.random.default_rng(3)
    grid = np.array([0.5, 0.7, 0.9, 0.95])
    for _ in range(20):
        counts = rng.integers(0, 40, 12)
        correct = rng.binomial(counts, rng.uniform(0.5, 1.0, 12))
        got = tail_values(counts, correct, grid, 0.05)
        for g, delta in enumerate(grid):
            want = [_tail_value(counts.tolist(), correct.tolist(), b, float(delta), 0.05) for b in range(12)]
            np.testing.assert_allclose(got[g], want, atol=1e-9)
            passing = got[g] >= delta
            # a threshold rule: the bins that pass are exactly those at or above the lowest passing edge
            assert not passing.any() or passing[np.argmax(passing):].all()


@pytest.mark.parametrize("policy", TAIL_POLICIES)
def test_promised_samples_meet_delta_at_every_exit_on_the_calibration_data(problem, cal, policy):
    """Each exit's promised set is a tail whose Clopper–Pearson bound reached δ, so its accuracy does."""
    logits, labels = problem
    for delta in (0.3, 0.5, 0.6, 0.7, 0.8):
        d = decide_all(cal, policy, logits, delta)
        correct = d.prediction == labels
        for k in range(cal.num_exits):
            promised = d.target_met & (d.exit_index == k)
            if promised.any():
                assert correct[promised].mean() >= delta, (policy, delta, k)
            answered = d.exit_index == k
            # the own-bin estimate is calibrated: its mean tracks the accuracy (pcee-lb's estimate is its bound)
            if answered.sum() >= 300 and policy not in ("pcee-lb", "pcee-lb-cond"):
                assert abs(d.estimate[answered].mean() - correct[answered].mean()) < 0.03, (policy, delta, k)


def test_baselines_keep_their_exit_rule_but_promise_only_what_the_guard_allows(problem):
    logits, labels = problem
    sharp = [4.0 * z for z in logits]  # overconfident exits, no temperature scaling: confidence lies
    cal = fit_calibration(sharp, labels, fit_temperature=False)
    d = decide_all(cal, "confidence", sharp, 0.7)
    # the rule: exit at the first exit whose confidence reaches δ
    conf = np.stack([cal.confidence(k, z) for k, z in enumerate(sharp)])
    first = np.where((conf[:-1] >= 0.7).any(axis=0), (conf[:-1] >= 0.7).argmax(axis=0), cal.num_exits - 1)
    np.testing.assert_array_equal(d.exit_index, first)
    early = d.exit_index < cal.num_exits - 1
    assert early.sum() > 100 and (d.prediction == labels)[early].mean() < 0.7  # the rule alone would over-promise
    promised = d.target_met
    assert not promised.any() or (d.prediction == labels)[promised].mean() >= 0.7
    assert (early & ~promised).sum() > 100  # confident enough to leave, yet not provably right


def test_tail_rule_promises_at_least_as_much_as_per_bin_bounds(problem, cal):
    logits, labels = problem
    for delta in (0.5, 0.6, 0.7):  # this synthetic problem is hard: its last exit is right 36 % of the time
        tail = decide_all(cal, "pcee-lb-tail", logits, delta).target_met.mean()
        # pcee-lb-cond's promise is the guard on its leavers (schema 3); its per-bin exit rule keeps
        # samples running that the tail rule lets leave with a promise
        bins = decide_all(cal, "pcee-lb-cond", logits, delta).target_met.mean()
        assert tail >= bins, delta


def test_prior_keeps_one_lucky_sample_from_promising():
    counts, correct = np.array([1, 0, 200]), np.array([1, 0, 199])
    plain = table_values("accuracy", counts, correct)
    guarded = table_values("accuracy", counts, correct, prior=(0.0, 1.0))
    assert plain[0] == 1.0 and guarded[0] == 0.5  # one correct sample: 1/(1+1)
    assert guarded[1] == -np.inf  # empty bins still never let anyone leave
    assert guarded[2] == pytest.approx(199 / 201)
    assert np.all(guarded[[0, 2]] <= plain[[0, 2]])  # never raises a value: evidence only counts against
    smoothed = table_values("smoothed", counts, correct, window=1, prior=(0.0, 1.0))
    np.testing.assert_allclose(smoothed, [1 / 2, -np.inf, 199 / 201])  # bins 0-1 pooled: 1 of 1, plus the prior


def test_a_grid_delta_nobody_reached_borrows_the_table_above_and_shuts_nothing():
    grid = np.array([0.5, 0.6, 0.7])
    values = np.array([[0.0, 0.8], [0.9, 0.9], [0.9, 0.9]])  # bin 0 fails at 0.5, passes above
    np.testing.assert_array_equal(exit_allowed(values, grid), [[False, True], [False, True], [False, True]])
    # nobody reached this exit at δ 0.5 (row 0 empty): it borrows δ 0.6's row, so it neither shuts
    # bin 0 above nor lets a new sample stay at δ 0.5 where it would leave at δ 0.6
    counts = np.array([[0, 0], [10, 10], [0, 0]])
    correct = np.array([[0, 0], [9, 9], [0, 0]])
    borrowed_counts, borrowed_correct = borrow_empty_rows(counts, correct)
    np.testing.assert_array_equal(borrowed_counts, [[10, 10], [10, 10], [0, 0]])  # nothing above row 2 to borrow
    np.testing.assert_array_equal(borrowed_correct, [[9, 9], [9, 9], [0, 0]])
    borrowed = table_values("accuracy", borrowed_counts, borrowed_correct)
    np.testing.assert_array_equal(exit_allowed(borrowed, grid), [[True, True], [True, True], [False, False]])


def test_normalise_deltas():
    np.testing.assert_array_equal(normalise_deltas(0.9, 3), [0.9, 0.9, 0.9])
    np.testing.assert_array_equal(normalise_deltas([0.5, 1, 0.25], 3), [0.5, 1.0, 0.25])
    np.testing.assert_array_equal(normalise_deltas(None, 2, default=0.8), [0.8, 0.8])
    assert normalise_deltas(np.array([0.7, 0.8], np.float32), 2).dtype == np.float64
    for bad, message in [(True, "must be a number"), ("0.9", "must be a number"), ([0.9, "0.9"], "must be a number"),
                         (np.array(["0.9"]), "must be numbers"), (0.0, r"\(0, 1\]"), (1.5, r"\(0, 1\]"),
                         (float("nan"), r"\(0, 1\]"), ([0.9, 0.9], "2 values for 3 samples"), (None, "missing"),
                         ([[0.9]], "must be a number"), (np.ones((3, 1)) * 0.9, "3 values for 3 samples"),
                         ({"a": 1}, "must be a number")]:
        with pytest.raises(ValueError, match=message):
            normalise_deltas(bad, 3, where="delta")


def schema1(doc: dict) -> dict:
    """What a document written before schema 2 looks like: no prior, no tail tables."""
    old = copy.deepcopy(doc)
    old["schema_version"] = 1
    for key in ("prior", "tail_bins", "global_threshold", "input_guard"):
        old.pop(key, None)
    for ex in old["exits"]:
        del ex["tail"]
        counts, correct = np.array(ex["counts"]), np.array(ex["correct"])
        ex["accuracy"] = [None if not np.isfinite(v) else float(v) for v in table_values("accuracy", counts, correct)]
        ex["smoothed_accuracy"] = [None if not np.isfinite(v) else float(v)
                                   for v in table_values("smoothed", counts, correct, window=old["window"])]
    return old


def test_schema1_documents_still_load_and_decide_as_they_were_fitted(problem, cal):
    logits, _ = problem
    old = Calibration.from_dict(schema1(cal.to_dict()), num_exits=3)
    assert old.schema_version == 1 and not old.has_tail_tables
    d = decide_all(old, "confidence", logits, 0.9)
    np.testing.assert_allclose(d.estimate, d.confidence)  # the baseline's own estimate, as before
    np.testing.assert_array_equal(d.target_met[d.exit_index < 2], True)
    # no tail tables in schema 1: the default policy falls back to the previous default, still guarded
    for k in range(3):
        tail, cond = old.step("pcee-lb-tail", k, logits[k], 0.6), old.step("pcee-lb-cond", k, logits[k], 0.6)
        for field in ("exit_now", "estimate", "target_met"):
            np.testing.assert_array_equal(getattr(tail, field), getattr(cond, field))
    broken = schema1(cal.to_dict())
    broken["exits"][0]["tail"] = cal.to_dict()["exits"][0]["tail"]
    assert Calibration.from_dict(broken).schema_version == 1  # a tail block alone is harmless
    v2 = cal.to_dict()
    del v2["exits"][1]["tail"]
    with pytest.raises(ValueError, match="schema 2 needs prior, tail_bins and every exit's tail tables"):
        Calibration.from_dict(v2)


@pytest.mark.parametrize("policy", TAIL_POLICIES)
def test_stored_tail_counts_are_the_samples_the_replay_answers_or_lets_reach(problem, cal, policy):
    """Fitting simulates each rule; replaying it on the same data must meet exactly the counted samples."""
    logits, labels = problem
    doc = cal.to_dict()
    for g in (0, 20, 40):
        delta = cal.delta_grid[g]
        d = decide_all(cal, policy, logits, delta)
        for k in range(cal.num_exits):
            rows = doc["exits"][k]["tail"][policy]
            counts = np.array(rows["counts"][rows["grid_rows"][g]])
            edges = np.array(doc["exits"][k]["tail"]["edges"])
            # pcee-lb-tail counts every sample reaching exit k, a baseline the samples it answers there
            members = d.exit_index >= k if policy == "pcee-lb-tail" else d.exit_index == k
            bins = np.searchsorted(edges, cal.confidence(k, logits[k][members]), side="right") - 1
            bins = np.clip(bins, 0, edges.size - 2)
            np.testing.assert_array_equal(np.bincount(bins, minlength=edges.size - 1), counts, err_msg=f"{policy} δ {delta} exit {k}")
