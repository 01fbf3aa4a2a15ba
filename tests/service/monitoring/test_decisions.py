"""The decision record: bounded by samples, limited in time, each sample scored once."""

from __future__ import annotations

import time

import numpy as np
import pytest

from exitserve.service.monitoring.decisions import SHADOW_AGREE, SHADOW_DISAGREE, DecisionStore, UnknownIndex
from exitserve.service.monitoring.trace import Trace


def put(store: DecisionStore, request_id: str, n: int, exit_index: int = 1, trace: Trace | None = None) -> int | None:
    return store.record(
        request_id, np.full(n, "pcee", dtype=object), np.full(n, 0.9), np.arange(n), np.full(n, exit_index),
        np.full(n, 0.95), np.ones(n, bool), np.full(n, 0.8), trace, "cal",
    )


def test_scores_each_sample_once_and_reports_what_was_decided() -> None:
    store = DecisionStore(100, 60, num_exits=3)
    put(store, "a", 3)
    [first, second, again, stranger] = store.claim([("a", 2), ("a", 0), ("a", 2), ("b", 0)])
    assert first.prediction == 2 and first.exit == 1 and first.policy == "pcee" and first.target_met
    assert first.estimate == pytest.approx(0.95) and first.delta == pytest.approx(0.9)
    assert second.prediction == 0
    assert again == "duplicate" and stranger == "unknown"


def test_index_past_a_known_request_refuses_the_whole_call() -> None:
    store = DecisionStore(100, 60, num_exits=3)
    put(store, "a", 2)
    with pytest.raises(UnknownIndex, match=r"\[1\].index: 2 is out of range; request 'a' had 2"):
        store.claim([("a", 0), ("a", 2)])
    assert store.claim([("a", 0)])[0] != "duplicate"  # nothing was marked by the refused call


def test_capacity_counts_samples_and_forgets_the_oldest() -> None:
    store = DecisionStore(10, 60, num_exits=3)
    for i in range(4):
        put(store, f"r{i}", 3)  # 12 samples into 10 slots: r0 is overwritten
    assert store.claim([("r0", 0)]) == ["unknown"]
    assert all(c not in ("unknown", "duplicate") for c in store.claim([("r1", 0), ("r3", 2)]))
    assert put(store, "huge", 11) is None  # a request larger than the whole record is not kept
    assert len(store) <= 4


def test_entries_expire_after_the_ttl() -> None:
    store = DecisionStore(100, 0.05, num_exits=3)
    put(store, "old", 1)
    time.sleep(0.1)
    put(store, "new", 1)
    assert store.claim([("old", 0)]) == ["unknown"]
    assert store.claim([("new", 0)])[0] != "unknown"


def test_a_reused_request_id_refers_to_the_newest_request() -> None:
    store = DecisionStore(100, 60, num_exits=3)
    put(store, "same", 1, exit_index=0)
    put(store, "same", 2, exit_index=2)
    [decision] = store.claim([("same", 1)])
    assert decision.exit == 2


def test_shadow_outcomes_and_traces_land_on_their_samples() -> None:
    store = DecisionStore(100, 60, num_exits=3, trace=True)
    partial = Trace.empty(2, 3)
    partial.confidence[:, 0], partial.margin[:, 0], partial.prediction[:, 0] = 0.9, 0.8, 1
    start = put(store, "s", 2, exit_index=0, trace=partial)
    full = Trace.empty(1, 3)
    full.confidence[0], full.margin[0], full.prediction[0] = [0.9, 0.7, 0.6], [0.8, 0.5, 0.3], [1, 1, 4]
    store.update_shadow(start, np.array([1]), np.array([False]), full)
    plain, shadowed = store.claim([("s", 0), ("s", 1)])
    assert plain.shadow not in (SHADOW_AGREE, SHADOW_DISAGREE)
    assert plain.trace == [(pytest.approx(0.9), pytest.approx(0.8), 1)]
    assert shadowed.shadow == SHADOW_DISAGREE and [p for _, _, p in shadowed.trace] == [1, 1, 4]


def test_zero_capacity_records_nothing() -> None:
    store = DecisionStore(0, 60, num_exits=3)
    assert not store.enabled and put(store, "a", 1) is None


def test_a_single_sample_request_costs_about_150_bytes_in_the_record() -> None:
    """Measured with tracemalloc at steady state (twice the capacity recorded, so eviction runs);
    the client's id strings are made beforehand and not counted (at most 128 characters each)."""
    import tracemalloc
    import uuid

    n = 20_000
    ids = [uuid.uuid4().hex for _ in range(2 * n)]
    arrays = (np.array(["pcee"], dtype=object), np.array([0.9]), np.array([3]), np.array([1]), np.array([0.95]),
              np.array([True]), np.array([0.9]))
    tracemalloc.start()
    try:
        store = DecisionStore(n, 3600, num_exits=4)
        for request_id in ids:
            store.record(request_id, *arrays, None, "cal")
        per_sample = tracemalloc.get_traced_memory()[0] / n
    finally:
        tracemalloc.stop()
    print(f"\ndecision record: {per_sample:.0f} bytes per single-sample request (id excluded)")
    assert len(store) == n
    assert per_sample < 200  # was ~330 with an object per request in an OrderedDict


@pytest.mark.parametrize("traced", [False, True])
def test_one_sample_requests_are_stored_as_the_general_path_stores_them(traced: bool) -> None:
    """`record` of a one-sample request takes a scalar path: every column, the eviction of overwritten
    requests (a small ring wraps many times) and what feedback then finds equal the general path's."""
    rng = np.random.default_rng(7)
    fast, general = DecisionStore(9, 60.0, 3, trace=traced), DecisionStore(9, 60.0, 3, trace=traced)
    ids = []
    for i in range(60):
        n = 1 if rng.random() < 0.7 else int(rng.integers(2, 5))
        request_id = f"r{int(rng.integers(0, 25))}"  # ids get reused: the newest request wins
        ids.append(request_id)
        args = (request_id, rng.choice(np.array(["pcee", "full", "confidence"], dtype=object), n),
                rng.uniform(0.5, 1.0, n), rng.integers(0, 10, n), rng.integers(0, 3, n), rng.uniform(0, 1, n),
                rng.random(n) < 0.5, rng.uniform(0, 1, n), None, f"cal{i % 2}")
        assert fast.record(*args) == general._record_many(*args[:-1], args[-1], time.monotonic())
    for column in ("_exit", "_prediction", "_estimate", "_delta", "_confidence", "_policy", "_target_met",
                   "_labelled", "_shadow", "_req_size", "_req_cal", "_req_id"):
        assert np.array_equal(getattr(fast, column), getattr(general, column)), column
    if traced:
        assert fast._trace is not None and general._trace is not None
        assert np.array_equal(fast._trace.prediction, general._trace.prediction)
        assert np.array_equal(fast._trace.confidence, general._trace.confidence, equal_nan=True)
    assert fast._starts == general._starts and fast._head == general._head
    wanted = [(request_id, 0) for request_id in sorted(set(ids))]
    assert fast.claim(wanted) == general.claim(wanted)
