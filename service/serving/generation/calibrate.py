"""Label-free reliability tables for token-level exits, fitted with the shared calibration code.

A token is "correct" at an exit when the exit's token equals the full model's; the tables are
counted by `fit_calibration(..., labels=None)`, whose self-supervised reference is the last exit:
here the full model, represented one-hot at its token (see `models.llm.heads`).
"""

from __future__ import annotations

import numpy as np

from exitserve.calibration import Calibration, fit_calibration
from exitserve.models.llm.heads import calibration_logits, one_hot_logits, vocab_index


def fit_token_calibration(head_logits: list[np.ndarray], vocab: np.ndarray, full_argmax: np.ndarray, vocab_size: int,
                          *, confidence: str = "max-softmax", bins: int = 20, binning: str = "equal-mass",
                          alpha: float = 0.05, data_fingerprint: str = "", groups: np.ndarray | None = None) -> Calibration:
    """head_logits: per early exit [n, K] or [n, K + 1] (`ExitHeads.logits`); full_argmax [n]: the full model's next token at each position.
    groups: the cluster of each token (its answer, its chunk of running text): the guards then count
    effective samples, since the tokens of one answer agree or disagree together (`bounds.design_effect`)."""
    columns = vocab_index(vocab, vocab_size)[full_argmax]
    per_exit = [calibration_logits(z.astype(np.float32), vocab.size) for z in head_logits]
    per_exit.append(one_hot_logits(columns, vocab.size))
    return fit_calibration(per_exit, None, confidence=confidence, bins=bins, binning=binning, fit_temperature=False,
                           alpha=alpha, data_fingerprint=data_fingerprint, groups=groups)


def agreement(head_logits: np.ndarray, vocab: np.ndarray, full_argmax: np.ndarray) -> np.ndarray:
    """Per token: does this exit's top token equal the full model's? (A head whose outside estimate
    is its top column names no token: never.)"""
    column = calibration_logits(head_logits, vocab.size).argmax(axis=1)
    return (column < vocab.size) & (vocab[np.minimum(column, vocab.size - 1)] == full_argmax)
