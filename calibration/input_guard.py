"""The input guard: withhold the promise for inputs unlike the calibration data (issue 26).

The reliability tables say how often answers of a given confidence were right *on data like the
calibration set*. An input far from it (noise, a blank image, a digit sent to a photo model) can get
a confident answer, so the tables' promise does not cover it. The guard scores how unlike the
calibration inputs a sample is and withholds `target_met` beyond what the calibration data shows.

The score is chosen by measurement (BENCHMARKS.md §2.5): the squared Mahalanobis distance of the
first segment's pooled hidden state (per channel, its mean and standard deviation over the spatial
or token positions: `models.features`) from the calibration samples' mean, under their shrunk
covariance. On the default bundle, at a threshold that withholds 1 % of the calibration samples,
it flags 100 % of uniform and Gaussian noise, constant and gradient images and 99.9 % of MNIST
digits, where the exits' own confidence, energy and max-logit flag 0-21 % and a Mahalanobis distance
on the logits 14-31 %: noise drives the network to confident logits, but not to the first layer's
feature statistics of real photos.

The first segment always runs, so the score costs one [D] x [D, D] product per sample (D = 64 on the
default bundle) and the features come out of the graph that runs anyway (no extra pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

GUARD_KIND = "pooled-mahalanobis"
DEFAULT_QUANTILE = 0.99  # withhold the promise from the 1 % least typical calibration samples, and beyond
_SHRINKAGE = 1e-3  # ridge, relative to the mean variance: keeps the precision finite for flat channels


class InputGuardDocument(BaseModel):
    """calibration.json's `input_guard` block."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: str = Field(GUARD_KIND, pattern=f"^{GUARD_KIND}$")
    features: str = Field(description="the bundle's features output it reads (first segment)")
    quantile: float = Field(gt=0.0, lt=1.0)
    threshold: float = Field(ge=0.0)
    samples: int = Field(ge=2)
    mean: list[float]
    precision: list[list[float]]


@dataclass(frozen=True)
class InputGuard:
    """A fitted guard: `in_distribution(features)` is True where the promise may stand."""

    features: str
    mean: np.ndarray  # [D]
    precision: np.ndarray  # [D, D]
    threshold: float
    quantile: float
    samples: int

    @classmethod
    def from_document(cls, raw: InputGuardDocument) -> InputGuard:
        mean = np.asarray(raw.mean, dtype=np.float64)
        precision = np.asarray(raw.precision, dtype=np.float64)
        if mean.ndim != 1 or mean.size == 0 or precision.shape != (mean.size, mean.size):
            raise ValueError(f"input_guard: mean of {mean.size} values needs a {mean.size}x{mean.size} precision, "
                             f"got shape {precision.shape}")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(precision)) and np.isfinite(raw.threshold)):
            raise ValueError("input_guard: mean, precision and threshold must be finite")
        return cls(raw.features, mean, precision, float(raw.threshold), float(raw.quantile), int(raw.samples))

    @property
    def dimension(self) -> int:
        return int(self.mean.size)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row of features [n, D] (float64)."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.mean.size:
            raise ValueError(f"input guard: features of shape {features.shape}, expected [n, {self.mean.size}]")
        centred = features - self.mean
        return np.einsum("ij,ij->i", centred @ self.precision, centred)

    def in_distribution(self, features: np.ndarray) -> np.ndarray:
        """[n] bool: the sample is no less typical than the calibration data allows. NaN scores fail."""
        return self.scores(features) <= self.threshold

    def to_document(self) -> dict:
        return {
            "kind": GUARD_KIND,
            "features": self.features,
            "quantile": self.quantile,
            "threshold": self.threshold,
            "samples": self.samples,
            "mean": self.mean.tolist(),
            "precision": self.precision.tolist(),
        }


def fit_input_guard(features: np.ndarray, name: str, quantile: float = DEFAULT_QUANTILE) -> InputGuard:
    """Fit mean, shrunk covariance and the score threshold on the calibration samples' features [n, D]."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2 or features.shape[1] == 0:
        raise ValueError(f"input guard: need features of at least 2 samples as [n, D], got shape {features.shape}")
    if not np.all(np.isfinite(features)):
        raise ValueError("input guard: calibration features contain NaN or inf")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"input guard: quantile must be in (0, 1), got {quantile}")
    mean = features.mean(axis=0)
    centred = features - mean
    covariance = centred.T @ centred / features.shape[0]
    ridge = _SHRINKAGE * max(float(np.trace(covariance)) / covariance.shape[0], 1e-12)
    precision = np.linalg.inv(covariance + ridge * np.eye(covariance.shape[0]))
    precision = (precision + precision.T) / 2  # exactly symmetric: the stored document reads the same both ways
    guard = InputGuard(name, mean, precision, 0.0, float(quantile), int(features.shape[0]))
    threshold = float(np.quantile(guard.scores(features), quantile, method="higher"))
    return InputGuard(name, mean, precision, threshold, float(quantile), int(features.shape[0]))
