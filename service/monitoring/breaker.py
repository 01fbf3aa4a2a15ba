"""A circuit breaker for a shared store that may fail or hang (issue 30).

Closed: calls go through. A failure opens it: every call is refused at once (no socket touched) for
`cooldown_s`; then one trial call goes through (half-open), and its outcome closes the breaker or
opens it for another cooldown. `on_change(up, why)` runs once per change between up and down, not
per call nor per failed trial, so a long outage writes one line and a recovery another.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    def __init__(self, cooldown_s: float = 2.0, on_change: Callable[[bool, BaseException | None], None] | None = None):
        self.cooldown_s = cooldown_s
        self._on_change = on_change
        self._state = CLOSED
        self._opened_at = 0.0
        self._trial_at: float | None = None  # when the half-open trial started (None: no trial out)
        self._lock = threading.Lock()

    @property
    def up(self) -> bool:
        """False from the first failure until a call succeeds again."""
        return self._state == CLOSED

    @property
    def state(self) -> str:
        return self._state

    def allow(self) -> bool:
        """Whether a call may go to the store now; True also for the one trial of a half-open breaker."""
        if self._state == CLOSED:
            return True
        now = time.monotonic()
        with self._lock:
            if self._state == CLOSED:
                return True
            # A trial that never reported back (its thread died) does not block the store for ever.
            stale = self._trial_at is not None and now - self._trial_at > 10 * self.cooldown_s
            if now - self._opened_at >= self.cooldown_s and (self._trial_at is None or stale):
                self._state = HALF_OPEN
                self._trial_at = now
                return True
            return False

    def succeeded(self) -> None:
        if self._state == CLOSED:
            return
        with self._lock:
            changed = self._state != CLOSED
            self._state, self._trial_at = CLOSED, None
        if changed and self._on_change is not None:
            self._on_change(True, None)

    def failed(self, exc: BaseException | None = None) -> None:
        with self._lock:
            changed = self._state == CLOSED
            self._state, self._opened_at, self._trial_at = OPEN, time.monotonic(), None
        if changed and self._on_change is not None:
            self._on_change(False, exc)
