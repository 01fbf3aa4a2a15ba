"""Dynamic batching: a bounded queue per model, drained by engine threads (never the event loop).

A batch closes at `max_batch_size` samples or `max_queue_delay` after its first request arrived,
whichever comes first; requests are never split. A full queue rejects at once (the HTTP layer
answers 503 + Retry-After) instead of growing memory. A request whose samples have all left the
network is answered right away, while the rest of its batch goes on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from exitserve.errors import Overloaded
from exitserve.service.monitoring.trace import Trace
from exitserve.service.serving.engine import BatchResult, ExitEngine

log = logging.getLogger("exitserve.batcher")


class QueueFull(Overloaded):
    pass


class ShuttingDown(Overloaded):
    default_headers = {"Retry-After": "5"}


@dataclass
class WorkItem:
    x: np.ndarray
    deltas: np.ndarray
    policies: np.ndarray
    want_probabilities: np.ndarray | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    request_id: str | None = None  # the key decisions are recorded under, for labelled feedback
    record_slot: int | None = None  # where the decision record put it (set on answer)

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


class BatchObserver(Protocol):
    """What the batcher reports, on engine threads (metrics and monitoring hang here)."""

    def segment_done(self, segment: int, seconds: float) -> None: ...

    def answered(self, item: WorkItem, result: ItemResult) -> None:
        """Runs before the request's future is settled (the decision is on record when the client reads it)."""

    def batch_done(self, items: list[WorkItem], offsets: np.ndarray, result: BatchResult, seconds: float) -> None:
        """After the whole batch, shadow rows included, has run; `offsets` are the items' first rows."""


class _NoObserver:
    def segment_done(self, segment: int, seconds: float) -> None:
        pass

    def answered(self, item: WorkItem, result: ItemResult) -> None:
        pass

    def batch_done(self, items: list[WorkItem], offsets: np.ndarray, result: BatchResult, seconds: float) -> None:
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
    ):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.queue: queue.Queue[WorkItem | None] = queue.Queue(maxsize=queue_limit)
        self.name = name
        self.observer: BatchObserver = observer or _NoObserver()
        self._threads = [threading.Thread(target=self._work, name=f"exitserve-{name}-{i}", daemon=True) for i in range(workers)]
        self._in_flight = 0
        self._idle = threading.Condition()
        self._closing = False

    # --- producer side (event loop) ---------------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, item: WorkItem) -> None:
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            raise QueueFull(f"queue of model {self.name!r} is full ({self.queue.maxsize} requests)") from None
        with self._idle:
            self._in_flight += 1

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
            try:
                self.queue.put(None, timeout=1.0)
            except queue.Full:
                break
        for thread in self._threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        return drained

    # --- consumer side (engine threads) -------------------------------------------------------------

    def _next_batch(self, carry: WorkItem | None) -> tuple[list[WorkItem] | None, WorkItem | None]:
        """The next batch, and the request that did not fit in it (it opens this worker's next batch)."""
        first = carry if carry is not None else self.queue.get()
        if first is None:
            return None, None
        batch, size = [first], len(first)
        carry = None
        deadline = first.enqueued_at + self.max_queue_delay_s
        while size < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                item = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self.queue.put(None)  # let the sentinel stop this thread after the batch
                break
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
            live = [item for item in batch if not item.cancelled]
            try:
                if live:
                    self._run(live)
            except Exception as exc:  # a failed batch answers its requests with the error, the thread lives on
                log.exception("batch failed on model %s", self.name)
                for item in live:
                    item.loop.call_soon_threadsafe(_settle, item.future, None, exc)
            finally:
                with self._idle:
                    self._in_flight -= len(batch)
                    self._idle.notify_all()

    def _run(self, items: list[WorkItem]) -> None:
        started = time.perf_counter()
        sizes = np.array([len(i) for i in items])
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        owner = np.repeat(np.arange(len(items)), sizes)
        remaining = sizes.copy()
        x = stack_inputs([i.x for i in items])
        deltas = np.concatenate([i.deltas for i in items])
        policies = np.concatenate([i.policies for i in items])
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

        result = self.engine.run(x, deltas, policies, want, on_exit=on_exit, segment_timer=self.observer.segment_done)
        self.observer.batch_done(items, offsets, result, time.perf_counter() - started)

    def _answer(self, item: WorkItem, result: BatchResult, lo: int, hi: int, batch_started: float) -> None:
        value = ItemResult(
            class_index=result.class_index[lo:hi].copy(),
            exit_index=result.exit_index[lo:hi].copy(),
            estimate=result.estimate[lo:hi].copy(),
            target_met=result.target_met[lo:hi].copy(),
            probabilities=None if result.probabilities is None else result.probabilities[lo:hi].copy(),
            queue_seconds=batch_started - item.enqueued_at,
            confidence=None if result.confidence is None else result.confidence[lo:hi].copy(),
            trace=None if result.trace is None else result.trace.rows(slice(lo, hi)),
        )
        self.observer.answered(item, value)
        item.loop.call_soon_threadsafe(_settle, item.future, value, None)
