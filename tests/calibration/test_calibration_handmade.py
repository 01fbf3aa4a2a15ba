"""Tables and decisions of a tiny hand-made two-exit problem, computed by hand.

Four classes, max-softmax confidence, T = 1, four equal-width bins [0, .25) [.25, .5) [.5, .75) [.75, 1].
Logit patterns with exact confidences: U (uniform) = 0.25, H (two-way tie) = 0.5, S (saturated) = 1.0,
all exactly on bin edges; T = softmax([3, 0, 0, 0]) = 0.870 inside the last bin. Bin 0 can never be
reached with four classes, so it is empty at both exits.

sample  exit 0      label  correct0   exit 1            correct1
s0      S  (bin 3)  0      yes        S  (bin 3)        yes
s1      S  (bin 3)  0      yes        S  (bin 3)        yes
s2      S  (bin 3)  1      no         S1 (bin 3, pred 1) yes
s3      T  (bin 3)  0      yes        S  (bin 3)        yes
s4      H  (bin 2)  0      yes        S  (bin 3)        yes
s5      H  (bin 2)  1      no         H1 (bin 2, pred 1) yes
s6      U  (bin 1)  0      yes        T  (bin 3)        yes
s7      U  (bin 1)  1      no         U  (bin 1)        no
s8      U  (bin 1)  1      no         H  (bin 2)        no
s9      H  (bin 2)  0      yes        S  (bin 3)        yes

exit 0: bin1 1/3, bin2 2/3, bin3 3/4;  window-1 smoothing: bin1 3/6, bin2 6/10, bin3 5/7
exit 1: bin1 0/1, bin2 1/2, bin3 7/7
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from exitserve.calibration import POLICIES, decide_all, fit_calibration
from exitserve.calibration.bounds import clopper_pearson_lower
from exitserve.calibration.document import PER_BIN_POLICIES

NEG = -1000.0
U = [0.0, 0.0, 0.0, 0.0]
H = [0.0, 0.0, NEG, NEG]
S = [0.0, NEG, NEG, NEG]
T = [3.0, 0.0, 0.0, 0.0]
S1 = [NEG, 0.0, NEG, NEG]
H1 = [NEG, 0.0, 0.0, NEG]
EXIT0 = np.array([S, S, S, T, H, H, U, U, U, H], dtype=np.float32)
EXIT1 = np.array([S, S, S1, S, S, H1, T, U, H, S], dtype=np.float32)
LABELS = np.array([0, 0, 1, 0, 0, 1, 0, 1, 1, 0])
GRID = [0.5, 0.75, 1.0]
T_CONF = math.exp(3) / (math.exp(3) + 3)
INF = -math.inf


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.fixture(scope="module")
def cal():
    # No Beta prior here, so that the tables are the plain fractions worked out above.
    return fit_calibration([EXIT0, EXIT1], LABELS, bins=4, window=1, alpha=0.05, delta_grid=GRID, fit_temperature=False,
                           prior=(0.0, 0.0))


# Every δ the rule tests below ask for: a request decides at the grid δ at or above its own (where
# the policy's guard was fitted), so on this grid each decides at exactly its own δ.
FINE_GRID = sorted({0.25, float(clopper_pearson_lower(3, 4, 0.05)), 0.3, 0.34, 0.5, 0.6, 2 / 3, 0.7, 0.74, 0.75, 0.76,
                    0.8, 0.9, 1.0})


@pytest.fixture(scope="module")
def fine():
    return fit_calibration([EXIT0, EXIT1], LABELS, bins=4, window=1, alpha=0.05, delta_grid=FINE_GRID,
                           fit_temperature=False, prior=(0.0, 0.0))


def assert_promise_is_the_guard(d, deltas):
    """Whatever rule chose the exit, target_met is the policy's guard reaching the request's δ."""
    np.testing.assert_array_equal(d.target_met, d.promised >= deltas)
    assert np.all(d.reason[~d.target_met] == 1) and np.all(d.reason[d.target_met] == 0)


def run(cal, policy, deltas):
    return decide_all(cal, policy, [EXIT0, EXIT1], deltas)


def test_exact_confidences_on_edges_land_in_the_upper_bin(cal):
    conf = cal.confidence(0, EXIT0)
    np.testing.assert_array_equal(conf[[0, 4, 6]], [1.0, 0.5, 0.25])
    np.testing.assert_array_equal(cal.bin_index(0, conf), [3, 3, 3, 3, 2, 2, 1, 1, 1, 2])


def test_tables_by_hand(cal):
    counts, correct = cal.counts(0)
    np.testing.assert_array_equal(counts, [0, 3, 3, 4])
    np.testing.assert_array_equal(correct, [0, 1, 2, 3])
    np.testing.assert_array_equal(cal.table("accuracy", 0), [INF, 1 / 3, 2 / 3, 3 / 4])
    np.testing.assert_allclose(cal.table("smoothed", 0), [INF, 3 / 6, 6 / 10, 5 / 7])
    counts, correct = cal.counts(1)
    np.testing.assert_array_equal(counts, [0, 1, 2, 7])
    np.testing.assert_array_equal(correct, [0, 0, 1, 7])
    np.testing.assert_array_equal(cal.table("accuracy", 1), [INF, 0.0, 0.5, 1.0])
    # window 1 at exit 1: bin1 (0+0+1)/(0+1+2), bin2 (0+1+7)/(1+2+7), bin3 (1+7)/(2+7)
    np.testing.assert_allclose(cal.table("smoothed", 1), [INF, 1 / 3, 8 / 10, 8 / 9])


def test_lower_bounds_solve_the_clopper_pearson_equation(cal):
    lower0 = cal.table("lower", 0)
    assert lower0[0] == 0.0  # empty bin: no evidence
    for b, (k, n) in zip((1, 2, 3), ((1, 3), (2, 3), (3, 4)), strict=True):
        assert binomial_tail(k, n, lower0[b]) == pytest.approx(0.05, abs=1e-12)
    assert lower0[1] == pytest.approx(1 - 0.95 ** (1 / 3), abs=1e-12)
    lower1 = cal.table("lower", 1)
    assert lower1[1] == 0.0  # k = 0
    assert lower1[3] == pytest.approx(0.05 ** (1 / 7), abs=1e-15)  # k = n closed form


def test_pcee_scalar_deltas(fine):
    d = run(fine, "pcee", 0.7)  # only bin 3 (0.75) of exit 0 passes
    np.testing.assert_array_equal(d.exit_index, [0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(d.prediction, [0, 0, 0, 0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(d.estimate, [0.75] * 4 + [1.0, 0.5, 1.0, 0.0, 0.5, 1.0])
    # The bins' accuracies are point estimates: the promise is the guard on pcee's own leavers, and no
    # set of these ten samples proves 0.7 (9 all-correct samples are the least that could).
    assert not d.target_met.any()
    assert_promise_is_the_guard(d, 0.7)
    d = run(fine, "pcee", 2 / 3)  # bin 2 passes exactly at its accuracy
    np.testing.assert_array_equal(d.exit_index, [0, 0, 0, 0, 0, 0, 1, 1, 1, 0])
    d = run(fine, "pcee", 0.8)  # above every bin of exit 0: nobody leaves early
    np.testing.assert_array_equal(d.exit_index, [1] * 10)
    d = run(fine, "pcee", 1.0)  # exit 1's bin 3 has accuracy exactly 1, but no evidence proves 1
    np.testing.assert_array_equal(d.exit_index, [1] * 10)
    assert not d.target_met.any()


def test_a_delta_between_grid_values_decides_as_the_grid_delta_above(cal, fine):
    # On the coarse grid 0.5 / 0.75 / 1.0, a request at 2/3 decides as 0.75: bin 2 (2/3) stays, as it
    # does at 0.75; the guard behind any promise was counted on exactly these leavers.
    np.testing.assert_array_equal(run(cal, "pcee", 2 / 3).exit_index, run(fine, "pcee", 0.75).exit_index)
    np.testing.assert_array_equal(run(cal, "pcee", 2 / 3).exit_index, [0, 0, 0, 0, 1, 1, 1, 1, 1, 1])


def test_pcee_per_sample_deltas(fine):
    deltas = np.array([0.8, 0.7, 0.6, 0.76, 0.6, 0.7, 0.3, 0.34, 0.5, 0.9])
    d = run(fine, "pcee", deltas)
    # s0 0.8 > 0.75 stays; s1 leaves; s2 leaves; s3 0.76 stays; s4 (bin2 2/3) leaves at 0.6;
    # s5 stays at 0.7; s6 (bin1 1/3) leaves at 0.3; s7 stays at 0.34; s8 stays (1/3 < .5); s9 stays.
    np.testing.assert_array_equal(d.exit_index, [1, 0, 0, 1, 0, 1, 0, 1, 1, 1])
    np.testing.assert_allclose(d.estimate, [1.0, 0.75, 0.75, 1.0, 2 / 3, 0.5, 1 / 3, 0.0, 0.5, 1.0])
    assert_promise_is_the_guard(d, deltas)


def test_pcee_ws_and_lb(fine):
    d = run(fine, "pcee-ws", 0.6)  # smoothed exit 0: bin2 0.6 and bin3 5/7 pass
    np.testing.assert_array_equal(d.exit_index, [0, 0, 0, 0, 0, 0, 1, 1, 1, 0])
    np.testing.assert_allclose(d.estimate[6:9], [8 / 9, 1 / 3, 8 / 10])  # exit 1 smoothed: bins 3, 1, 2
    lower3 = fine.table("lower", 0)[3]
    d = run(fine, "pcee-lb", lower3)  # exactly bin 3's bound
    np.testing.assert_array_equal(d.exit_index, [0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(d.estimate[:4], lower3)
    assert_promise_is_the_guard(d, lower3)
    d = run(fine, "pcee-lb", lower3 + 1e-9)
    np.testing.assert_array_equal(d.exit_index, [1] * 10)
    # s7 is wrong and least confident, yet promised: its answer belongs to the last exit's answers
    # at confidence >= 0.25 (all ten, 8 right): its guard passes δ. The promise is about that set.
    assert d.target_met[7] and d.promised[7] >= lower3 + 1e-9
    assert_promise_is_the_guard(d, lower3 + 1e-9)


def test_conditional_tables_by_hand(cal):
    cond = cal.to_dict()["exits"][1]["conditional"]["pcee-cond"]
    rows = {g: (cond["counts"][r], cond["correct"][r]) for g, r in zip(GRID, cond["grid_rows"], strict=True)}
    # δ=0.5: bins 2, 3 leave exit 0, so exit 1 sees s6 (bin3 ok), s7 (bin1 wrong), s8 (bin2 wrong)
    assert rows[0.5] == ([0, 1, 1, 1], [0, 0, 0, 1])
    # δ=0.75: only bin 3 (exactly 0.75) leaves; exit 1 sees s4..s9
    assert rows[0.75] == ([0, 1, 2, 3], [0, 0, 1, 3])
    # δ=1.0: nobody leaves; exit 1 sees everyone
    assert rows[1.0] == ([0, 1, 2, 7], [0, 0, 1, 7])
    exit0 = cal.to_dict()["exits"][0]["conditional"]["pcee-cond"]
    assert exit0["grid_rows"] == [0, 0, 0] and exit0["counts"] == [[0, 3, 3, 4]]


def test_pcee_cond_uses_the_grid_delta_at_or_above(cal):
    d = run(cal, "pcee-cond", 0.5)
    np.testing.assert_array_equal(d.exit_index, [0, 0, 0, 0, 0, 0, 1, 1, 1, 0])
    # s8 reaches exit 1 in bin 2: unconditional 1/2, conditional (δ=0.5 table) 0/1.
    np.testing.assert_allclose(d.estimate[6:9], [1.0, 0.0, 0.0])
    assert run(cal, "pcee", 0.5).estimate[8] == 0.5
    # δ = 0.6 uses the 0.75 grid tables: bin 2 (2/3) no longer leaves, unlike plain pcee.
    d = run(cal, "pcee-cond", 0.6)
    np.testing.assert_array_equal(d.exit_index, [0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(d.estimate[4:], [1.0, 0.5, 1.0, 0.0, 0.5, 1.0])
    # δ below the grid uses its bottom (0.5); δ within 1e-9 above 0.5 still counts as 0.5.
    np.testing.assert_array_equal(run(cal, "pcee-cond", 0.2).exit_index, run(cal, "pcee-cond", 0.5).exit_index)
    np.testing.assert_array_equal(run(cal, "pcee-cond", 0.5 + 1e-12).exit_index, [0, 0, 0, 0, 0, 0, 1, 1, 1, 0])
    # per-sample δ: s0 at 0.5, s4 at 0.5 leave; s3 at 0.9 (grid 1.0) stays; s2 at 0.6 (grid .75) leaves.
    deltas = np.array([0.5, 0.9, 0.6, 0.9, 0.5, 0.76, 0.5, 0.5, 0.5, 0.8])
    d = run(cal, "pcee-cond", deltas)
    np.testing.assert_array_equal(d.exit_index, [0, 1, 0, 1, 0, 1, 1, 1, 1, 1])
    # s1 at 0.9 -> grid 1.0 tables of exit 1 (everyone): bin 3 7/7; s5 at 0.76 -> grid 1.0: bin 2 1/2
    np.testing.assert_allclose(d.estimate[[1, 5, 7, 8]], [1.0, 0.5, 0.0, 0.0])


def test_delta_above_the_top_of_the_grid_uses_the_top_tables_and_still_needs_the_value():
    cal = fit_calibration([EXIT0, EXIT1], LABELS, bins=4, delta_grid=[0.5, 0.7], fit_temperature=False, prior=(0.0, 0.0))
    # Grid top 0.7: bin 3 of exit 0 (0.75) is allowed there; a request at 0.74 leaves, at 0.8 it must not.
    np.testing.assert_array_equal(run(cal, "pcee-cond", 0.74).exit_index, [0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    d = run(cal, "pcee-cond", 0.8)
    np.testing.assert_array_equal(d.exit_index, [1] * 10)
    # exit 1 under the 0.7 tables (s4..s9 reach it): bin 3 3/3, bin 2 1/2, bin 1 0/1
    np.testing.assert_allclose(d.estimate, [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 1.0, 0.0, 0.5, 1.0])


def test_confidence_policy(fine):
    d = run(fine, "confidence", 0.9)
    np.testing.assert_array_equal(d.exit_index, [0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    # Ten samples cannot prove 0.9 (29 all-correct samples are the least that can): the guard
    # promises nothing, although the confidence of s0..s4 and s9 is >= 0.9.
    assert not d.target_met.any()
    d = run(fine, "confidence", 0.25)  # exactly the uniform confidence: everyone leaves at exit 0
    np.testing.assert_array_equal(d.exit_index, [0] * 10)


def test_per_exit_threshold_policy(fine):
    # exit 0 margins: S 1.0, T (e^3-1)/(e^3+3), H 0, U 0. Candidates: >=0: 6/10, >=0.83: 3/4, >=1: 2/3 (no record).
    thresholds = fine.to_dict()["exits"][0]["per_exit_threshold"]
    assert thresholds["thresholds"] == pytest.approx([0.0, (math.exp(3) - 1) / (math.exp(3) + 3)], abs=1e-15)
    assert thresholds["precision"] == pytest.approx([0.6, 0.75], abs=1e-15)
    d = run(fine, "per-exit-threshold", 0.6)
    np.testing.assert_array_equal(d.exit_index, [0] * 10)
    assert not d.target_met.any()  # 6 of 10 correct: no bound reaches 0.6 (the rule's own precision did)
    d = run(fine, "per-exit-threshold", 0.7)
    np.testing.assert_array_equal(d.exit_index, [0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    d = run(fine, "per-exit-threshold", 0.76)  # no threshold reaches 0.76: nobody leaves early
    np.testing.assert_array_equal(d.exit_index, [1] * 10)


def test_full_policy(cal):
    d = run(cal, "full", 0.5)
    np.testing.assert_array_equal(d.exit_index, [1] * 10)
    # The last exit's guarded tail at grid δ 0.5, tested from the top down: the 6 saturated samples
    # are all correct (bound 0.05 ** (1/6) = 0.61, the first tail of >= 5 samples), with T 7 of 7
    # (0.65), with the two H 8 of 9 (0.59): all >= 0.5; with U 8 of 10 (< 0.5) the test stops.
    bounds = clopper_pearson_lower(np.array([6, 7, 8, 8]), np.array([6, 7, 9, 10]), 0.05)
    assert np.all(bounds[:3] >= 0.5) and bounds[3] < 0.5
    np.testing.assert_array_equal(d.target_met, [True] * 7 + [False, True, True])
    # The estimate is the sample's own: the accuracy of its fine bin (±1 bin, no prior here). The
    # fine equal-mass edges fall between the distinct confidences U, H, T, S, so each pattern has
    # its own bin and its ±1 neighbours are empty: S 6/6, T 1/1, H 1/2 (s5 right, s8 wrong), U 0/1.
    np.testing.assert_allclose(d.estimate[[0, 6, 5, 8, 7]], [1.0, 1.0, 0.5, 0.5, 0.0])


@pytest.mark.parametrize("policy", PER_BIN_POLICIES)
def test_empty_bin_never_lets_anyone_leave_and_reports_zero(cal, policy):
    five = np.zeros((3, 5), dtype=np.float32)  # five classes: confidence 0.2, in the empty bin 0
    step = cal.step(policy, 0, five, np.array([0.01, 0.1, 0.2]))
    assert not step.exit_now.any()
    np.testing.assert_array_equal(step.estimate, 0.0)
    last = cal.step(policy, 1, five, np.array([0.01, 0.1, 0.2]))
    assert last.exit_now.all()
    np.testing.assert_array_equal(last.estimate, 0.0)
    # The promise is the guard on every answer the last exit gives (its whole tail here), not the bin's.
    np.testing.assert_array_equal(last.target_met, last.promised >= np.array([0.01, 0.1, 0.2]))


@pytest.mark.parametrize("policy", POLICIES)
def test_at_an_early_exit_target_met_is_leaving_with_a_guard_reaching_delta(cal, policy):
    deltas = np.linspace(0.3, 0.9, 10)
    step = cal.step(policy, 0, EXIT0, deltas)
    assert not np.any(step.target_met & ~step.exit_now)
    np.testing.assert_array_equal(step.target_met, step.exit_now & (step.promised >= deltas))
    if policy in ("pcee-lb-tail", "pcee-lb-global"):  # their rule is the guard: they leave only with the promise
        np.testing.assert_array_equal(step.target_met, step.exit_now)
    if policy == "full":  # nobody leaves early, so nothing is promised there
        assert not step.exit_now.any() and not step.target_met.any()


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_answers_everyone_at_the_last_exit(cal, policy):
    step = cal.step(policy, 1, EXIT1, np.full(10, 0.99))
    assert step.exit_now.all()
    assert step.exit_now.dtype == bool and step.target_met.dtype == bool
    assert step.estimate.dtype == np.float64 and step.confidence.dtype == np.float64
    np.testing.assert_array_equal(step.target_met, step.promised >= 0.99)  # the guard, not the own estimate


def test_self_supervised_correctness_is_agreement_with_the_last_exit():
    cal = fit_calibration([EXIT0, EXIT1], None, bins=4, delta_grid=GRID)
    assert not cal.labels_known
    np.testing.assert_array_equal(cal.temperatures, [1.0, 1.0])
    # exit 1 predicts class 1 for s2 and s5, class 0 elsewhere; exit 0 predicts 0 everywhere.
    np.testing.assert_array_equal(cal.counts(0)[1], [0, 3, 2, 3])
    np.testing.assert_array_equal(cal.counts(1)[1], cal.counts(1)[0])


def test_step_rejects_bad_arguments(cal):
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        cal.step("fastest", 0, EXIT0, np.full(10, 0.9))
    with pytest.raises(ValueError, match="exit index 2 out of range"):
        cal.step("pcee", 2, EXIT0, np.full(10, 0.9))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        cal.step("pcee", 0, EXIT0, np.full(10, 1.5))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        cal.step("pcee", 0, EXIT0, np.full(10, 0.0))
    with pytest.raises(ValueError, match="3 values for 10 samples"):
        cal.step("pcee", 0, EXIT0, np.full(3, 0.9))
    empty = cal.step("pcee", 0, EXIT0[:0], np.empty(0))
    assert empty.exit_now.shape == (0,)
