"""Exit heads of a generation bundle: a small residual MLP per exit over a restricted vocabulary.

Why restricted: decoding is memory-bound, and the full LM head (vocabulary x width, a fifth of
SmolLM2-135M's weights) costs as much as ~7 layers per call, so an exit check through it would eat
the savings. Each head instead projects onto the rows of the (frozen, tied) embedding for the K
tokens the full model predicts most often on training text; a token outside them is never drafted
there (the reliability tables count it as a disagreement). The rows are shared by every head, so
the bundle stores only their token ids.

Calibration class space (K + 1 columns): columns 0..K-1 are the head vocabulary, column K stands
for "a token outside it". Early exits give column K a logit of OUTSIDE_LOGIT (never chosen, no
probability mass); the last exit (the full model itself) is represented one-hot at its token's
column, so the self-supervised tables count agreement with the full model's token exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from exitserve.models.llm.llama import LlamaModel, RMSNorm

OUTSIDE_LOGIT = -1.0e4
ONE_HOT_LOGIT = 30.0


class ExitHead(nn.Module):
    def __init__(self, width: int, hidden: int, eps: float):
        super().__init__()
        self.norm_in = RMSNorm(width, eps)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)
        self.norm_out = RMSNorm(width, eps)
        nn.init.zeros_(self.down.weight)  # starts as the model's own final norm + LM head

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden + self.down(torch.nn.functional.silu(self.up(self.norm_in(hidden))))
        return self.norm_out(h)


class ExitHeads(nn.Module):
    """One head per early exit; `vocab` [K] token ids; `rows` [K, width] their (frozen) embedding rows."""

    vocab: torch.Tensor  # buffer: the head vocabulary's token ids

    def __init__(self, width: int, hidden: int, eps: float, vocab: torch.Tensor, num_heads: int):
        super().__init__()
        self.heads = nn.ModuleList(ExitHead(width, hidden, eps) for _ in range(num_heads))
        self.exit_heads = [h for h in self.heads if isinstance(h, ExitHead)]  # the same modules, typed
        self.register_buffer("vocab", vocab.to(torch.int64), persistent=True)
        self.rows: torch.Tensor | None = None
        self.hidden = hidden

    def bind(self, model: LlamaModel) -> ExitHeads:
        """Take the vocabulary rows from the model's LM head (contiguous, for a fast matmul) and its final norm."""
        weight = model.lm_head.weight
        self.rows = weight[self.vocab.to(weight.device)].detach().contiguous()
        return self

    def init_from(self, model: LlamaModel) -> ExitHeads:
        for head in self.exit_heads:
            head.norm_out.weight.data.copy_(model.model.norm.weight.data)
        return self.bind(model)

    def logits(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Head `index` on hidden states [n, width] -> logits over the head vocabulary [n, K]."""
        return self.exit_heads[index].features(hidden) @ self.bound_rows().T

    def bound_rows(self) -> torch.Tensor:
        if self.rows is None:
            raise RuntimeError("exit heads are not bound to a model's LM head: call bind(model) first")
        return self.rows

    @property
    def vocab_size(self) -> int:
        return int(self.vocab.shape[0])


def choose_vocab(full_argmax: np.ndarray, size: int, always: list[int] | tuple[int, ...] = ()) -> np.ndarray:
    """The `size` tokens the full model predicts most often (ties by id), plus `always` (e.g. end of text)."""
    counts = np.bincount(full_argmax, minlength=int(full_argmax.max()) + 1)
    order = np.lexsort((np.arange(counts.size), -counts))
    chosen = [int(t) for t in always]
    for t in order:
        if len(chosen) >= size:
            break
        if int(t) not in chosen:
            chosen.append(int(t))
    return np.asarray(chosen, dtype=np.int64)


def vocab_index(vocab: np.ndarray, vocab_size: int) -> np.ndarray:
    """token id -> column in the head vocabulary, K (the "outside" column) for every other token."""
    index = np.full(vocab_size, vocab.size, dtype=np.int64)
    index[vocab] = np.arange(vocab.size)
    return index


def calibration_logits(head_logits: np.ndarray) -> np.ndarray:
    """Early-exit logits [n, K] -> the calibration class space [n, K + 1]."""
    n = head_logits.shape[0]
    return np.concatenate([head_logits, np.full((n, 1), OUTSIDE_LOGIT, dtype=head_logits.dtype)], axis=1)


def one_hot_logits(columns: np.ndarray, k: int) -> np.ndarray:
    """The last exit (the full model) in the calibration class space: one-hot at each token's column."""
    out = np.zeros((columns.size, k + 1), dtype=np.float32)
    out[np.arange(columns.size), columns] = ONE_HOT_LOGIT
    return out
