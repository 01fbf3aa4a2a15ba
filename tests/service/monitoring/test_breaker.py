"""The decision store's circuit breaker: refuses at once while open, one trial after the cooldown,
one report per change between up and down (not per failure)."""

from __future__ import annotations

import time

from exitserve.service.monitoring.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


def test_open_trial_and_close_report_once_each_way() -> None:
    changes: list[bool] = []
    breaker = CircuitBreaker(cooldown_s=0.05, on_change=lambda up, _: changes.append(up))
    assert breaker.allow() and breaker.state == CLOSED
    breaker.failed(OSError("refused"))
    breaker.failed(OSError("refused again"))
    assert breaker.state == OPEN and not breaker.up and not breaker.allow()
    time.sleep(0.06)
    assert breaker.allow() and breaker.state == HALF_OPEN
    assert not breaker.allow()  # one trial at a time
    breaker.failed(TimeoutError("still hung"))  # the trial failed: open again, no new report
    assert breaker.state == OPEN and not breaker.allow()
    time.sleep(0.06)
    assert breaker.allow()
    breaker.succeeded()
    breaker.succeeded()
    assert breaker.state == CLOSED and breaker.up and breaker.allow()
    assert changes == [False, True]
