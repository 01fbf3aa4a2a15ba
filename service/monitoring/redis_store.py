"""The decision record on Redis (EXITSERVE_DECISION_STORE=redis): shared by every replica, so a label
posted to any replica finds the answer another one gave.

Same rules as the in-process `DecisionStore`: per model, the last `capacity` answered samples, each
request for at most the TTL. Layout under `exitserve:decisions:<model>:`

* `head`: samples recorded so far (INCRBY), the ring position of the next request;
* `req:<request id>`: a hash with the request's `start`, `size`, calibration key and one field per
  column (packed numpy bytes: no Python object per sample), PEXPIRE'd at the TTL; a sample's label
  claim is the field `l:<index>`, set with HSETNX (so two replicas cannot both score it);
* `index`: a sorted set request id -> start; recording trims the requests that the capacity has
  pushed out (their hashes are deleted), so memory stays bounded by the capacity, not by the TTL.

Recording is one Lua script call (atomic, one round trip), made by the store's own writer thread:
the engine thread only queues it (a bounded queue; a full one drops the record and counts it), so a
slow or hung Redis never sits on an answer's path (issue 30: a SIGSTOP'd Redis made every request
wait for the 2 s socket timeout). A circuit breaker stops calling a failing Redis for a while: records
are then dropped and counted, feedback is refused with a 503 at once, and one line is logged when the
store goes down and one when it is back.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from exitserve.errors import Overloaded
from exitserve.service.monitoring.breaker import CircuitBreaker
from exitserve.service.monitoring.decisions import (
    LEGACY_POLICY_ORDER,
    SHADOW_AGREE,
    SHADOW_DISAGREE,
    SampleDecision,
    UnknownIndex,
    _policy_codes,
    _policy_names,
)
from exitserve.service.monitoring.metrics import Metrics
from exitserve.service.monitoring.trace import Trace

log = logging.getLogger("exitserve.monitoring")

_RECORD = """
local n = tonumber(ARGV[1])
local stop = redis.call('INCRBY', KEYS[1], n)
local start = stop - n
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'start', start, unpack(ARGV, 6))
redis.call('PEXPIRE', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[2], start, ARGV[4])
local oldest = stop - tonumber(ARGV[3])
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. oldest)
for _, id in ipairs(stale) do redis.call('DEL', ARGV[5] .. id) end
if #stale > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. oldest) end
return start
"""
_COLUMNS = {"exit": np.int16, "prediction": np.int32, "estimate": np.float32, "delta": np.float32,
            "confidence": np.float32, "policy": np.int8, "target_met": np.bool_, "shadow": np.int8}
_TRACE = {"trace_c": np.float32, "trace_m": np.float32, "trace_p": np.int32}
# Policies travel by name ("names": one name, or one per sample joined by ","): a replica of another
# version may know other policies. Records written before names were stored carry only the int8
# "policy" column, an index into the policy order of that time (LEGACY_POLICY_ORDER).
_NAMES = "names"


class StoreUnavailable(Overloaded):
    """The shared decision store cannot be reached: nothing was scored, send the feedback again later."""

    default_headers = {"Retry-After": "5"}


CLAIM_WAIT_S = 0.5  # feedback waits at most this long for this replica's queued writes


class _Pending:
    """A queued record's handle: its ring position once the writer has stored it (None until then, or
    for ever when it was dropped)."""

    __slots__ = ("request_id", "start")

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.start: int | None = None


class RedisDecisionStore:
    QUEUE_LIMIT = 4096  # queued writes (records and shadow updates) before new ones are dropped
    COOLDOWN_S = 2.0  # how long a failing Redis is left alone before one trial call

    def __init__(self, url: str, model: str, capacity: int, ttl_s: float, num_exits: int, trace: bool = False,
                 metrics: Metrics | None = None, timeout_s: float = 2.0):
        import redis  # the `redis` extra; only servers configured for a shared store need it

        self.model = model
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.num_exits = num_exits
        self.trace = trace
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.prefix = f"exitserve:decisions:{model}:"
        self._record = self.client.register_script(_RECORD)
        self._errors = (redis.RedisError, OSError)
        self._up = metrics.decision_store_up.labels(model) if metrics is not None else None
        self._dropped = ({r: metrics.decision_records_dropped.labels(model, r) for r in ("queue_full", "store_down")}
                         if metrics is not None else None)
        if self._up is not None:
            self._up.set(1)
        self.dropped = {"queue_full": 0, "store_down": 0}
        self.breaker = CircuitBreaker(self.COOLDOWN_S, self._changed)
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(self.QUEUE_LIMIT)
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()

    @property
    def state(self) -> str:
        """"up" or "down" (the breaker is open or trying again), for /readyz."""
        return "up" if self.breaker.up else "down"

    def _changed(self, up: bool, exc: BaseException | None) -> None:
        """The breaker's one line per change between up and down (and the gauge)."""
        if self._up is not None:
            self._up.set(1 if up else 0)
        if up:
            log.info("decision store reachable again", extra={"model": self.model, "dropped": dict(self.dropped)})
        else:
            log.warning(f"decision store unavailable ({exc}); decisions are not recorded and feedback is refused "
                        f"with 503 until it answers again (retried every {self.COOLDOWN_S:g} s)",
                        extra={"model": self.model})

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        if self._dropped is not None:
            self._dropped[reason].inc()

    # --- the writer thread ------------------------------------------------------------------------

    def _submit(self, job: Callable[[], None]) -> bool:
        """Queue a write for the writer thread; False (and counted) when the queue is full."""
        if self._writer is None:
            with self._writer_lock:
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write_loop, name=f"decisions-{self.model}", daemon=True)
                    self._writer.start()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._drop("queue_full")
            return False
        return True

    def _write_loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if not self.breaker.allow():
                    self._drop("store_down")
                    continue
                try:
                    job()
                except self._errors as exc:
                    self.breaker.failed(exc)
                    self._drop("store_down")
                except Exception:  # a bug, not the store: logged, the store is not blamed
                    log.exception("recording a decision failed", extra={"model": self.model})
                else:
                    self.breaker.succeeded()
            finally:
                self._queue.task_done()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued write is done (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def close(self) -> None:
        """Stop the writer thread after the writes already queued."""
        if self._writer is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=1.0)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        return int(self.client.zcard(self.prefix + "index"))

    def compatible(self, num_exits: int, trace: bool) -> bool:
        return self.num_exits == num_exits and self.trace == trace

    def _key(self, request_id: str) -> str:
        return f"{self.prefix}req:{request_id}"

    # --- engine threads: queue the write --------------------------------------------------------

    def record(self, request_id: str, policies: np.ndarray, deltas: np.ndarray, class_index: np.ndarray,
               exit_index: np.ndarray, estimate: np.ndarray, target_met: np.ndarray, confidence: np.ndarray | None,
               trace: Trace | None, calibration: str) -> _Pending | None:
        """Queue the record; its handle (for shadow updates), or None when not kept (dropped: counted)."""
        n = len(class_index)
        if not self.enabled or n == 0 or n > self.capacity:
            return None
        codes = _policy_codes(policies)
        columns = {
            "exit": exit_index, "prediction": class_index, "estimate": estimate, "delta": deltas,
            "confidence": np.zeros(n) if confidence is None else confidence,
            "policy": np.full(n, codes) if isinstance(codes, int) else codes, "target_met": target_met,
            "shadow": np.zeros(n),
        }
        fields: list[Any] = ["size", n, "cal", calibration, "at", time.time(), _NAMES, _policy_names(policies)]
        for name, dtype in _COLUMNS.items():
            fields += [name, np.ascontiguousarray(columns[name], dtype=dtype).tobytes()]
        if self.trace and trace is not None:
            fields += self._trace_fields(trace)
        ttl_ms = max(1, int(self.ttl_s * 1000))
        pending = _Pending(request_id)

        def write() -> None:
            start = self._record(keys=[self.prefix + "head", self.prefix + "index", self._key(request_id)],
                                 args=[n, ttl_ms, self.capacity, request_id, self.prefix + "req:", *fields])
            pending.start = int(start)

        return pending if self._submit(write) else None

    @staticmethod
    def _trace_fields(trace: Trace) -> list[Any]:
        return ["trace_c", np.ascontiguousarray(trace.confidence, np.float32).tobytes(),
                "trace_m", np.ascontiguousarray(trace.margin, np.float32).tobytes(),
                "trace_p", np.ascontiguousarray(trace.prediction, np.int32).tobytes()]

    def update_shadow(self, handle: object, rows: np.ndarray, agree: np.ndarray, trace: Trace | None) -> None:
        """Queued after the handle's record, so its ring position is known by the time this runs."""
        assert isinstance(handle, _Pending)
        self._submit(lambda: self._update_shadow(handle, rows, agree, trace))

    def _update_shadow(self, handle: _Pending, rows: np.ndarray, agree: np.ndarray, trace: Trace | None) -> None:
        request_id, start = handle.request_id, handle.start
        if start is None:
            return  # the record was dropped
        key = self._key(request_id)
        raw: list[Any] = self.client.hmget(key, ["start", "size", "shadow", *_TRACE])
        if raw[0] is None or int(raw[0]) != start:
            return  # expired, evicted or overwritten by a newer request with this id
        size = int(raw[1])
        shadow = np.frombuffer(raw[2], np.int8).copy()
        shadow[rows] = np.where(agree, SHADOW_AGREE, SHADOW_DISAGREE)
        fields: dict[str, bytes] = {"shadow": shadow.tobytes()}
        if trace is not None and raw[3] is not None:
            for (name, dtype), blob, source in zip(_TRACE.items(), raw[3:], (trace.confidence, trace.margin, trace.prediction),
                                                   strict=True):
                column = np.frombuffer(blob, dtype).reshape(size, self.num_exits).copy()
                column[rows] = source
                fields[name] = column.tobytes()
        self.client.hset(key, mapping=fields)  # type: ignore[arg-type]

    # --- event loop (via a worker thread) ---------------------------------------------------------------

    def claim(self, wanted: list[tuple[str, int]]) -> list[SampleDecision | str]:
        if self._queue.unfinished_tasks and self.breaker.up:
            self.flush(CLAIM_WAIT_S)  # labels sent right after their answer find its record written
        if not self.breaker.allow():
            raise StoreUnavailable("the shared decision store is unavailable; nothing was scored, "
                                   "send the feedback again later")
        try:
            claims = self._claim(wanted)
        except self._errors as exc:
            self.breaker.failed(exc)
            raise StoreUnavailable(f"the shared decision store is unavailable ({exc}); nothing was scored, "
                                   "send the feedback again later") from None
        self.breaker.succeeded()
        return claims

    def _claim(self, wanted: list[tuple[str, int]]) -> list[SampleDecision | str]:
        ids = list(dict.fromkeys(request_id for request_id, _ in wanted))
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.prefix + "head")
        for request_id in ids:
            pipe.hmget(self._key(request_id), ["start", "size", "cal", *_COLUMNS, *_TRACE, _NAMES])
        head_raw, *rows = pipe.execute()
        oldest_kept = int(head_raw or 0) - self.capacity
        entries = {request_id: raw for request_id, raw in zip(ids, rows, strict=True)
                   if raw[0] is not None and int(raw[0]) >= oldest_kept}
        for position, (request_id, index) in enumerate(wanted):
            raw = entries.get(request_id)
            if raw is not None and index >= int(raw[1]):
                raise UnknownIndex(f"[{position}].index: {index} is out of range; request {request_id!r} "
                                   f"had {int(raw[1])} sample(s)")
        pipe = self.client.pipeline(transaction=False)
        asked = [(request_id, index) for request_id, index in wanted if request_id in entries]
        for request_id, index in asked:
            pipe.hsetnx(self._key(request_id), f"l:{index}", 1)
        won = iter(pipe.execute() if asked else [])  # one HSETNX answer per known item, in order
        decoded: dict[str, dict[str, np.ndarray]] = {}
        out: list[SampleDecision | str] = []
        for request_id, index in wanted:
            raw = entries.get(request_id)
            if raw is None:
                out.append("unknown")
                continue
            if not next(won):
                out.append("duplicate")  # labelled before (or earlier in this call)
                continue
            columns = decoded.get(request_id)
            if columns is None:
                columns = decoded[request_id] = self._decode(raw)
            out.append(self._decision(columns, index, raw[2].decode()))
        return out

    def _decode(self, raw: list) -> dict[str, np.ndarray]:
        size = int(raw[1])
        names = [*_COLUMNS, *_TRACE]
        dtypes = {**_COLUMNS, **_TRACE}
        out: dict[str, np.ndarray] = {}
        stored_names = raw[-1]
        if stored_names is not None:
            listed = stored_names.decode().split(",")
            out[_NAMES] = np.array(listed * size if len(listed) == 1 else listed, dtype=object)
        for name, blob in zip(names, raw[3:-1], strict=True):
            if blob is not None:
                array: np.ndarray = np.frombuffer(blob, dtypes[name])
                out[name] = array.reshape(size, self.num_exits) if name in _TRACE else array
        return out

    def _decision(self, c: dict[str, np.ndarray], index: int, calibration: str) -> SampleDecision:
        trace = None
        if "trace_p" in c:
            seen = c["trace_p"][index] >= 0
            trace = [(float(conf), float(m), int(p)) for conf, m, p, s in zip(
                c["trace_c"][index].tolist(), c["trace_m"][index].tolist(), c["trace_p"][index].tolist(),
                seen.tolist(), strict=True) if s]
        return SampleDecision(
            exit=int(c["exit"][index]), prediction=int(c["prediction"][index]), estimate=float(c["estimate"][index]),
            delta=float(c["delta"][index]),
            policy=str(c[_NAMES][index]) if _NAMES in c else LEGACY_POLICY_ORDER[int(c["policy"][index])],
            target_met=bool(c["target_met"][index]), confidence=float(c["confidence"][index]),
            shadow=int(c["shadow"][index]), calibration=calibration, trace=trace,
        )

    def release(self, claimed: list[tuple[str, int]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for request_id, index in claimed:
            pipe.hdel(self._key(request_id), f"l:{index}")
        try:
            pipe.execute()
        except self._errors as exc:
            self.breaker.failed(exc)
            raise StoreUnavailable(f"the shared decision store is unavailable ({exc})") from None
