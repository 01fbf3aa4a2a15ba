"""Temperature-scaled probabilities and the confidence measures an exit decision is based on.

Everything is computed in float64 from the float32 logits, so fitting (on validation logits) and
serving (on live logits) produce bit-identical confidences for identical inputs.
"""

from __future__ import annotations

import numpy as np

MEASURES: tuple[str, ...] = ("max-softmax", "entropy", "margin")


def check_measure(measure: str) -> str:
    if measure not in MEASURES:
        raise ValueError(f"unknown confidence measure {measure!r}; choose from {', '.join(MEASURES)}")
    return measure


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log softmax(logits / temperature) along the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) along the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top2_margin(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row (1.0 for a single class)."""
    if probs.shape[-1] < 2:
        return np.ones(probs.shape[:-1])
    top2 = np.partition(probs, -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def confidence_from_probs(probs: np.ndarray, measure: str = "max-softmax") -> np.ndarray:
    """The confidence of each row, in [0, 1], higher = more confident.

    max-softmax: the top probability. entropy: 1 - H(p) / log C. margin: top-1 minus top-2.
    """
    if measure == "max-softmax":
        return probs.max(axis=-1)
    if measure == "margin":
        return top2_margin(probs)
    if measure == "entropy":
        classes = probs.shape[-1]
        if classes < 2:
            return np.ones(probs.shape[:-1])
        # p log p with p == 0 contributes 0; np.where avoids 0 * -inf = nan.
        with np.errstate(divide="ignore", invalid="ignore"):
            plogp = np.where(probs > 0, probs * np.log(probs), 0.0)
        return np.clip(1.0 + plogp.sum(axis=-1) / np.log(classes), 0.0, 1.0)
    raise ValueError(f"unknown confidence measure {measure!r}; choose from {', '.join(MEASURES)}")
