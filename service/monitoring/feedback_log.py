"""The opt-in feedback log (EXITSERVE_FEEDBACK_LOG): decisions joined with their labels, JSON lines.

One line per labelled sample:

    {"v": 1, "time": 1732280000.1, "model": "cifar10-resnet-large", "version": "1",
     "calibration": "3f2a…", "request_id": "…", "index": 0, "label": 3, "prediction": 3,
     "correct": true, "exit": 1, "estimate": 0.93, "delta": 0.9, "policy": "pcee-lb-cond",
     "target_met": true, "shadow": null, "exits": [[0.61, 0.35, 3], [0.97, 0.95, 3]]}

`exits` holds, for every exit the sample ran through (all of them for a shadowed sample), its
confidence measure, top-2 margin and prediction: what `exitserve calibrate --from-feedback` counts
the tables from. `calibration` identifies the confidence measure and temperatures those numbers were
computed with; lines of another calibration are not mixed in.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from pathlib import Path

import orjson

from exitserve.calibration import Calibration

LOG_VERSION = 1
_open: dict[Path, FeedbackLog] = {}
_open_lock = threading.Lock()


def calibration_key(calibration: Calibration) -> str:
    """What the logged confidences depend on: the measure and every exit's temperature."""
    text = json.dumps([calibration.measure, [float(t) for t in calibration.temperatures]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class FeedbackLog:
    """Appends lines under a lock and flushes each batch (several models may share one file)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("ab")
        self._lock = threading.Lock()

    @classmethod
    def shared(cls, path: Path) -> FeedbackLog:
        """One writer per file in this process, whichever model (or reloaded model) asks."""
        path = Path(path).resolve()
        with _open_lock:
            log = _open.get(path)
            if log is None or log._file.closed:
                log = _open[path] = cls(path)
            return log

    def write(self, records: Iterable[dict]) -> None:
        data = b"".join(orjson.dumps(record) + b"\n" for record in records)
        if not data:
            return
        with self._lock:
            self._file.write(data)
            self._file.flush()
