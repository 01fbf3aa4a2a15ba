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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from exitserve.calibration import Calibration
from exitserve.calibration.fitting import Observations

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


@dataclass
class LoggedFeedback:
    """What a log holds for one model and calibration, ready for `calibration.fitting.refit_document`."""

    observations: Observations
    labels: np.ndarray
    used: int
    skipped: dict[str, int] = field(default_factory=dict)
    digest: str = ""


def read_feedback(path: Path, model: str, calibration: Calibration, num_classes: int) -> LoggedFeedback:
    """Lines of `model` logged under `calibration`'s temperatures; the rest are counted by reason."""
    key = calibration_key(calibration)
    exits = calibration.num_exits
    conf, margin, pred, labels = [], [], [], []
    skipped: dict[str, int] = {}
    digest = hashlib.sha256()

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    with Path(path).open("rb") as handle:
        for raw in handle:
            if not raw.strip():
                continue
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                skip("not JSON")
                continue
            if not isinstance(line, dict) or line.get("v") != LOG_VERSION:
                skip("not a feedback line")
                continue
            if line.get("model") != model:
                skip("other model")
                continue
            if line.get("calibration") != key:
                skip("other calibration (temperatures or confidence measure)")
                continue
            steps = line.get("exits")
            label = line.get("label")
            if not isinstance(steps, list) or not steps or len(steps) > exits or not isinstance(label, int):
                skip("no per-exit trace")
                continue
            if not 0 <= label < num_classes:
                skip("label out of range")
                continue
            row_c, row_m, row_p = np.full(exits, np.nan), np.full(exits, np.nan), np.full(exits, -1, np.int64)
            try:
                for k, (c, m, p) in enumerate(steps):
                    row_c[k], row_m[k], row_p[k] = float(c), float(m), int(p)
            except (TypeError, ValueError):
                skip("malformed trace")
                continue
            conf.append(row_c)
            margin.append(row_m)
            pred.append(row_p)
            labels.append(label)
            digest.update(raw.strip())
    if not labels:
        return LoggedFeedback(Observations([np.empty(0)] * exits, [np.empty(0)] * exits,
                                           [np.empty(0, np.int64)] * exits), np.empty(0, np.int64), 0, skipped)
    c, m, p = np.vstack(conf), np.vstack(margin), np.vstack(pred)
    observations = Observations([c[:, k] for k in range(exits)], [m[:, k] for k in range(exits)],
                                [p[:, k] for k in range(exits)])
    return LoggedFeedback(observations, np.asarray(labels, np.int64), len(labels), skipped, digest.hexdigest()[:16])
