"""Dynamic batching: a bounded queue per model, drained by engine threads (never the event loop).

A batch closes at `max_batch_size` samples or `max_queue_delay` after its first request arrived,
whichever comes first. A request larger than the engine batch runs alone, as engine-sized pieces
(its memory is that of one engine batch, not of the whole request at once).

Admission counts work, not requests: a request is refused at once (the HTTP layer answers 503 +
Retry-After) when the samples already waiting would exceed `queue_samples`, or would take longer
than the request timeout at the throughput measured so far; so what is admitted can be answered in
time, and a burst never turns into 504s. A request whose client left, or whose deadline passed, is
dropped (and stops counting) before it is computed. A request whose samples have all left the
network is answered right away, while the rest of its batch goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from exitserve.calibration.document import Deltas
from exitserve.errors import QueueFull, ShuttingDown
from exitserve.service.monitoring.trace import Trace
from exitserve.service.serving.engine import BatchResult, ExitEngine, Flight

log = logging.getLogger("exitserve.batcher")


class Reservation:
    """Room held in a batcher's admission count until the request is queued (or ends); idempotent release."""

    def __init__(self, batcher: DynamicBatcher, samples: int):
        self._batcher: DynamicBatcher | None = batcher
        self.samples = samples

    def release(self) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher._unreserve(self.samples)


@dataclass
class WorkItem:
    x: np.ndarray
    deltas: Deltas  # checked at the protocol's edge (Dataplane.check_deltas)
    policies: np.ndarray
    want_probabilities: np.ndarray | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    request_id: str | None = None  # the key decisions are recorded under, for labelled feedback
    record_slot: object | None = None  # where the decision record put it (set on answer)
    counted: bool = False  # its samples count against admission until it is taken or dropped
    guarded: bool = True  # apply the input guard (the request's `ood_guard`)

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class ItemResult:
    class_index: np.ndarray
    exit_index: np.ndarray
    estimate: np.ndarray
    target_met: np.ndarray
    probabilities: np.ndarray | None
    queue_seconds: float
    confidence: np.ndarray | None = None  # at the answering exit
    promised: np.ndarray | None = None  # the guarded accuracy behind each answer
    reason: np.ndarray | None = None  # uint8 codes: why target_met is False (calibration.reasons)
    trace: Trace | None = None  # every exit the samples passed, when the engine traces


def stack_inputs(arrays: list[np.ndarray]) -> np.ndarray:
    """One batch from several requests' inputs; token-id matrices of different lengths are
    right-padded with 0 (the padding id of the tokenizers exitserve bundles) to the longest."""
    if len(arrays) == 1:
        return arrays[0]
    longest = tuple(max(sizes) for sizes in zip(*(a.shape[1:] for a in arrays), strict=True))
    if all(a.shape[1:] == longest for a in arrays):
        return np.concatenate(arrays)
    out = np.zeros((sum(len(a) for a in arrays), *longest), dtype=arrays[0].dtype)
    row = 0
    for a in arrays:
        out[(slice(row, row + len(a)), *(slice(0, d) for d in a.shape[1:]))] = a
        row += len(a)
    return out


def _settle(future: asyncio.Future, value: object, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _empty_like(part: BatchResult, n: int) -> BatchResult:
    def grow(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.zeros((n, *a.shape[1:]), a.dtype)

    trace = None
    if part.trace is not None:
        width = part.trace.confidence.shape[1]
        trace = Trace.empty(n, width)
    grown = {f.name: grow(getattr(part, f.name)) for f in dataclasses.fields(part) if f.name != "trace"}
    return BatchResult(**grown, trace=trace)  # type: ignore[arg-type]  # the required columns are never None


def _copy_rows(full: BatchResult, part: BatchResult, rows: np.ndarray, offset: int) -> None:
    for f in dataclasses.fields(part):
        source, target = getattr(part, f.name), getattr(full, f.name)
        if f.name == "trace":
            if source is not None and target is not None:
                for column in ("confidence", "margin", "prediction"):
                    getattr(target, column)[rows + offset] = getattr(source, column)[rows]
        elif source is not None and target is not None:
            target[rows + offset] = source[rows]


@dataclass(eq=False)  # compared by identity: its fields hold arrays
class _Run:
    """A batch of requests on its way through the engine."""

    items: list[WorkItem]
    offsets: np.ndarray
    started: float
    x: np.ndarray
    deltas: np.ndarray
    policies: np.ndarray
    want: np.ndarray | None
    on_exit: Callable[[np.ndarray, BatchResult], None]
    guarded: np.ndarray | None = None  # [n] bool where some request turned the input guard off
    result: BatchResult | None = None
    flights: list[Flight] | None = None  # None: above one engine batch, run in pieces
    requests: int = 0  # queued requests it accounts for (cancelled ones included)

    def pending(self) -> list[Flight]:
        return [flight for flight in self.flights or [] if not flight.done]


class WorkQueue:
    """The batcher's bounded FIFO: `queue.Queue`'s put_nowait / get / qsize on a C `SimpleQueue`, whose
    put and blocking get take no Python-level lock or condition (issue 16: a lone request pays the
    hand-off to the engine thread, not the machinery). Stop sentinels (None) go in past the bound."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._items: queue.SimpleQueue[WorkItem | None] = queue.SimpleQueue()
        self._size = 0  # put and not yet taken, sentinels included
        self._lock = threading.Lock()

    def put_nowait(self, item: WorkItem) -> None:
        """queue.Full when `maxsize` items wait."""
        with self._lock:
            if self._size >= self.maxsize:
                raise queue.Full
            self._size += 1
        self._items.put(item)

    def put_stop(self) -> None:
        with self._lock:
            self._size += 1
        self._items.put(None)

    def get(self, timeout: float | None = None) -> WorkItem | None:
        """The next item, waiting up to `timeout` (None: for ever); queue.Empty when none came."""
        item = self._items.get(timeout=timeout)
        with self._lock:
            self._size -= 1
        return item

    def get_nowait(self) -> WorkItem | None:
        item = self._items.get_nowait()
        with self._lock:
            self._size -= 1
        return item

    def qsize(self) -> int:
        return self._size


class BatchObserver(Protocol):
    """What the batcher reports, on engine threads (metrics and monitoring hang here)."""

    def segment_done(self, first: int, last: int, rows: int, seconds: float) -> None:
        """Segments first..last ran (as one fused span when first < last) on `rows` samples."""

    def answered(self, item: WorkItem, result: ItemResult) -> None:
        """Runs before the request's future is settled (the decision is on record when the client reads it)."""

    def batch_done(self, items: list[WorkItem], offsets: np.ndarray, result: BatchResult) -> None:
        """After the whole batch, shadow rows included, has run; `offsets` are the items' first rows."""


class _NoObserver:
    def segment_done(self, first: int, last: int, rows: int, seconds: float) -> None:
        pass

    def answered(self, item: WorkItem, result: ItemResult) -> None:
        pass

    def batch_done(self, items: list[WorkItem], offsets: np.ndarray, result: BatchResult) -> None:
        pass


class DynamicBatcher:
    def __init__(
        self,
        engine: ExitEngine,
        max_batch_size: int,
        max_queue_delay_s: float,
        queue_limit: int,
        workers: int = 1,
        name: str = "model",
        observer: BatchObserver | None = None,
        queue_samples: int | None = None,
        deadline_s: float | None = None,
        continuous: bool = False,
    ):
        self.engine = engine
        self.continuous = continuous  # segment-level continuous batching (see _work_continuous)
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.queue = WorkQueue(queue_limit)
        self.name = name
        self.observer: BatchObserver = observer or _NoObserver()
        work = self._work_continuous if continuous else self._work
        self._threads = [threading.Thread(target=work, name=f"exitserve-{name}-{i}", daemon=True) for i in range(workers)]
        self._in_flight = 0
        self._idle = threading.Condition()
        self._closing = False
        self.queue_samples = queue_samples or 8 * max_batch_size
        self.deadline_s = deadline_s  # admitted work must be answerable within this (the request timeout)
        self._queued_samples = 0
        self._reserved = 0  # samples of requests admitted on their headers, not yet queued
        self._admission = threading.Lock()
        self._throughput: float | None = None  # samples per second, smoothed over recent batches

    # --- producer side (event loop) ---------------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _refuse_unless_room(self, n: int) -> None:
        """Under the admission lock: QueueFull unless `n` more samples fit (a lone request always fits)."""
        waiting = self._queued_samples + self._reserved
        if not waiting:
            return
        if waiting + n > self.queue_samples:
            raise QueueFull(f"queue of model {self.name!r} is full ({waiting} samples waiting, limit {self.queue_samples})")
        if self.deadline_s is not None and self._throughput:
            # Estimated cost: what is queued now must be answered before its deadline.
            wait = (waiting + n) / self._throughput
            if wait > 0.8 * self.deadline_s:
                raise QueueFull(f"queue of model {self.name!r} is full (about {wait:.1f} s of work waiting)")

    def submit(self, item: WorkItem) -> None:
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        n = len(item)
        with self._admission:
            self._refuse_unless_room(n)
            try:
                self.queue.put_nowait(item)
            except queue.Full:
                raise QueueFull(f"queue of model {self.name!r} is full ({self.queue.maxsize} requests)") from None
            self._queued_samples += n
            item.counted = True
        with self._idle:
            self._in_flight += 1

    def reserve(self, n: int) -> Reservation:
        """Hold room for a request of about `n` samples whose body is still to come (QueueFull if none):
        a burst is refused on its headers, before bodies are read, parsed and found not to fit."""
        with self._admission:
            self._refuse_unless_room(n)
            self._reserved += n
        return Reservation(self, n)

    def _unreserve(self, n: int) -> None:
        with self._admission:
            self._reserved -= n

    def check_room(self) -> None:
        """QueueFull when no request could be admitted now."""
        with self._admission:
            self._refuse_unless_room(1)

    def abandon(self, item: WorkItem) -> None:
        """The client left or the deadline passed: the item no longer counts and is skipped, not computed."""
        item.cancelled = True
        self._uncount(item)

    def _uncount(self, item: WorkItem) -> None:
        with self._admission:
            if item.counted:
                item.counted = False
                self._queued_samples -= len(item)

    @property
    def queued_samples(self) -> int:
        return self._queued_samples

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    def close(self, timeout: float) -> bool:
        """Refuse new work, finish what was accepted (up to `timeout`), stop the threads. True if drained."""
        self._closing = True
        deadline = time.monotonic() + timeout
        with self._idle:
            drained = self._idle.wait_for(lambda: self._in_flight == 0, timeout=max(0.0, deadline - time.monotonic()))
        for _ in self._threads:
            self.queue.put_stop()
        for thread in self._threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        return drained

    # --- consumer side (engine threads) -------------------------------------------------------------

    def _next_batch(self, carry: WorkItem | None) -> tuple[list[WorkItem] | None, WorkItem | None]:
        """The next batch, and the request that did not fit in it (it opens this worker's next batch)."""
        first = carry if carry is not None else self.queue.get()
        if first is None:
            return None, None
        self._uncount(first)
        batch, size = [first], len(first)
        carry = None
        deadline = first.enqueued_at + self.max_queue_delay_s
        while size < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0 and not self.queue.qsize():
                break  # nothing to wait for (a lone request, no queue delay): no exception raised and caught
            try:
                item = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self.queue.put_stop()  # let the sentinel stop this thread after the batch
                break
            self._uncount(item)
            if size + len(item) > self.max_batch_size:
                carry = item
                break
            batch.append(item)
            size += len(item)
        return batch, carry

    def _work(self) -> None:
        carry: WorkItem | None = None  # per worker: a shared slot lets two workers overwrite each other's
        while True:
            batch, carry = self._next_batch(carry)
            if batch is None:
                return
            live = self._live(batch)
            try:
                if live:
                    self._run(live)
            except Exception as exc:  # a failed batch answers its requests with the error, the thread lives on
                self._fail(live, exc)
            finally:
                self._done(len(batch))

    def _live(self, batch: list[WorkItem]) -> list[WorkItem]:
        """The requests of a batch still worth computing: the client is there and the deadline not passed
        (a request past it has been answered 504 already, or soon will be)."""
        now = time.perf_counter()
        for item in batch:
            if self.deadline_s is not None and now - item.enqueued_at > self.deadline_s:
                item.cancelled = True
        return [item for item in batch if not item.cancelled]

    def _run(self, items: list[WorkItem]) -> None:
        run = self._start(items)
        if run.flights is None:
            self._run_pieces(run)
            return
        for flight in run.flights:
            while not flight.done:
                self.engine.advance([flight], self.observer.segment_done)
        self._finish(run)

    def _start(self, items: list[WorkItem]) -> _Run:
        """One batch of requests, ready to advance: its result fills as samples leave, and each
        request is answered the moment its last sample has."""
        started = time.perf_counter()
        if len(items) == 1:  # a lone request: its own arrays, nothing to stack or to attribute
            item = items[0]
            x, deltas, policies, want = item.x, item.deltas, item.policies, item.want_probabilities
            guarded = None if item.guarded else np.zeros(len(item), bool)
            offsets = np.array([0, len(item)])
            left = [len(item)]

            def on_exit(rows: np.ndarray, result: BatchResult) -> None:
                left[0] -= len(rows)
                if left[0] == 0:
                    self._answer(item, result, 0, len(item), started)
        else:
            sizes = np.array([len(i) for i in items])
            offsets = np.concatenate([[0], np.cumsum(sizes)])
            remaining = sizes.copy()
            owner = np.repeat(np.arange(len(items)), sizes)
            x = stack_inputs([i.x for i in items])
            deltas = Deltas.join([i.deltas for i in items])
            policies = np.concatenate([i.policies for i in items])
            guarded = None if all(i.guarded for i in items) else np.repeat([i.guarded for i in items], sizes)
            want = None
            if any(i.want_probabilities is not None for i in items):
                want = np.concatenate([
                    i.want_probabilities if i.want_probabilities is not None else np.zeros(len(i), bool) for i in items
                ])

            def on_exit(rows: np.ndarray, result: BatchResult) -> None:
                for index, count in zip(*np.unique(owner[rows], return_counts=True), strict=True):
                    remaining[index] -= count
                    if remaining[index] == 0:
                        self._answer(items[index], result, offsets[index], offsets[index + 1], started)

        run = _Run(items, offsets, started, x, deltas, policies, want, on_exit, guarded)
        if len(x) <= self.max_batch_size:
            run.result, run.flights = self.engine.start(x, deltas, policies, want, on_exit, guarded)
        return run

    def _finish(self, run: _Run) -> None:
        rate = len(run.x) / max(time.perf_counter() - run.started, 1e-6)
        self._throughput = rate if self._throughput is None else 0.8 * self._throughput + 0.2 * rate
        assert run.result is not None
        self.observer.batch_done(run.items, run.offsets, run.result)

    # --- segment-level continuous batching ------------------------------------------------------

    def _work_continuous(self) -> None:
        """Batches advance segment by segment, and flights of different batches that wait at the same
        segment run together: the survivors of one batch fill up with the next batch's samples, so each
        segment runs batches as full as the queue allows (on a GPU a shrunken batch wastes the device).

        Each step runs the segment where most rows wait (ties: the deepest, to finish old work first),
        at most one engine batch of them; new requests are taken only while no more than an engine
        batch waits at the input, so a burst cannot starve the rows already inside the network."""
        runs: list[_Run] = []
        carry: WorkItem | None = None
        while True:
            if not runs:
                batch, carry = self._next_batch(carry)
                if batch is None:
                    return
                self._launch(batch, runs)
            else:
                waiting_at_input = sum(len(f.active) for run in runs for f in run.pending() if f.position == 0)
                if waiting_at_input < self.max_batch_size:
                    batch, carry, stop = self._take_queued(carry, self.max_batch_size - waiting_at_input)
                    if batch:
                        self._launch(batch, runs)
                    if stop:  # shutting down: finish what is inside, then stop
                        self._drain(runs)
                        return
            if runs:
                try:
                    self._step(runs)
                except Exception as exc:  # a bug must not kill the worker and strand every request inside
                    for run in runs:
                        self._fail(run.items, exc)
                        self._done(run.requests)
                    runs.clear()

    def _take_queued(self, carry: WorkItem | None, room: int) -> tuple[list[WorkItem], WorkItem | None, bool]:
        """Requests already queued, up to `room` samples, without waiting: (batch, carry, stop seen)."""
        batch: list[WorkItem] = []
        size = 0
        while size < room:
            if carry is not None:
                item, carry = carry, None
            else:
                try:
                    queued = self.queue.get_nowait()
                except queue.Empty:
                    break
                if queued is None:
                    return batch, None, True
                item = queued
                self._uncount(item)
            if batch and size + len(item) > room:
                return batch, item, False
            batch.append(item)
            size += len(item)
        return batch, carry, False

    def _launch(self, batch: list[WorkItem], runs: list[_Run]) -> None:
        live = self._live(batch)
        try:
            run = self._start(live) if live else None
            if run is not None and run.flights is None:  # above one engine batch: alone, in pieces
                self._run_pieces(run)
                run = None
        except Exception as exc:
            self._fail(live, exc)
            run = None
        if run is None:
            self._done(len(batch))
        else:
            run.requests = len(batch)
            runs.append(run)

    def _step(self, runs: list[_Run]) -> None:
        groups: dict[tuple, list[Flight]] = {}
        for run in runs:
            for flight in run.pending():
                groups.setdefault((flight.position, flight.shape_key()), []).append(flight)
        fullest = max(groups, key=lambda key: (sum(len(f.active) for f in groups[key]), key[0]))
        chosen: list[Flight] = []
        rows = 0
        for flight in groups[fullest]:
            if chosen and rows + len(flight.active) > self.max_batch_size:
                break
            chosen.append(flight)
            rows += len(flight.active)
        try:
            self.engine.advance(chosen, self.observer.segment_done)
        except Exception as exc:  # the runs of the failed step answer with the error, the others go on
            failed = [run for run in runs if any(f in chosen for f in run.flights or [])]
            for run in failed:
                runs.remove(run)
                self._fail(run.items, exc)
                self._done(run.requests)
            return
        for run in [run for run in runs if not run.pending()]:
            runs.remove(run)
            self._finish(run)
            self._done(run.requests)

    def _drain(self, runs: list[_Run]) -> None:
        while runs:
            self._step(runs)

    def _fail(self, items: list[WorkItem], exc: Exception) -> None:
        log.exception("batch failed on model %s", self.name, exc_info=exc)
        for item in items:
            item.loop.call_soon_threadsafe(_settle, item.future, None, exc)

    def _done(self, requests: int) -> None:
        with self._idle:
            self._in_flight -= requests
            self._idle.notify_all()

    def _run_pieces(self, run: _Run) -> None:
        """A request above the engine batch, start to finish, as engine-sized pieces whose answers are
        gathered into one result; memory is that of one piece."""
        x, deltas, policies, want, on_exit = run.x, run.deltas, run.policies, run.want, run.on_exit
        n, step = len(x), self.max_batch_size
        full: BatchResult | None = None
        for lo in range(0, n, step):
            hi = min(n, lo + step)

            def piece_exit(rows: np.ndarray, part: BatchResult, lo: int = lo) -> None:
                nonlocal full
                full = full if full is not None else _empty_like(part, n)
                _copy_rows(full, part, rows, lo)
                on_exit(rows + lo, full)

            part = self.engine.run(x[lo:hi], deltas[lo:hi], policies[lo:hi], None if want is None else want[lo:hi],
                                   on_exit=piece_exit, segment_timer=self.observer.segment_done,
                                   guarded=None if run.guarded is None else run.guarded[lo:hi])
            full = full if full is not None else _empty_like(part, n)
            _copy_rows(full, part, np.arange(hi - lo), lo)  # shadow rows finish after their answer
        assert full is not None
        run.result = full
        self._finish(run)

    def _answer(self, item: WorkItem, result: BatchResult, lo: int, hi: int, batch_started: float) -> None:
        # One engine run that is all this request's, with no shadow rows: nothing writes to it any more,
        # so the answer takes its arrays as they are; otherwise its own copies of its rows.
        whole = lo == 0 and hi == len(result.class_index) <= self.max_batch_size and result.shadow_prediction is None

        def rows(a: np.ndarray) -> np.ndarray:
            return a if whole else a[lo:hi].copy()

        trace = result.trace
        value = ItemResult(
            class_index=rows(result.class_index),
            exit_index=rows(result.exit_index),
            estimate=rows(result.estimate),
            target_met=rows(result.target_met),
            probabilities=None if result.probabilities is None else rows(result.probabilities),
            queue_seconds=batch_started - item.enqueued_at,
            confidence=rows(result.confidence),
            promised=rows(result.promised),
            reason=rows(result.reason),
            trace=trace if trace is None or whole else trace.rows(slice(lo, hi)),
        )
        self.observer.answered(item, value)
        item.loop.call_soon_threadsafe(_settle, item.future, value, None)
