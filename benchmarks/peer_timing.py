"""How the peer scripts (`llamacpp_peer.py`, `ortgenai_peer.py`) time greedy decoding, the same way for each.

Standard library only: the peers run in their own environments, without exitserve.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

Timed = tuple[list[int], float, float, float]  # tokens, time of the first, time of the last, tokens/s after the first


def timed(tokens: Iterable[int], new_tokens: int) -> Timed:
    """Take up to `new_tokens` tokens from a generator; decoding tokens/s counts those after the first
    (the prefill excluded), as `benchmarks/llm.py` counts exitserve's."""
    out: list[int] = []
    first_at = 0.0
    for token in tokens:
        now = time.perf_counter()
        if not out:
            first_at = now
        out.append(int(token))
        if len(out) >= new_tokens:
            break
    end = time.perf_counter()
    rate = (len(out) - 1) / (end - first_at) if len(out) > 1 and end > first_at else 0.0
    return out, first_at, end, rate


Greedy = Callable[[Any, list[int], int], Timed]


def one_stream(model: Any, greedy: Greedy, prompts: list[list[int]], new_tokens: int) -> dict:
    """Every prompt in turn after a warm-up; the median of the per-prompt rates."""
    greedy(model, prompts[0], 4)
    rates, outputs = [], []
    for prompt in prompts:
        tokens, _, _, rate = greedy(model, prompt, new_tokens)
        rates.append(rate)
        outputs.append(tokens)
    return {"streams": 1, "prompts": len(prompts), "tokens_per_s_median": statistics.median(rates),
            "rates": rates, "outputs": outputs}


def many_streams(models: list[Any], greedy: Greedy, prompts: list[list[int]], new_tokens: int) -> dict:
    """One thread per model (a model may appear more than once); tokens/s of all streams together,
    from the moment every stream has its first token to the last token."""
    for model in {id(m): m for m in models}.values():
        greedy(model, prompts[0], 2)
    results: list[Timed | None] = [None] * len(models)

    def run(i: int) -> None:
        results[i] = greedy(models[i], prompts[i % len(prompts)], new_tokens)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(len(models))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done = [r for r in results if r is not None]
    start, end = max(r[1] for r in done), max(r[2] for r in done)
    return {"streams": len(models), "tokens_per_s": sum(len(r[0]) - 1 for r in done) / (end - start)}
