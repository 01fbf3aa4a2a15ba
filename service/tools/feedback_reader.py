"""Read a feedback log back for recalibration (offline: this is the only part that needs the fitting code)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from exitserve.calibration import Calibration
from exitserve.calibration.observations import Observations
from exitserve.service.monitoring.feedback_log import LOG_VERSION, calibration_key


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
            if line.get("scored") is False:
                skip("unscored (the shared decision store was down)")
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
