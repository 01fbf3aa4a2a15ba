"""The batcher in process: one observer sees every segment, answer and batch; overload and shutdown are 503s."""

from __future__ import annotations

import asyncio
import queue as stdlib_queue
import threading
from pathlib import Path

import numpy as np
import pytest

from exitserve.calibration import Calibration
from exitserve.errors import Overloaded
from exitserve.models.bundle import load_bundle
from exitserve.models.data import load_dataset
from exitserve.service.runners.onnx_runtime import OnnxRunner
from exitserve.service.serving.batcher import (
    DynamicBatcher,
    ItemResult,
    QueueFull,
    ShuttingDown,
    WorkItem,
    WorkQueue,
)
from exitserve.service.serving.engine import BatchResult, ExitEngine


class RecordingObserver:
    """A real BatchObserver that keeps what it is told, and checks the order the batcher promises."""

    def __init__(self) -> None:
        self.segments: list[int] = []
        self.answers: list[tuple[str | None, int, bool]] = []
        self.batches: list[tuple[list[int], list[int]]] = []

    def segment_done(self, first: int, last: int, rows: int, seconds: float) -> None:
        assert seconds >= 0 and rows > 0 and first <= last
        self.segments.extend(range(first, last + 1))

    def answered(self, item: WorkItem, result: ItemResult) -> None:
        # Called before the future is settled: the client never sees an answer that is not on record.
        self.answers.append((item.request_id, len(result.exit_index), item.future.done()))

    def batch_done(self, items: list[WorkItem], offsets: np.ndarray, result: BatchResult) -> None:
        self.batches.append(([len(i) for i in items], offsets.tolist()))
        assert len(result.exit_index) == offsets[-1]


@pytest.fixture(scope="module")
def engine(digits_bundle: Path) -> ExitEngine:
    bundle = load_bundle(digits_bundle)
    return ExitEngine(OnnxRunner(bundle), Calibration.from_dict(bundle.calibration, bundle.manifest.num_exits))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_dataset("digits:test").x[:32]


def _item(loop: asyncio.AbstractEventLoop, x: np.ndarray, request_id: str) -> WorkItem:
    return WorkItem(x=x, deltas=np.full(len(x), 0.9), policies=np.full(len(x), "pcee", dtype=object),
                    want_probabilities=None, loop=loop, future=loop.create_future(), request_id=request_id)


def test_one_observer_sees_segments_answers_and_batches(engine: ExitEngine, images: np.ndarray) -> None:
    observer = RecordingObserver()
    batcher = DynamicBatcher(engine, max_batch_size=64, max_queue_delay_s=0.05, queue_limit=8, observer=observer)

    async def main() -> list[ItemResult]:
        loop = asyncio.get_running_loop()
        items = [_item(loop, images[i * 8 : (i + 1) * 8], f"r{i}") for i in range(4)]
        for item in items:
            batcher.submit(item)  # all queued before the worker starts: one batch of 32
        batcher.start()
        return await asyncio.gather(*(item.future for item in items))

    results = asyncio.run(main())
    assert batcher.close(5.0)
    assert [len(r.exit_index) for r in results] == [8, 8, 8, 8]
    assert sorted(a[0] for a in observer.answers) == ["r0", "r1", "r2", "r3"]
    assert not any(done for _, _, done in observer.answers)
    assert observer.batches == [([8, 8, 8, 8], [0, 8, 16, 24, 32])]
    assert observer.segments[0] == 0 and set(observer.segments) <= set(range(engine.runner.num_exits))


def test_a_full_queue_and_a_closed_batcher_are_503s(engine: ExitEngine, images: np.ndarray) -> None:
    batcher = DynamicBatcher(engine, max_batch_size=8, max_queue_delay_s=0.0, queue_limit=1)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        batcher.submit(_item(loop, images[:1], "a"))  # no worker yet: it stays queued
        with pytest.raises(QueueFull) as full:
            batcher.submit(_item(loop, images[:1], "b"))
        assert isinstance(full.value, Overloaded) and full.value.status == 503
        assert full.value.headers["Retry-After"] == "1"
        batcher.start()
        assert batcher.close(5.0)
        with pytest.raises(ShuttingDown) as closed:
            batcher.submit(_item(loop, images[:1], "c"))
        assert closed.value.status == 503 and closed.value.headers["Retry-After"] == "5"

    asyncio.run(main())


def test_work_queue_is_a_bounded_fifo_whose_stop_sentinels_always_fit() -> None:
    work = WorkQueue(2)
    first, second = object(), object()
    work.put_nowait(first)  # type: ignore[arg-type]
    work.put_nowait(second)  # type: ignore[arg-type]
    with pytest.raises(stdlib_queue.Full):
        work.put_nowait(object())  # type: ignore[arg-type]
    work.put_stop()  # shutting down must not block or fail on a full queue
    assert work.qsize() == 3
    assert work.get() is first and work.get_nowait() is second and work.get() is None
    assert work.qsize() == 0
    with pytest.raises(stdlib_queue.Empty):
        work.get_nowait()
    with pytest.raises(stdlib_queue.Empty):
        work.get(timeout=0.01)
    later = object()
    threading.Timer(0.05, work.put_nowait, [later]).start()
    assert work.get(timeout=5) is later  # a blocked get wakes for a put from another thread
