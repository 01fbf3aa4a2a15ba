"""Token-id helpers shared by training, offline evaluation and serving (numpy only, no torch)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_SEQUENCE_LENGTH = 256  # all-MiniLM-L6-v2 was trained on up to 256 tokens (sentence_bert_config.json)


def token_ids(tokenizer, texts: Sequence[str], max_length: int = MAX_SEQUENCE_LENGTH) -> list[list[int]]:  # noqa: ANN001
    """Token ids per text (`tokenizer` a `tokenizers.Tokenizer` with padding and truncation off),
    cut to max_length keeping the final [SEP]: training and offline reports only; the server refuses
    over-long inputs instead."""
    out = []
    for encoding in tokenizer.encode_batch(list(texts)):
        ids = encoding.ids
        out.append(ids if len(ids) <= max_length else [*ids[: max_length - 1], ids[-1]])
    return out


def pad_batch(rows: list[list[int]], pad_id: int = 0) -> np.ndarray:
    longest = max(len(r) for r in rows)
    out = np.full((len(rows), longest), pad_id, np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def length_batches(lengths: np.ndarray, max_tokens: int = 8192) -> list[np.ndarray]:
    """Indices grouped by length (shortest first), each batch at most max_tokens once padded,
    so that padding wastes little work."""
    order = np.argsort(lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    for end in range(1, len(order) + 1):
        # sorted ascending, so the batch's padded length is that of its last member
        if end == len(order) or (end + 1 - start) * int(lengths[order[end]]) > max_tokens:
            batches.append(order[start:end])
            start = end
    return batches
