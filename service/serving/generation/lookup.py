"""Drafts looked up in the sequence itself (prompt lookup decoding; vLLM's `ngram` speculator), and
in the answers the server gave before (`AnswerHistory`; SuffixDecoding, arXiv 2411.04975).

Greedy text repeats its context: names, phrases and code from the prompt, and its own earlier
sentences; and answers to similar requests repeat each other's phrasing. When the last n tokens
occurred before, the tokens that followed that occurrence are a free draft: no layer runs to make
it, and the verifying pass (every drafted token as one more row of the same layer calls,
memory-bound on a CPU) keeps the prefix the full model agrees with. Exact mode's output stays the
full model's greedy output whatever the draft.
"""

from __future__ import annotations

from collections import Counter
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


class AnswerHistory:
    """The latest answers (at most `capacity` tokens in all), indexed by their n-grams of 2..`max_ngram`
    tokens: drafts for a sequence whose own text has no earlier occurrence of its tail.

    A draft follows the latest `fanout` occurrences of the longest tail that occurred, token by token,
    while at least `agreement` of the occurrences still following agree on the next token: answers
    share openings and phrasing, but one old answer's continuation is mostly wrong (in a simulation
    on held-out chat answers, a draft from every occurrence was kept 14 % of the time, one that needs
    agreement far more often). Used by the engine thread only (drafts in `step`, answers added when
    the scheduler finishes a request). The tokens a draft proposes are verified like any draft, so
    another request's text never reaches an answer; what it changes is how fast an answer comes.
    """

    def __init__(self, capacity: int, max_ngram: int = DEFAULT_NGRAM, *, fanout: int = 16, agreement: float = 0.7):
        self.capacity, self.max_ngram, self.fanout, self.agreement = capacity, max_ngram, fanout, agreement
        self._answers: dict[int, list[int]] = {}  # by id, oldest first (dicts keep insertion order)
        self._index: dict[tuple[int, ...], list[tuple[int, int]]] = {}  # n-gram -> (answer id, position after it)
        self._next_id = 0
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._answers)

    def _ngrams(self, answer: list[int]):
        for n in range(MIN_NGRAM, self.max_ngram + 1):
            for start in range(len(answer) - n):  # only n-grams with a token after them
                yield tuple(answer[start:start + n]), start + n

    def add(self, answer: Sequence[int]) -> None:
        if self.capacity <= 0 or self.max_ngram < MIN_NGRAM or len(answer) <= MIN_NGRAM:
            return
        tokens = list(answer[-self.capacity:])
        key = self._next_id
        self._next_id += 1
        self._answers[key] = tokens
        self.tokens += len(tokens)
        for ngram, after in self._ngrams(tokens):
            entries = self._index.setdefault(ngram, [])
            entries.append((key, after))
            if len(entries) > 2 * self.fanout:  # only the latest `fanout` are read
                del entries[:-self.fanout]
        while self.tokens > self.capacity:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        key, tokens = next(iter(self._answers.items()))
        del self._answers[key]
        self.tokens -= len(tokens)
        for ngram, _ in self._ngrams(tokens):
            entries = self._index.get(ngram)
            if entries is None:
                continue
            entries[:] = [entry for entry in entries if entry[0] != key]
            if not entries:
                del self._index[ngram]

    def draft(self, tokens: Sequence[int], max_tokens: int) -> list[int]:
        """Up to `max_tokens` tokens that the answers agree follow the last n tokens (longest n first)."""
        if max_tokens <= 0 or not self._index:
            return []
        for n in range(min(self.max_ngram, len(tokens)), MIN_NGRAM - 1, -1):
            entries = self._index.get(tuple(tokens[-n:]))
            if not entries:
                continue
            following = [(self._answers[key], after) for key, after in entries[-self.fanout:]]
            draft: list[int] = []
            while following and len(draft) < max_tokens:
                depth = len(draft)
                votes = Counter(answer[after + depth] for answer, after in following if after + depth < len(answer))
                if not votes:
                    break
                token, count = votes.most_common(1)[0]
                if count < self.agreement * len(following):
                    break
                draft.append(token)
                following = [(answer, after) for answer, after in following
                             if after + depth < len(answer) and answer[after + depth] == token]
            if draft:
                return draft
        return []
