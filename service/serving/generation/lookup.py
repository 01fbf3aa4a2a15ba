"""Drafts looked up in the sequence itself (prompt lookup decoding; vLLM's `ngram` speculator).

Greedy text repeats its context: names, phrases and code from the prompt, and its own earlier
sentences. When the last n tokens occurred before, the tokens that followed that occurrence are a
free draft: no layer runs to make it, and the verifying pass (every drafted token as one more row of
the same layer calls, memory-bound on a CPU) keeps the prefix the full model agrees with. Exact
mode's output stays the full model's greedy output whatever the draft.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from exitserve.service.settings import DEFAULT_LOOKUP_NGRAM as DEFAULT_NGRAM

MIN_NGRAM = 2  # one matching token proposes too much that the model then rejects


def lookup_draft(tokens: Sequence[int], max_tokens: int, max_ngram: int = DEFAULT_NGRAM) -> list[int]:
    """Up to `max_tokens` tokens that followed the latest earlier occurrence of the last n tokens,
    for the longest n from `max_ngram` down to 2 that occurred; [] when none did."""
    if max_tokens <= 0 or max_ngram < MIN_NGRAM or len(tokens) <= MIN_NGRAM:
        return []
    ids = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_ngram, len(ids) - 1), MIN_NGRAM - 1, -1):
        tail = ids[-n:]
        # starts of earlier windows equal to the tail (the tail itself excluded)
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
        starts = np.flatnonzero((windows == tail).all(axis=1))
        if starts.size:
            follow = int(starts[-1]) + n
            return ids[follow:follow + max_tokens].tolist()
    return []
