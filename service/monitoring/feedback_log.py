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

Scored means written: `write` hands the lines to the kernel with unbuffered `os.write` calls (no
Python buffer that could hold a failed batch and replay it later) and raises `FeedbackNotWritten`
when it cannot, so the caller can un-claim the samples and tell the client to retry. A log moved
away by logrotate (or deleted) is noticed on the next write and reopened at its path; SIGHUP reopens too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import orjson

from exitserve.calibration import Calibration
from exitserve.errors import Overloaded

LOG_VERSION = 1
_open: dict[Path, FeedbackLog] = {}
_open_lock = threading.Lock()


class FeedbackNotWritten(Overloaded):
    """The feedback log refused the lines (disk full, permissions): nothing was scored; retry later."""

    default_headers = {"Retry-After": "5"}


def calibration_key(calibration: Calibration) -> str:
    """What the logged confidences depend on: the measure and every exit's temperature."""
    text = json.dumps([calibration.measure, [float(t) for t in calibration.temperatures]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class FeedbackLog:
    """Appends lines under a lock (several models may share one file); reopens a rotated file."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        try:
            self._open()
        except OSError:
            self._fd = None  # reported on the first write: start-up must not fail on a full disk

    @classmethod
    def shared(cls, path: Path) -> FeedbackLog:
        """One writer per file in this process, whichever model (or reloaded model) asks."""
        # Absolute, not resolved: a symlinked log path is followed afresh when the log is reopened.
        path = Path(os.path.abspath(path))
        with _open_lock:
            log = _open.get(path)
            if log is None:
                log = _open[path] = cls(path)
            return log

    @classmethod
    def reopen_all(cls) -> None:
        """SIGHUP: reopen every log at its path (after logrotate's `create`, or a manual move)."""
        with _open_lock:
            logs = list(_open.values())
        for log in logs:
            with log._lock:
                log._close()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        stat = os.fstat(self._fd)
        self._identity = (stat.st_dev, stat.st_ino)

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None

    def _rotated(self) -> bool:
        try:
            stat = os.stat(self.path)
        except OSError:
            return True  # moved away or deleted: write to a new file at the path
        return (stat.st_dev, stat.st_ino) != self._identity

    def write(self, records: Iterable[dict]) -> None:
        """Append the lines, or raise FeedbackNotWritten (then possibly a partial last line was written)."""
        data = b"".join(orjson.dumps(record) + b"\n" for record in records)
        if not data:
            return
        with self._lock:
            try:
                if self._fd is None or self._rotated():
                    self._close()
                    self._open()
                assert self._fd is not None
                view = memoryview(data)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
            except OSError as exc:
                self._close()  # the next write opens the file afresh
                raise FeedbackNotWritten(f"the feedback log cannot be written ({exc.strerror or exc}); "
                                         "nothing was scored, send the feedback again later") from None
