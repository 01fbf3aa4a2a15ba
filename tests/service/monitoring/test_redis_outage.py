"""The shared decision store when its Redis fails (issue 30), on a real redis-server: stopped with
SIGSTOP (accepts connections, never answers) and resumed, killed and restarted, answering slowly.

Recording only queues the write (the store's writer thread makes it), so inference never waits for
Redis; a circuit breaker stops calling a failing Redis, logs once when it goes down and once when it
is back; feedback is a 503 meanwhile, with the labels still in the feedback log."""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from conftest import running_server
from reliability_support import MODEL, raw_tensor

from exitserve.models.data import load_dataset
from exitserve.service.monitoring.decisions import SampleDecision
from exitserve.service.monitoring.redis_store import RedisDecisionStore, StoreUnavailable
from tests.service.redis_support import RedisProcess, redis_process


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[RedisProcess]:
    with redis_process(tmp_path) as server:
        yield server


def _store(url: str, model: str, timeout_s: float = 0.3) -> RedisDecisionStore:
    store = RedisDecisionStore(url, model, capacity=1000, ttl_s=60, num_exits=2, timeout_s=timeout_s)
    store.breaker.cooldown_s = 0.2
    return store


def _record(store: RedisDecisionStore, request_id: str, n: int = 1) -> object:
    return store.record(request_id, np.full(n, "pcee", dtype=object), np.full(n, 0.9), np.arange(n) % 3,
                        np.arange(n) % 2, np.full(n, 0.95), np.ones(n, bool), np.full(n, 0.8), None, "cal-1")


def _found(store: RedisDecisionStore, request_id: str) -> bool:
    try:
        return isinstance(store.claim([(request_id, 0)])[0], SampleDecision)
    except StoreUnavailable:
        return False


def _eventually(check, timeout_s: float = 10.0) -> bool:  # noqa: ANN001 - a callable returning bool
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_a_stopped_redis_costs_records_not_answers_and_logs_once_each_way(
        redis_proc: RedisProcess, caplog: pytest.LogCaptureFixture) -> None:
    store = _store(redis_proc.url, "outage-a")
    assert _record(store, "before") is not None and store.flush()
    assert _found(store, "before") and store.state == "up"
    caplog.set_level(logging.INFO, logger="exitserve.monitoring")
    os.kill(redis_proc.process.pid, signal.SIGSTOP)
    try:
        # Recording queues and returns; the writer thread finds the store hung and opens the breaker.
        handles = [_record(store, f"during-{i}") for i in range(50)]
        assert all(h is not None for h in handles)
        assert store.flush() and store.state == "down"
        assert store.dropped["store_down"] >= 1
        with pytest.raises(StoreUnavailable) as refused:
            store.claim([("before", 0)])
        assert refused.value.status == 503 and refused.value.headers["Retry-After"]
        for i in range(20):  # more failed trials while down: no more lines
            _record(store, f"later-{i}")
            time.sleep(0.02)
        assert store.flush()
    finally:
        os.kill(redis_proc.process.pid, signal.SIGCONT)
    assert _eventually(lambda: _record(store, "after") is not None and store.flush() and _found(store, "after"))
    assert store.state == "up"
    lines = [r for r in caplog.records if r.name == "exitserve.monitoring"]
    assert [r.levelname for r in lines] == ["WARNING", "INFO"], [r.getMessage() for r in lines]


def test_a_full_queue_drops_records_and_counts_them(redis_proc: RedisProcess) -> None:
    store = _store(redis_proc.url, "outage-b")
    store._queue = queue.Queue(4)
    os.kill(redis_proc.process.pid, signal.SIGSTOP)
    try:
        handles = [_record(store, f"r-{i}") for i in range(20)]
    finally:
        os.kill(redis_proc.process.pid, signal.SIGCONT)
    assert handles.count(None) == store.dropped["queue_full"] >= 10
    assert store.flush()


def test_a_restarted_redis_is_used_again(redis_proc: RedisProcess) -> None:
    store = _store(redis_proc.url, "outage-c")
    _record(store, "first")
    assert store.flush() and _found(store, "first")
    redis_proc.stop()
    _record(store, "while-dead")
    assert store.flush() and store.state == "down"
    redis_proc.restart()  # an empty store on the same port
    assert _eventually(lambda: _record(store, "after-restart") is not None and store.flush()
                       and _found(store, "after-restart"))
    assert store.state == "up"
    assert store.claim([("first", 0)]) == ["unknown"]  # the old server's records went with it


def test_a_slow_redis_delays_records_but_drops_none(redis_proc: RedisProcess) -> None:
    store = _store(redis_proc.url, "outage-d", timeout_s=5.0)
    _record(store, "warm")
    assert store.flush()
    sleeper = threading.Thread(target=lambda: redis.Redis.from_url(redis_proc.url).execute_command("DEBUG", "SLEEP", "1"))
    sleeper.start()
    time.sleep(0.1)  # the server is inside its sleep
    handles = [_record(store, f"slow-{i}", 2) for i in range(100)]
    sleeper.join()
    assert all(h is not None for h in handles) and store.flush()
    assert store.dropped == {"queue_full": 0, "store_down": 0} and store.state == "up"
    assert all(_found(store, f"slow-{i}") for i in range(100))


def test_server_answers_through_an_outage_and_feedback_is_503_but_logged(redis_proc: RedisProcess, digits_bundle: Path,
                                                                         tmp_path: Path) -> None:
    data = load_dataset("digits:test")
    feedback_log = tmp_path / "feedback.jsonl"
    env = {"EXITSERVE_DECISION_STORE": "redis", "EXITSERVE_REDIS_URL": redis_proc.url,
           "EXITSERVE_FEEDBACK_LOG": str(feedback_log)}
    with running_server([digits_bundle], env=env) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        def predict(i: int, request_id: str) -> httpx.Response:
            return client.post(f"/v1/models/{MODEL}/predict", json={"inputs": raw_tensor(data.x[i:i + 1])},
                               headers={"X-Request-Id": request_id})

        def feedback(request_id: str, i: int) -> httpx.Response:
            return client.post(f"/v1/models/{MODEL}/feedback",
                               json=[{"request_id": request_id, "index": 0, "label": int(data.y[i])}])

        assert predict(0, "ok-0").status_code == 200
        assert _eventually(lambda: feedback("ok-0", 0).status_code == 200)
        assert client.get("/readyz").json()["decision_store"] == {MODEL: "up"}
        mark = len(server.logs().splitlines())
        os.kill(redis_proc.process.pid, signal.SIGSTOP)
        try:
            answers = [predict(i, f"out-{i}") for i in range(40)]
            assert [r.status_code for r in answers] == [200] * 40
            refused = feedback("out-1", 1)
            assert refused.status_code == 503 and refused.headers["retry-after"]
            assert "decision store" in refused.json()["error"]
            ready = client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["decision_store"] == {MODEL: "down"}
            metrics = client.get("/metrics").text
            assert f'exitserve_decision_store_up{{model="{MODEL}"}} 0.0' in metrics
        finally:
            os.kill(redis_proc.process.pid, signal.SIGCONT)
        logged = [json.loads(line) for line in feedback_log.read_text().splitlines()]
        assert {"request_id": "out-1", "label": int(data.y[1]), "scored": False}.items() <= logged[-1].items()
        # Back within seconds: a record made now is found by feedback.
        assert _eventually(lambda: predict(2, "back-2").status_code == 200 and feedback("back-2", 2).status_code == 200)
        assert client.get("/readyz").json()["decision_store"] == {MODEL: "up"}
        outage = [json.loads(line) for line in server.logs().splitlines()[mark:] if line.startswith("{")]
        loud = [e for e in outage if e["level"] in ("warning", "error", "critical")]
        assert len(loud) <= 2 and not any("exception" in e for e in outage), loud
