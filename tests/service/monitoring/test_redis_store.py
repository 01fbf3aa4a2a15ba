"""The decision record on a real redis-server: the in-process store's rules (scored once, unknown
after the TTL or the capacity, an index past a known request refused, release for a failed log
write), bounded memory, and two replicas accepting feedback for each other's answers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import running_server
from reliability_support import MODEL, raw_tensor

from exitserve.models.data import load_dataset
from exitserve.service.monitoring.decisions import SampleDecision, UnknownIndex
from exitserve.service.monitoring.redis_store import RedisDecisionStore, StoreUnavailable
from exitserve.service.monitoring.trace import Trace
from tests.service.redis_support import redis_server


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def _record(store: RedisDecisionStore, request_id: str, n: int, trace: Trace | None = None) -> object:
    """Record and wait for the store's writer thread (recording only queues the write)."""
    handle = store.record(request_id, np.full(n, "pcee", dtype=object), np.full(n, 0.9), np.arange(n) % 3,
                          np.arange(n) % 2, np.full(n, 0.95), np.ones(n, bool), np.full(n, 0.8), trace, "cal-1")
    assert store.flush()
    return handle


def test_record_claim_duplicate_unknown_and_release(redis_url: str) -> None:
    store = RedisDecisionStore(redis_url, "unit-a", capacity=100, ttl_s=60, num_exits=2, trace=True)
    trace = Trace.empty(3, 2)
    trace.confidence[:, 0], trace.margin[:, 0], trace.prediction[:, 0] = 0.7, 0.3, [0, 1, 2]
    handle = _record(store, "r-1", 3, trace)
    store.update_shadow(handle, np.array([1]), np.array([True]), None)
    assert store.flush()
    claims = store.claim([("r-1", 1), ("r-1", 1), ("nope", 0)])
    first = claims[0]
    assert isinstance(first, SampleDecision) and claims[1:] == ["duplicate", "unknown"]
    assert (first.prediction, first.exit, first.policy, first.shadow, first.calibration) == (1, 1, "pcee", 1, "cal-1")
    assert first.trace == [(pytest.approx(0.7), pytest.approx(0.3), 1)]
    with pytest.raises(UnknownIndex):
        store.claim([("r-1", 0), ("r-1", 3)])
    assert store.claim([("r-1", 0)])[0] != "duplicate"  # the refused call marked nothing
    store.release([("r-1", 1)])  # the feedback log failed: claimable again
    assert isinstance(store.claim([("r-1", 1)])[0], SampleDecision)


def test_capacity_and_ttl_forget_requests_and_bound_memory(redis_url: str) -> None:
    store = RedisDecisionStore(redis_url, "unit-b", capacity=10, ttl_s=60, num_exits=2)
    for i in range(20):
        _record(store, f"q-{i}", 4)
    # Only the requests whose samples are all among the last 10 remain (the in-process ring's rule),
    # and only their hashes are stored.
    assert len(store) == 2
    assert store.claim([("q-0", 0)]) == ["unknown"]
    assert isinstance(store.claim([("q-19", 3)])[0], SampleDecision)
    assert len(store.client.keys(store.prefix + "req:*")) == 2
    short = RedisDecisionStore(redis_url, "unit-c", capacity=10, ttl_s=0.2, num_exits=2)
    _record(short, "t-1", 1)
    time.sleep(0.4)
    assert short.claim([("t-1", 0)]) == ["unknown"]


def test_an_unreachable_store_is_a_retryable_503(redis_url: str) -> None:
    store = RedisDecisionStore("redis://127.0.0.1:1/0", "unit-d", capacity=10, ttl_s=60, num_exits=2)
    with pytest.raises(StoreUnavailable) as caught:
        store.claim([("x", 0)])
    assert caught.value.status == 503 and caught.value.headers["Retry-After"]


def test_two_replicas_accept_feedback_for_each_others_answers(redis_url: str, digits_bundle: Path) -> None:
    data = load_dataset("digits:test")
    env = {"EXITSERVE_DECISION_STORE": "redis", "EXITSERVE_REDIS_URL": redis_url}
    with running_server([digits_bundle], env=env) as a, running_server([digits_bundle], env=env) as b:
        def predict(server, rows: slice, request_id: str) -> list[dict]:  # noqa: ANN001
            r = httpx.post(f"{server.url}/v1/models/{MODEL}/predict", json={"inputs": raw_tensor(data.x[rows])},
                           headers={"X-Request-Id": request_id}, timeout=30)
            assert r.status_code == 200, r.text
            return r.json()["predictions"]

        def feedback(server, items: list[dict]) -> dict:  # noqa: ANN001
            r = httpx.post(f"{server.url}/v1/models/{MODEL}/feedback", json=items, timeout=30)
            assert r.status_code == 200, r.text
            return r.json()

        answered_by_a = predict(a, slice(0, 5), "asked-a")
        answered_by_b = predict(b, slice(5, 8), "asked-b")
        on_b = feedback(b, [{"request_id": "asked-a", "index": i, "label": int(t)} for i, t in enumerate(data.y[:5])])
        on_a = feedback(a, [{"request_id": "asked-b", "index": i, "label": int(t)} for i, t in enumerate(data.y[5:8])])
        assert on_b["scored"] == 5 and on_a["scored"] == 3
        assert [r["exit"] for r in on_b["results"]] == [p["exit"] for p in answered_by_a]
        assert [r["exit"] for r in on_a["results"]] == [p["exit"] for p in answered_by_b]
        # Scored once across the fleet: the same label sent to the other replica is a duplicate.
        again = feedback(a, [{"request_id": "asked-a", "index": 0, "label": int(data.y[0])}])
        assert again["duplicate"] == 1 and again["scored"] == 0


def test_policies_are_stored_by_name_and_records_from_before_names_still_read(redis_url: str) -> None:
    """Issue 29: the record keeps policy names, so replicas that know other policies (or another order)
    read the same decision; a record written before names were stored (int8 codes only) reads by the
    order of that time."""
    store = RedisDecisionStore(redis_url, "unit-names", capacity=100, ttl_s=60, num_exits=2, trace=False)
    mixed = np.array(["pcee-lb-global", "confidence", "pcee-lb-global"], dtype=object)
    store.record("mixed", mixed, np.full(3, 0.9), np.arange(3), np.zeros(3, np.int64), np.full(3, 0.9),
                 np.ones(3, bool), np.full(3, 0.8), None, "cal-1")
    _record(store, "one", 2)
    assert [d.policy for d in store.claim([("mixed", 0), ("mixed", 1), ("mixed", 2), ("one", 1)])] == [
        "pcee-lb-global", "confidence", "pcee-lb-global", "pcee"]
    # What an older replica wrote: no names field, its code 6 meant pcee-lb-tail.
    _record(store, "old", 2)
    key = store._key("old")
    store.client.hdel(key, "names")
    store.client.hset(key, "policy", np.full(2, 6, np.int8).tobytes())
    assert store.claim([("old", 0)])[0].policy == "pcee-lb-tail"
