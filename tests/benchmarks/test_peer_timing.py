"""The peers' timing (`benchmarks/peer_timing.py`): tokens/s counts decoding after the first token, as
`benchmarks/llm.py` counts exitserve's, and stops at the asked number of tokens."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from peer_timing import many_streams, one_stream, timed  # noqa: E402


def paced(count: int, pause: float, first_pause: float = 0.0):
    """A token every `pause` seconds after a slow first one (a prefill)."""
    time.sleep(first_pause)
    for token in range(count):
        if token:
            time.sleep(pause)
        yield token


def test_timed_stops_at_the_asked_tokens_and_leaves_the_first_out_of_the_rate() -> None:
    began = time.perf_counter()
    tokens, first_at, end, rate = timed(paced(100, 0.01, first_pause=0.2), 11)
    assert tokens == list(range(11))
    # sleeps never end early: the window starts after the 0.2 s "prefill" and holds ten pauses
    assert first_at - began >= 0.2 and end - first_at >= 0.1
    assert rate == 10 / (end - first_at) <= 100
    assert timed(iter([]), 5)[0] == [] and timed(iter([7]), 5)[3] == 0.0  # nothing to time


def greedy(model: float, prompt: list[int], new_tokens: int):
    return timed(paced(new_tokens, model), new_tokens)


def test_one_stream_takes_the_median_and_many_streams_add_up() -> None:
    one = one_stream(0.002, greedy, [[1], [2], [3]], 6)
    assert one["prompts"] == 3 and len(one["rates"]) == 3 and one["outputs"] == [list(range(6))] * 3
    assert sorted(one["rates"])[1] == one["tokens_per_s_median"]
    together = many_streams([0.01, 0.01, 0.01], greedy, [[1]], 6)
    assert together["streams"] == 3
    # from the last first token to the last token: at least one stream's five pauses
    assert 0 < together["tokens_per_s"] <= 3 * 5 / 0.05
