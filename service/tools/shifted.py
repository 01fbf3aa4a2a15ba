"""`exitserve evaluate --shifted DIR`: a bundle over the shifted and foreign sets of
`exitserve shifted-sets` (issue 26), per set the share promised and the promised accuracy.

Logits and the input guard's features come from `bundle_outputs` (the bundle's ONNX segments to
full depth, as `exitserve evaluate`), decisions from `calibration.sets` (`decide_all`, i.e. the
server's `Calibration.step`, with the guard applied as the server applies it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from exitserve.calibration import Calibration
from exitserve.calibration.io import dumps
from exitserve.calibration.sets import SET_DELTAS, render_sets_markdown, set_row, sets_report
from exitserve.models.bundle import load_bundle
from exitserve.models.shifted import ShiftedSet, load_sets, sets_seed
from exitserve.service.tools.offline import _command_line, bundle_outputs, input_guard_verdict

if TYPE_CHECKING:
    from exitserve.service.runners.onnx_runtime import Provider

SHIFTED_JSON = "shifted.json"
SHIFTED_MD = "shifted.md"
SET_SHAPE = (3, 32, 32)


def evaluate_sets(
    bundle_dir: str | Path,
    sets: Iterable[ShiftedSet],
    *,
    policies: Sequence[str],
    deltas: Sequence[float] = SET_DELTAS,
    provider: Provider = "cpu",
    threads: int = 2,
    batch_size: int = 256,
    progress: bool = True,
    source: dict | None = None,
) -> dict:
    """Run the bundle over each set (one at a time: memory stays one set's) and report them all."""
    bundle = load_bundle(bundle_dir, require_calibration=True)
    manifest = bundle.manifest
    assert bundle.calibration is not None  # require_calibration
    want = manifest.input.shape[1:]
    if manifest.input.text is not None or len(want) != 3 or any(w not in (-1, h) for w, h in zip(want, SET_SHAPE, strict=True)):
        raise ValueError(f"{manifest.name} takes inputs {manifest.input.shape}; the shifted sets are CIFAR-10-shaped "
                         f"[-1, {', '.join(map(str, SET_SHAPE))}]")
    calibration = Calibration.from_dict(bundle.calibration, num_exits=manifest.num_exits)
    fractions = manifest.compute_fractions()
    rows = []
    for s in tqdm(sets, desc="sets", disable=not progress, unit="set"):
        logits, features = bundle_outputs(bundle, s.x, provider=provider, threads=threads, batch_size=batch_size,
                                          progress=False)
        rows.append(set_row(calibration, s.meta(), logits, s.y, fractions, deltas, policies,
                            input_guard_verdict(calibration, features)))
    return sets_report(rows, {"bundle": f"{manifest.name} v{manifest.version}", **(source or {})})


def write_sets_report(report: dict, out_dir: str | Path, stem: str = "shifted", title: str | None = None) -> tuple[Path, Path]:
    """out_dir/<stem>.json and <stem>.md; the JSON is strict (no NaN) or this fails."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / f"{stem}.json", out / f"{stem}.md"
    paths[0].write_text(dumps(report) + "\n")
    paths[1].write_text(render_sets_markdown(report, title or f"The promise under shift: {report['source'].get('bundle', '')}") + "\n")
    json.loads(paths[0].read_text())
    return paths


def evaluate_shifted_dir(
    bundle_dir: str | Path, sets_dir: str | Path, out_dir: str | Path, *, policies: Sequence[str],
    deltas: Sequence[float] = SET_DELTAS, names: Sequence[str] | None = None, progress: bool = True,
    command: str | None = None,
) -> dict:
    """`exitserve evaluate BUNDLE --shifted DIR --out OUT`: writes OUT/shifted.json and shifted.md."""
    sets = load_sets(sets_dir, names)  # checks the index and the names before any work
    report = evaluate_sets(bundle_dir, sets, policies=policies, deltas=deltas, progress=progress,
                           source={"sets": str(sets_dir), "seed": sets_seed(sets_dir),
                                   "command": command if command is not None else _command_line()})
    write_sets_report(report, out_dir)
    return report
