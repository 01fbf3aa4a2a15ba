"""Per-exit observations of answered samples: what the decision record keeps and the feedback log writes.

The engine fills a `Trace` as rows pass exits; monitoring owns the type so that it never imports the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Trace:
    """Per row and exit: confidence measure, top-2 margin, prediction; NaN / -1 where the row did not run."""

    confidence: np.ndarray  # float32 [n, L]
    margin: np.ndarray  # float32 [n, L]
    prediction: np.ndarray  # int32 [n, L]

    @classmethod
    def empty(cls, n: int, num_exits: int) -> Trace:
        return cls(np.full((n, num_exits), np.nan, np.float32), np.full((n, num_exits), np.nan, np.float32),
                   np.full((n, num_exits), -1, np.int32))

    def rows(self, index: np.ndarray | slice) -> Trace:
        return Trace(self.confidence[index].copy(), self.margin[index].copy(), self.prediction[index].copy())
