"""Exit heads of a generation bundle: a small residual MLP per exit over a restricted vocabulary.

Why restricted: decoding is memory-bound, and the full LM head (vocabulary x width, a fifth of
SmolLM2-135M's weights) costs as much as ~7 layers per call, so an exit check through it would eat
the savings. Each head instead projects onto the rows of the (frozen, tied) embedding for the K
tokens the full model predicts most often on training text; a token outside them is never drafted
there. The rows are shared by every head, so the bundle stores only their token ids.

The mass outside the vocabulary: a head that only sees its K tokens is most confident exactly when
the right token is one it cannot name (" Paris" outside the set: the in-set tokens share all the
mass). So each head also estimates the outside mass: `outside_rows` learned rows whose log-sum-exp
stands for the tokens outside the set (initialised from those tokens' own rows, grouped; trained with
the head, and the only trained part of the head after the final layer, whose K logits are exact).
Head logits are [n, K + 1], the last column that estimate. Heads saved before this have none
(`outside_rows` 0) and logits [n, K].

Calibration class space (K + OUTSIDE_SPREAD + 1 columns): columns 0..K-1 are the head vocabulary;
the next OUTSIDE_SPREAD columns share the head's outside mass equally (so it lowers every in-set
probability, yet is the top column only when no token has even 1/OUTSIDE_SPREAD of it: a head never
"predicts" outside when it is sure); the last column is the reference for a full-model token outside
the set, which no early exit ever predicts. The last exit (the full model itself) is one-hot at its
token's column, so the self-supervised tables count agreement with the full model's token exactly.
"""


from __future__ import annotations

import numpy as np
import torch
from torch import nn

from exitserve.models.llm.llama import LlamaModel, RMSNorm

OUTSIDE_LOGIT = -1.0e4
ONE_HOT_LOGIT = 30.0
OUTSIDE_SPREAD = 64
OUTSIDE_ROWS = 32


class ExitHead(nn.Module):
    def __init__(self, width: int, hidden: int, eps: float, outside_rows: int = OUTSIDE_ROWS):
        super().__init__()
        self.norm_in = RMSNorm(width, eps)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)
        self.norm_out = RMSNorm(width, eps)
        nn.init.zeros_(self.down.weight)  # starts as the model's own final norm + LM head
        self.outside = nn.Linear(width, outside_rows, bias=True) if outside_rows else None

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden + self.down(torch.nn.functional.silu(self.up(self.norm_in(hidden))))
        return self.norm_out(h)

    def outside_logit(self, features: torch.Tensor) -> torch.Tensor:
        """log of the estimated (unnormalised) mass of every token outside the head vocabulary: [n, 1]."""
        if self.outside is None:
            raise RuntimeError("this head has no outside estimate (saved before heads had one)")
        return torch.logsumexp(self.outside(features), dim=-1, keepdim=True)


class ExitHeads(nn.Module):
    """One head per early exit; `vocab` [K] token ids; `rows` [K, width] their (frozen) embedding rows."""

    vocab: torch.Tensor  # buffer: the head vocabulary's token ids

    def __init__(self, width: int, hidden: int, eps: float, vocab: torch.Tensor, num_heads: int,
                 outside_rows: int = OUTSIDE_ROWS):
        super().__init__()
        self.heads = nn.ModuleList(ExitHead(width, hidden, eps, outside_rows) for _ in range(num_heads))
        self.outside_rows = outside_rows
        self.exit_heads = [h for h in self.heads if isinstance(h, ExitHead)]  # the same modules, typed
        self.register_buffer("vocab", vocab.to(torch.int64), persistent=True)
        self.rows: torch.Tensor | None = None
        self.hidden = hidden

    def bind(self, model: LlamaModel) -> ExitHeads:
        """Take the vocabulary rows from the model's LM head (contiguous, for a fast matmul) and its final norm."""
        weight = model.lm_head.weight
        self.rows = weight[self.vocab.to(weight.device)].detach().contiguous()
        return self

    def init_from(self, model: LlamaModel, seed: int = 0) -> ExitHeads:
        """Start as the model's own final norm and LM-head rows; the outside rows as the mean rows of
        random groups of the tokens outside the vocabulary, each biased by log(group size), so the
        estimate starts as the outside mass of a model whose outside rows were those means."""
        outside = torch.ones(model.lm_head.weight.shape[0], dtype=torch.bool)
        outside[self.vocab] = False
        rows = model.lm_head.weight.detach()[outside]
        generator = torch.Generator().manual_seed(seed)
        for head in self.exit_heads:
            head.norm_out.weight.data.copy_(model.model.norm.weight.data)
            if head.outside is not None and rows.shape[0]:
                groups = torch.randperm(rows.shape[0], generator=generator) % self.outside_rows
                for g in range(self.outside_rows):
                    members = rows[groups == g]
                    if members.shape[0]:
                        head.outside.weight.data[g] = members.mean(0)
                        head.outside.bias.data[g] = float(np.log(members.shape[0]))
                    else:  # more groups than outside tokens: an empty group holds no mass
                        head.outside.weight.data[g] = 0.0
                        head.outside.bias.data[g] = OUTSIDE_LOGIT
        return self.bind(model)

    def logits(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Head `index` on hidden states [n, width] -> logits [n, output_columns]: the head vocabulary,
        then (heads with an outside estimate) the outside logit."""
        head = self.exit_heads[index]
        features = head.features(hidden)
        vocab = features @ self.bound_rows().T
        if head.outside is None:
            return vocab
        return torch.cat([vocab, head.outside_logit(features)], dim=-1)

    @property
    def output_columns(self) -> int:
        return self.vocab_size + (1 if self.outside_rows else 0)

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


def outside_column(k: int) -> int:
    """The calibration column of a full-model token outside a K-token head vocabulary."""
    return k + OUTSIDE_SPREAD


def vocab_index(vocab: np.ndarray, vocab_size: int) -> np.ndarray:
    """token id -> calibration column: its place in the head vocabulary, `outside_column` for every other token."""
    index = np.full(vocab_size, outside_column(vocab.size), dtype=np.int64)
    index[vocab] = np.arange(vocab.size)
    return index


def calibration_logits(head_logits: np.ndarray, k: int) -> np.ndarray:
    """Early-exit logits [n, K] or [n, K + 1] (with the outside estimate) -> the calibration class space
    [n, K + OUTSIDE_SPREAD + 1] (see the module docstring)."""
    n, columns = head_logits.shape
    if columns not in (k, k + 1):
        raise ValueError(f"head logits of {columns} columns for a {k}-token head vocabulary")
    if columns == k + 1:
        share = head_logits[:, k:] - np.float32(np.log(OUTSIDE_SPREAD))
    else:
        share = np.full((n, 1), OUTSIDE_LOGIT, dtype=head_logits.dtype)
    return np.concatenate([head_logits[:, :k], np.repeat(share, OUTSIDE_SPREAD, axis=1),
                           np.full((n, 1), OUTSIDE_LOGIT, dtype=head_logits.dtype)], axis=1)


def one_hot_logits(columns: np.ndarray, k: int) -> np.ndarray:
    """The last exit (the full model) in the calibration class space: one-hot at each token's column."""
    out = np.zeros((columns.size, outside_column(k) + 1), dtype=np.float32)
    out[np.arange(columns.size), columns] = ONE_HOT_LOGIT
    return out
