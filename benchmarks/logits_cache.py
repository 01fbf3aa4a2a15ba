"""Every exit's logits for a bundle on a data split, computed once and cached under runs/.

The cache key is the bundle's name plus a digest of its segment checksums: re-exporting a bundle
(new weights) invalidates the cache, re-calibrating it (which does not change the logits) does not.
Shared by benchmarks/headline.py and benchmarks/control.py.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exitserve.models.bundle import Bundle
from exitserve.service.tools.offline import bundle_outputs, load_bundle_data

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / "runs" / "cache" / "logits"


@dataclass(frozen=True)
class SplitLogits:
    logits: list[np.ndarray]  # per exit, [n, classes]
    labels: np.ndarray
    fingerprint: str
    seconds: float  # time to compute them (0 when read from the cache)
    cached: bool
    features: np.ndarray | None = None  # the first segment's features tap (models.features), where the bundle has it


def weights_digest(bundle: Bundle) -> str:
    """Digest of the segment files' checksums only: calibration.json does not change the logits."""
    segments = sorted((k, v) for k, v in bundle.manifest.sha256.items() if k.startswith("segments/"))
    return hashlib.sha256(repr(segments).encode()).hexdigest()[:16]


def split_logits(bundle: Bundle, data_spec: str, cache_dir: Path = DEFAULT_CACHE, threads: int = 2) -> SplitLogits:
    """Logits of every exit for `data_spec` (e.g. "cifar10:test"), from the cache when it matches."""
    data = load_bundle_data(bundle, data_spec)
    path = cache_dir / f"{bundle.manifest.name}-{weights_digest(bundle)}-{data_spec.replace(':', '-')}.npz"
    if path.exists():
        stored = np.load(path)
        # The fingerprint check catches a changed split (seed, data files) behind the same name.
        if str(stored["fingerprint"]) == data.fingerprint and np.array_equal(stored["labels"], data.y):
            logits = [stored[f"exit_{k}"] for k in range(bundle.manifest.num_exits)]
            features = stored["features"] if "features" in stored.files else None
            return SplitLogits(logits, data.y, data.fingerprint, 0.0, True, features)
    start = time.perf_counter()
    logits, features = bundle_outputs(bundle, data.x, threads=threads, progress=False)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, labels=data.y, fingerprint=np.array(data.fingerprint),
             **({"features": features} if features is not None else {}),
             **{f"exit_{k}": z for k, z in enumerate(logits)})
    return SplitLogits(logits, data.y, data.fingerprint, seconds, False, features)
