"""The serving benchmark's FLOPs-ideal counts the graphs each server runs (benchmarks/flops_spent.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from exitserve.calibration import Calibration
from exitserve.models.bundle import load_bundle

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # scripts, not a package

import flops_spent  # noqa: E402
import monolithic  # noqa: E402

BUNDLE = REPO / "bundles" / "cifar10-resnet-large"


@pytest.fixture(scope="module")
def route() -> flops_spent.RouteFlops:
    bundle = load_bundle(BUNDLE)
    return flops_spent.RouteFlops(bundle, Calibration.from_dict(bundle.calibration, bundle.manifest.num_exits))


def test_graph_counts_equal_the_manifests_torch_counts() -> None:
    flops_spent.check_against_manifest(load_bundle(BUNDLE))  # raises on any segment off by more than 0.1 %


def test_a_count_that_disagrees_with_the_manifest_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    counted = flops_spent.graph_flops
    monkeypatch.setattr(flops_spent, "graph_flops", lambda path: int(counted(path) * 1.01))  # e.g. an op miscounted
    with pytest.raises(ValueError, match="segment 0"):
        flops_spent.check_against_manifest(load_bundle(BUNDLE))


def test_full_depth_is_the_plain_graph_without_inner_heads(route: flops_spent.RouteFlops, tmp_path: Path) -> None:
    plain = flops_spent.graph_flops(monolithic.ensure_baselines(BUNDLE, tmp_path / "mono") / "last-exit.onnx")
    manifest_full = load_bundle(BUNDLE).manifest.full_flops
    assert route.full_depth() == plain
    assert plain < 0.95 * manifest_full  # the manifest's full depth counts three inner heads
    assert route.per_exit("full", 1.0)[-1] == plain


def test_a_route_pays_only_the_heads_of_exits_that_can_fire(route: flops_spent.RouteFlops) -> None:
    fires = route.calibration.firing_exits("pcee-lb-tail", 0.8)
    cost = route.per_exit("pcee-lb-tail", 0.8)
    assert np.array_equal(~np.isnan(cost), fires)
    segments = load_bundle(BUNDLE).manifest.segments
    assert cost[0] == segments[0].flops  # the first stop: segment 0 with its head
    assert np.all(np.diff(cost[fires]) > 0)
    assert cost[-1] <= sum(s.flops for s in segments)  # never more than the chain with every head
    with pytest.raises(ValueError, match="cannot fire"):
        route.mean("pcee-lb-tail", 0.8, np.flatnonzero(~fires)[:1])


def test_heads_and_bodies_split_each_segment(route: flops_spent.RouteFlops) -> None:
    heads, bodies = route.heads(), route.bodies()
    segments = load_bundle(BUNDLE).manifest.segments
    assert [h + b for h, b in zip(heads, bodies, strict=True)] == [s.flops for s in segments]
    assert all(h > 0 for h in heads[:-1]) and heads[-1] == 0
    assert sum(bodies) == route.full_depth()  # the plain model is every body and the last head (inside the last body)
