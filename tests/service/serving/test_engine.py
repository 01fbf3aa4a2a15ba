"""The engine and the batcher give every sample the offline decision, whatever shares its batch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from exitserve.calibration import Calibration, decide_all
from exitserve.models.bundle import load_bundle
from exitserve.models.data import load_dataset
from exitserve.service.runners.onnx_runtime import OnnxRunner
from exitserve.service.serving.batcher import DynamicBatcher, QueueFull, WorkItem
from exitserve.service.serving.engine import ExitEngine
from exitserve.service.tools.offline import input_guard_verdict


@pytest.fixture(scope="module")
def setup(digits_bundle: Path):
    bundle = load_bundle(digits_bundle)
    runner = OnnxRunner(bundle)
    calibration = Calibration.from_dict(bundle.calibration, bundle.manifest.num_exits)
    data = load_dataset("digits:test")
    x = data.x[:60]
    logits = runner.run_all_exits(x, progress=False)
    return ExitEngine(runner, calibration), calibration, x, logits


@pytest.fixture(scope="module")
def typical(setup) -> np.ndarray:
    """The input guard's verdict on the 60 samples: the engine applies the bundle's guard, so the offline
    reference must too."""
    engine, calibration, x, _ = setup
    _, features = engine.runner.run_all_exits_with_features(x, progress=False)
    verdict = input_guard_verdict(calibration, features)
    assert verdict is not None
    return verdict


POLICIES = ["pcee", "pcee-cond", "pcee-lb", "confidence", "per-exit-threshold", "full"]


def test_engine_equals_offline_for_every_policy(setup, typical) -> None:
    engine, calibration, x, logits = setup
    rng = np.random.default_rng(0)
    deltas = rng.choice([0.6, 0.8, 0.9, 0.95, 0.99], size=len(x))
    for policy in POLICIES:
        got = engine.run(x, deltas, np.full(len(x), policy, dtype=object))
        want = decide_all(calibration, policy, logits, deltas, typical)
        assert np.array_equal(got.exit_index, want.exit_index), policy
        assert np.array_equal(got.class_index, want.prediction), policy
        assert np.array_equal(got.target_met, want.target_met), policy
        assert np.allclose(got.estimate, want.estimate), policy


def test_mixed_policies_in_one_batch(setup, typical) -> None:
    engine, calibration, x, logits = setup
    policies = np.array([POLICIES[i % len(POLICIES)] for i in range(len(x))], dtype=object)
    deltas = np.full(len(x), 0.9)
    got = engine.run(x, deltas, policies)
    for policy in POLICIES:
        rows = np.flatnonzero(policies == policy)
        want = decide_all(calibration, policy, [z[rows] for z in logits], deltas[rows], typical[rows])
        assert np.array_equal(got.exit_index[rows], want.exit_index)


def test_exits_are_reported_as_they_happen(setup) -> None:
    engine, _, x, _ = setup
    seen: list[tuple[int, np.ndarray]] = []
    result = engine.run(x, np.full(len(x), 0.6), np.full(len(x), "pcee", dtype=object),
                        on_exit=lambda rows, r: seen.append((int(r.exit_index[rows[0]]), rows.copy())))
    rows = np.concatenate([r for _, r in seen])
    assert sorted(rows.tolist()) == list(range(len(x)))  # every sample reported exactly once
    for k, reported in seen:
        assert (result.exit_index[reported] == k).all()


@pytest.mark.parametrize("continuous", [False, True])
def test_batcher_results_do_not_depend_on_batch_mates(setup, continuous: bool, typical) -> None:
    engine, calibration, x, logits = setup
    rng = np.random.default_rng(1)
    deltas = rng.choice([0.6, 0.9, 0.99], size=len(x))
    policy = "pcee-cond"
    want = decide_all(calibration, policy, logits, deltas, typical)
    batcher = DynamicBatcher(engine, max_batch_size=16, max_queue_delay_s=0.005, queue_limit=100, workers=2,
                             continuous=continuous)
    batcher.start()

    async def send_all():
        loop = asyncio.get_running_loop()
        cuts = [0, 1, 4, 5, 13, 20, 21, 33, 45, 46, 60]  # requests of 1..12 samples
        items = []
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            item = WorkItem(x[lo:hi], deltas[lo:hi], np.full(hi - lo, policy, dtype=object), None, loop, loop.create_future())
            batcher.submit(item)
            items.append((lo, hi, item))
        return [(lo, hi, await item.future) for lo, hi, item in items]

    try:
        for lo, hi, result in asyncio.run(send_all()):
            assert np.array_equal(result.exit_index, want.exit_index[lo:hi])
            assert np.array_equal(result.class_index, want.prediction[lo:hi])
            assert np.allclose(result.estimate, want.estimate[lo:hi])
    finally:
        assert batcher.close(timeout=5)


def test_full_queue_rejects_at_once(setup) -> None:
    engine, _, x, _ = setup
    batcher = DynamicBatcher(engine, max_batch_size=4, max_queue_delay_s=0.0, queue_limit=2)  # not started: nothing drains

    async def overfill():
        loop = asyncio.get_running_loop()
        make = lambda: WorkItem(x[:1], np.array([0.9]), np.array(["pcee"], dtype=object), None, loop, loop.create_future())  # noqa: E731
        batcher.submit(make())
        batcher.submit(make())
        with pytest.raises(QueueFull, match="queue of model"):
            batcher.submit(make())

    asyncio.run(overfill())


class SpanLog(OnnxRunner):
    """The real runner, remembering which spans the engine asked it for."""

    def __init__(self, bundle) -> None:
        super().__init__(bundle)
        self.spans: list[tuple[int, int]] = []

    def run_span(self, first: int, last: int, state: dict) -> tuple[dict, np.ndarray]:
        self.spans.append((first, last))
        return super().run_span(first, last, state)


def test_exits_that_cannot_fire_are_skipped(setup, digits_bundle: Path, typical) -> None:
    """Issue 16: the engine runs from one exit that can fire to the next; with none, the plain model."""
    _, calibration, x, logits = setup
    runner = SpanLog(load_bundle(digits_bundle))
    engine = ExitEngine(runner, calibration)
    last = runner.num_exits - 1
    engine.run(x, np.full(len(x), 0.9), np.full(len(x), "full", dtype=object))
    assert runner.spans == [(0, last)]
    for policy in ("pcee-lb-tail", "pcee", "pcee-lb-cond"):
        for delta in (0.6, 0.9, 0.99, 1.0):
            runner.spans.clear()
            deltas = np.full(len(x), delta)
            got = engine.run(x, deltas, np.full(len(x), policy, dtype=object))
            fires = np.flatnonzero(calibration.firing_exits(policy, delta))
            stops = [last for _, last in runner.spans]
            assert set(stops) <= set(fires.tolist()), (policy, delta)
            assert [first for first, _ in runner.spans] == [0] + [k + 1 for k in stops[:-1]]
            want = decide_all(calibration, policy, logits, deltas, typical)
            assert np.array_equal(got.exit_index, want.exit_index), (policy, delta)
            assert np.array_equal(got.class_index, want.prediction), (policy, delta)


def test_tracing_stops_at_every_exit(setup, digits_bundle: Path) -> None:
    _, calibration, x, _ = setup
    runner = SpanLog(load_bundle(digits_bundle))
    engine = ExitEngine(runner, calibration, trace=True)
    result = engine.run(x, np.full(len(x), 0.99), np.full(len(x), "full", dtype=object))
    assert runner.spans == [(k, k) for k in range(runner.num_exits)]
    assert result.trace is not None and np.isfinite(result.trace.confidence).all()


class MergeLog(ExitEngine):
    """The real engine, remembering how many flights (batches) each step ran together."""

    merged: list[int]

    def advance(self, flights, segment_timer=None) -> None:
        self.merged.append(len(flights))
        super().advance(flights, segment_timer)


@pytest.mark.parametrize("policies", [["pcee-lb-tail"], ["pcee", "confidence", "full"]])
def test_continuous_batching_merges_batches_and_keeps_every_decision(setup, policies: list[str], typical) -> None:
    """Issue 16: survivors of one batch run together with the next batches' samples, each sample
    still getting the offline decision."""
    _, calibration, x, logits = setup
    engine = MergeLog(setup[0].runner, calibration)
    engine.merged = []
    rng = np.random.default_rng(2)
    deltas = rng.choice([0.6, 0.8, 0.9], size=len(x))
    chosen = np.array([policies[i % len(policies)] for i in range(len(x))], dtype=object)
    batcher = DynamicBatcher(engine, max_batch_size=8, max_queue_delay_s=0.0, queue_limit=100, continuous=True)
    batcher.start()

    async def send_all():
        loop = asyncio.get_running_loop()
        items = []
        for i in range(len(x)):  # single-sample requests, all queued at once: batches of 8 enter one after another
            item = WorkItem(x[i : i + 1], deltas[i : i + 1], chosen[i : i + 1], None, loop, loop.create_future())
            batcher.submit(item)
            items.append(item)
        return [await item.future for item in items]

    try:
        results = asyncio.run(send_all())
    finally:
        assert batcher.close(timeout=5)
    for policy in policies:
        rows = np.flatnonzero(chosen == policy)
        want = decide_all(calibration, policy, [z[rows] for z in logits], deltas[rows], typical[rows])
        assert [int(results[i].exit_index[0]) for i in rows] == want.exit_index.tolist(), policy
        assert [int(results[i].class_index[0]) for i in rows] == want.prediction.tolist(), policy
    assert max(engine.merged) > 1  # some step ran flights of several batches as one


def test_a_lone_sample_gets_the_offline_decision_bit_for_bit(setup, typical) -> None:
    """Batches of one row take the scalar path (`Flight._decide_one`, `Calibration.step_one`): every
    field equals the vectorised engine's on the whole batch, and the offline replay's decision."""
    engine, calibration, x, logits = setup
    rng = np.random.default_rng(3)
    grid = calibration.delta_grid
    for policy in [*POLICIES, "pcee-lb-tail", "pcee-ws", "pcee-ws-cond", "pcee-lb-cond", "pcee-lb-global"]:
        deltas = rng.choice(np.r_[grid, grid - 0.003, [0.5, 0.7, 1.0]].clip(0.01, 1.0), size=len(x))
        policies = np.full(len(x), policy, dtype=object)
        want = np.ones(len(x), bool)
        whole = engine.run(x, deltas, policies, want_probabilities=want)
        offline = decide_all(calibration, policy, logits, deltas, typical)
        for i in range(len(x)):
            alone = engine.run(x[i : i + 1], deltas[i : i + 1], policies[i : i + 1], want_probabilities=want[:1])
            for field in ("class_index", "exit_index", "estimate", "target_met", "confidence", "probabilities",
                          "promised", "reason"):
                assert np.array_equal(getattr(alone, field)[0], getattr(whole, field)[i]), (policy, i, field)
            assert alone.exit_index[0] == offline.exit_index[i] and alone.estimate[0] == offline.estimate[i], (policy, i)
            assert alone.target_met[0] == offline.target_met[i] and alone.reason[0] == offline.reason[i], (policy, i)
        assert len(set(whole.exit_index.tolist())) > 1 or policy == "full", policy  # early exits happened
