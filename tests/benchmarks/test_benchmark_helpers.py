"""The pure parts of benchmarks/headline.py and benchmarks/control.py: curve interpolation and split summaries."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # scripts, not a package

import control  # noqa: E402
import headline  # noqa: E402


def rows(points: list[tuple[float, float]]) -> list[dict]:
    return [{"mflops": x, "error": e} for x, e in points]


def test_frontier_sorts_by_cost_and_keeps_the_lower_error_at_equal_cost() -> None:
    xs, ys = headline.frontier(rows([(60.0, 0.15), (50.0, 0.20), (60.0, 0.14)]))
    assert xs.tolist() == [50.0, 60.0]
    assert ys.tolist() == [0.20, 0.14]


def test_error_at_interpolates_and_refuses_costs_outside_the_curve() -> None:
    curve = rows([(50.0, 0.20), (70.0, 0.10)])
    assert headline.error_at(curve, 60.0) == pytest.approx(0.15)
    assert headline.error_at(curve, 40.0) is None  # cheaper than the first exit: out of reach
    assert headline.error_at(curve, 80.0) is None


def test_mflops_to_reach_finds_the_first_crossing() -> None:
    curve = rows([(50.0, 0.20), (70.0, 0.10), (90.0, 0.08)])
    assert headline.mflops_to_reach(curve, 0.15) == pytest.approx(60.0)
    assert headline.mflops_to_reach(curve, 0.25) == 50.0
    assert headline.mflops_to_reach(curve, 0.05) is None


def test_compare_reports_no_ratio_when_costs_do_not_overlap() -> None:
    small = {"full_mflops": 36.0, "exits": [{"mflops": 36.0, "error": 0.15}],
             "policies": {"pcee": rows([(20.0, 0.20), (36.0, 0.15)])}}
    policy_rows = rows([(55.0, 0.22), (73.0, 0.15), (140.0, 0.12)])
    large = {"exits": [{"mflops": 44.0}], "policies": {p: policy_rows for p in headline.HEADLINE_POLICIES}}
    out = headline.compare(small, large)["pcee"]
    assert out["large_error_at_small_mflops"] is None and out["error_ratio"] is None
    assert out["goal_met"] is False and out["equal_cost_reachable"] is False
    assert out["large_mflops_to_match_small_error"] == pytest.approx(73.0)
    assert out["vs_small_pcee_curve"]["below_everywhere"] is False  # no cost in common


def test_below_small_curve_measures_the_gap_over_shared_costs() -> None:
    small = rows([(10.0, 0.30), (36.0, 0.15)])
    large = rows([(20.0, 0.26), (40.0, 0.10), (120.0, 0.08)])
    out = headline.below_small_curve(small, large, points=5)
    assert out["shared_mflops"] == [20.0, 36.0]
    # at 20 MFLOPs large 0.26 against small 0.30 - 0.15 * 10/26 (above); at 36 large 0.132 against 0.15 (below)
    assert out["max_gap"] == pytest.approx(0.26 - (0.30 - 0.15 * 10 / 26))
    assert out["min_gap"] == pytest.approx(0.26 - 0.16 * 16 / 20 - 0.15)
    assert out["below_everywhere"] is False and 0.0 < out["share_below"] < 1.0
    assert headline.below_small_curve(small, rows([(15.0, 0.05), (50.0, 0.04)]))["below_everywhere"] is True


def test_overthinking_counts_early_exits_right_where_the_last_is_wrong() -> None:
    labels = np.array([0, 1, 2, 0])
    def logits(predicted: list[int]) -> np.ndarray:
        return np.eye(3)[predicted]
    # last exit: right, wrong, wrong, right; exit 0 right on samples 1 and 3; exit 1 right on sample 2
    out = headline.overthinking([logits([1, 1, 0, 0]), logits([1, 0, 2, 1]), logits([0, 2, 0, 0])], labels)
    assert out["per_exit"] == [0.25, 0.25]
    assert out["any_early_exit"] == 0.5
    assert out["last_exit_error"] == 0.5


def test_summarise_counts_violations_per_delta_over_splits() -> None:
    def row(promised: float | None, delta: float) -> dict:
        return {"accuracy_promised": promised, "violation": promised is not None and promised < delta,
                "violation_p_value": 0.01 if promised is not None and promised < delta else None,
                "coverage": 0.5, "accuracy": 0.9, "compute_fraction": 0.6, "n_promised": 0 if promised is None else 10}

    deltas = np.array([0.8, 0.9])
    splits = [[row(0.85, 0.8), row(0.88, 0.9)], [row(0.82, 0.8), row(None, 0.9)]]
    out = control.summarise(splits, deltas)
    assert [r["violations"] for r in out] == [0, 1]
    assert out[1]["violation_rate"] == 0.5 and out[1]["splits_with_promise"] == 1
    assert out[1]["accuracy_promised_min"] == pytest.approx(0.88)


def test_cascade_headline_splits_partition_the_pooled_images_and_split_0_is_the_standard_one() -> None:
    import headline_cascade

    cal, test = headline_cascade.split_indices(5000, 10000, 0)
    assert cal.tolist() == list(range(5000)) and test.tolist() == list(range(5000, 15000))
    for split in (1, 2):
        cal, test = headline_cascade.split_indices(5000, 10000, split)
        assert cal.size == 5000 and test.size == 10000 and not set(cal) & set(test)
        assert set(cal) | set(test) == set(range(15000))
    assert not np.array_equal(headline_cascade.split_indices(5000, 10000, 1)[0], headline_cascade.split_indices(5000, 10000, 2)[0])


def test_cascade_headline_ratio_against_each_static_network_and_the_strongest_one_that_costs_no_more() -> None:
    import headline_cascade

    smalls = [{"name": "a", "mflops": 10.0, "error": 0.20}, {"name": "b", "mflops": 30.0, "error": 0.25},
              {"name": "c", "mflops": 60.0, "error": 0.10}]
    assert headline_cascade.static_frontier_error(smalls, 30.0) == 0.20  # the cheaper "a" beats "b" at b's cost
    assert headline_cascade.static_frontier_error(smalls, 5.0) is None
    large = {"policies": {p: rows([(20.0, 0.16), (40.0, 0.12), (80.0, 0.08)]) for p in headline_cascade.POLICIES}}
    out = headline_cascade.compare_split(large, smalls)["pcee"]
    assert out["a"]["large_error"] is None  # the large model cannot be as cheap as "a"
    assert out["b"]["ratio"] == pytest.approx(0.14 / 0.25) and out["b"]["ratio_vs_strongest"] == pytest.approx(0.14 / 0.20)
    assert out["c"]["large_mflops_to_match"] == pytest.approx(60.0)
    summary = headline_cascade.summarise([{"comparison": {p: headline_cascade.compare_split(large, smalls)[p]
                                                          for p in headline_cascade.POLICIES}}] * 2, ["a", "b", "c"])
    assert summary["pcee"]["a"]["ratio_mean"] is None and not summary["pcee"]["a"]["goal_met"]
    assert summary["pcee"]["b"]["goal_met"] and summary["pcee"]["b"]["ratio_min"] == summary["pcee"]["b"]["ratio_max"]


def test_wallclock_serves_the_large_model_at_the_smallest_delta_that_matches_the_small_error() -> None:
    import headline_wallclock

    report = {"splits": [{"smalls": [{"name": "s", "mflops": 30.0, "error": 0.12}],
                          "large": {"policies": {"pcee-lb-tail": [
                              {"delta": 0.5, "error": 0.20, "mflops": 15.0}, {"delta": 0.8, "error": 0.119, "mflops": 25.0},
                              {"delta": 0.9, "error": 0.10, "mflops": 40.0}]}}}]}
    delta, match = headline_wallclock.matching_delta(report, "s", "pcee-lb-tail")
    assert delta == 0.8 and match["large_mflops"] == 25.0 and match["small_error"] == 0.12
    report["splits"][0]["smalls"][0]["error"] = 0.05
    with pytest.raises(SystemExit, match="never reaches"):
        headline_wallclock.matching_delta(report, "s", "pcee-lb-tail")
