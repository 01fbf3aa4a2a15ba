"""What the tables are counted from: per exit, each sample's confidence, top-2 margin and prediction.

Not a fitting module: the serving path (the feedback log) builds `Observations` from logged traces,
so this must import nothing beyond numpy and the confidence measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from exitserve.calibration.confidence import confidence_from_probs, softmax, top2_margin


@dataclass(frozen=True)
class Observations:
    """Per-exit evidence the tables are counted from, one row per sample.

    confidence[k] / margin[k]: the exit's (temperature-scaled) confidence measure and top-2 margin,
    NaN where the sample was not observed at exit k; prediction[k]: its argmax, -1 where not
    observed. Validation data observes every sample at every exit; served traffic only at the exits
    a sample passed through (all of them for shadowed samples), so a deeper exit sees fewer samples.
    """

    confidence: list[np.ndarray]
    margin: list[np.ndarray]
    prediction: list[np.ndarray]

    def __post_init__(self) -> None:
        if not self.confidence or not (len(self.confidence) == len(self.margin) == len(self.prediction)):
            raise ValueError("observations need the same number (>= 1) of exits for confidence, margin and prediction")
        n = np.asarray(self.confidence[0]).shape
        for k, arrays in enumerate(zip(self.confidence, self.margin, self.prediction, strict=True)):
            if any(np.asarray(a).shape != n or np.asarray(a).ndim != 1 for a in arrays):
                raise ValueError(f"exit {k}: observations of shape other than {n}")

    @property
    def size(self) -> int:
        return int(np.asarray(self.confidence[0]).shape[0])

    def observed(self, k: int) -> np.ndarray:
        return np.isfinite(np.asarray(self.confidence[k], dtype=np.float64)) & (np.asarray(self.prediction[k]) >= 0)

    @staticmethod
    def concatenate(parts: Sequence[Observations]) -> Observations:
        exits = len(parts[0].confidence)
        if any(len(p.confidence) != exits for p in parts):
            raise ValueError("observations of different exit counts cannot be merged")
        return Observations(
            confidence=[np.concatenate([np.asarray(p.confidence[k], np.float64) for p in parts]) for k in range(exits)],
            margin=[np.concatenate([np.asarray(p.margin[k], np.float64) for p in parts]) for k in range(exits)],
            prediction=[np.concatenate([np.asarray(p.prediction[k], np.int64) for p in parts]) for k in range(exits)],
        )


def observe_logits(logits_per_exit: Sequence[np.ndarray], temperatures: Sequence[float] | np.ndarray,
                   confidence: str) -> Observations:
    """Every exit observed for every sample: what validation logits give."""
    conf, margin, pred = [], [], []
    for z, temperature in zip(logits_per_exit, temperatures, strict=True):
        probs = softmax(z, temperature)
        conf.append(confidence_from_probs(probs, confidence))
        margin.append(top2_margin(probs))
        pred.append(np.asarray(z).argmax(axis=1).astype(np.int64))
    return Observations(conf, margin, pred)
