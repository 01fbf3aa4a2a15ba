"""Iteration-level (continuous) batching: one engine thread steps every running sequence together.

A request joins at the next step (its prefill rides along with the others' decode rows), a
finished or cancelled one leaves at once, and at most `max_running` sequences share a step; the
rest wait in a bounded queue (`submit` raises `QueueFull` when it is full: the HTTP layer answers
503 + Retry-After). Each request gets a `TokenStream`: the engine thread pushes token events to it
through the event loop (thread-safe), and cancelling it (client gone, stop string) drops the
sequence before the next step.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass

import torch

from exitserve.errors import QueueFull, ShuttingDown
from exitserve.service.serving.generation.decoder import MultiExitDecoder, Sequence
from exitserve.service.serving.generation.metrics import GenerationMetrics
from exitserve.service.serving.generation.stream import (
    GenerationParams,
    TokenEvent,
    TokenOut,
    TokenStream,
)

log = logging.getLogger("exitserve.generation")


@dataclass
class _Running:
    stream: TokenStream
    sequence: Sequence
    last_token_at: float | None = None


class Scheduler:
    def __init__(self, decoder: MultiExitDecoder, metrics: GenerationMetrics, *, max_running: int = 16,
                 queue_limit: int = 64, model: str = "model"):
        self.decoder = decoder
        self.metrics = metrics
        self.max_running = max_running
        self.queue_limit = queue_limit
        self.model = model
        self._waiting: collections.deque[TokenStream] = collections.deque()
        self._running: list[_Running] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"generation-{self.model}", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> bool:
        """Stop admitting; let running sequences finish for up to `timeout` seconds."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    # --- requests -------------------------------------------------------------------------------

    def submit(self, params: GenerationParams, loop: asyncio.AbstractEventLoop) -> TokenStream:
        stream = TokenStream(params, loop)
        with self._wake:
            if self._closed:
                raise ShuttingDown("overloaded: the server is shutting down")
            if len(self._waiting) >= self.queue_limit:
                raise QueueFull(f"overloaded: {len(self._waiting)} requests are waiting (limit {self.queue_limit})")
            self._waiting.append(stream)
            self.metrics.waiting.set(len(self._waiting))
            self._wake.notify()
        return stream

    # --- the engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._running and not self._closed:
                    self._wake.wait()
                if self._closed and not self._running:
                    for stream in self._waiting:
                        stream._push(TokenEvent([], "error: the server is shutting down"))
                    self._waiting.clear()
                    return
                self._admit()
            self._drop_cancelled()
            if not self._running:
                continue
            try:
                gained = self.decoder.step([r.sequence for r in self._running])
            except Exception as exc:  # a failing step must not kill the engine thread
                log.exception("generation step failed")
                for r in self._running:
                    r.stream._push(TokenEvent([], f"error: {type(exc).__name__}: {exc}"))
                    self.decoder.release(r.sequence)
                self._running.clear()
                continue
            now = time.perf_counter()
            self._deliver(gained, now)
            self.metrics.running.set(len(self._running))

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_running and not self._closed:
            stream = self._waiting.popleft()
            if stream.cancelled.is_set():
                continue
            p = stream.params
            generator = torch.Generator()
            if p.seed is not None:
                generator.manual_seed(p.seed)
            else:
                generator.seed()  # a fresh nondeterministic seed per request
            capacity = len(p.prompt) + p.max_tokens + p.max_draft + 2
            sequence = self.decoder.new_sequence(p.prompt, capacity, mode=p.mode, delta=p.delta, policy=p.policy,
                                                 temperature=p.temperature, max_draft=p.max_draft, generator=generator)
            self._running.append(_Running(stream, sequence))
        self.metrics.waiting.set(len(self._waiting))

    def _drop_cancelled(self) -> None:
        kept = [r for r in self._running if not r.stream.cancelled.is_set()]
        if len(kept) != len(self._running):
            self.metrics.cancelled.inc(len(self._running) - len(kept))
            for r in self._running:
                if r.stream.cancelled.is_set():
                    self.decoder.release(r.sequence)
        self._running = kept
        self.metrics.running.set(len(kept))

    def _deliver(self, gained: list[list[TokenOut]], now: float) -> None:
        still = []
        last_exit = len(self.decoder.exit_layers) - 1
        for running, tokens in zip(self._running, gained, strict=True):
            stream, params = running.stream, running.stream.params
            finish = None
            kept: list[TokenOut] = []
            for t in tokens:
                kept.append(t)
                stream.generated += 1
                if t.token in params.stop_ids:
                    finish = "stop"
                    break
                if stream.generated >= params.max_tokens:
                    finish = "length"
                    break
            # drafts count as far as the answer goes: none past its end token or its token limit
            accepted = sum(t.drafted for t in kept)
            stream.accepted += accepted
            stream.drafted += accepted + sum(t.rejected for t in kept)
            if kept:
                if running.last_token_at is None:
                    self.metrics.ttft.observe(now - stream.submitted)
                else:
                    gap = (now - running.last_token_at) / len(kept)
                    for _ in kept:
                        self.metrics.inter_token.observe(gap)
                running.last_token_at = now
                self.metrics.observe_tokens(kept, self.decoder.compute_fractions, last_exit)
            stream._push(TokenEvent(kept, finish))
            if finish is None:
                still.append(running)
            else:
                self.metrics.observe_drafts(stream.drafted, stream.accepted)
                self.decoder.remember(running.sequence)
                self.decoder.release(running.sequence)
        self._running = still
