"""What a generation request and its token stream are (torch-free: the HTTP layer imports this)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["full", "early", "exact"]


@dataclass
class TokenOut:
    token: int
    exit: int  # exit index that produced it (the last exit: the full model)
    drafted: bool = False  # an accepted draft (exact mode)
    rejected: int = 0  # exact mode, on the full model's token that ends a verification: drafts it discarded
    # the exit's table promised agreement >= δ with the full model's greedy token (the full model's
    # own tokens, and exact mode's, agree by definition)
    target_met: bool = True


MAX_DRAFT = 8  # drafts in flight per sequence (exact mode's, lookup's)


@dataclass
class GenerationParams:
    prompt: list[int]
    max_tokens: int
    mode: Mode = "early"
    delta: float = 0.9
    policy: str = "pcee"
    temperature: float = 0.0
    seed: int | None = None
    max_draft: int = MAX_DRAFT
    stop_ids: frozenset[int] = frozenset()


@dataclass
class TokenEvent:
    tokens: list[TokenOut]
    finish_reason: str | None = None  # "stop", "length", "error: ..." on the last event


@dataclass
class TokenStream:
    """What the HTTP layer reads: events in order, then one with a finish_reason."""

    params: GenerationParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    generated: int = 0
    drafted: int = 0
    accepted: int = 0

    def cancel(self) -> None:
        self.cancelled.set()

    def _push(self, event: TokenEvent) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
