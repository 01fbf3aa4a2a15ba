"""Reading and writing calibration.json (readable: objects indented, number lists on one line)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from exitserve.calibration.rules import Calibration


def dumps(document: Any, indent: int = 2, _level: int = 0) -> str:
    """JSON with nested objects indented and lists of scalars kept on one line.

    Floats use Python's shortest round-trip repr, so temperatures and edges load back exactly.
    """
    pad, inner = " " * (indent * _level), " " * (indent * (_level + 1))
    if isinstance(document, dict):
        if not document:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {dumps(v, indent, _level + 1)}" for k, v in document.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(document, list) and any(isinstance(v, dict | list) for v in document):
        items = [f"{inner}{dumps(v, indent, _level + 1)}" for v in document]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(document, allow_nan=False)


def save_calibration(calibration: Calibration, path: str | Path) -> Path:
    """Write atomically (a hidden temp file, then rename), so a bundle never holds half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dumps(calibration.to_dict()) + "\n")
    os.replace(tmp, path)
    return path


def load_calibration(path: str | Path, num_exits: int | None = None) -> Calibration:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    try:
        return Calibration.from_dict(data, num_exits=num_exits)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
