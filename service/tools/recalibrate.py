"""`exitserve calibrate BUNDLE --from-feedback LOG [--merge]`: new tables from served, labelled traffic.

The feedback log holds, per labelled sample, the confidence, margin and prediction of every exit
it ran through. The tables are recounted from those (`calibration.fitting.refit_document`), keeping
the bundle's temperatures and bin edges, and written into a copy of the bundle with a new version,
ready for a hot reload (`POST /admin/models/{m}/reload {"path": ...}`).

What served traffic can and cannot say: a sample answered at exit k was never seen at deeper
exits, so exit j's tables count only the samples that reached j (all of them for exit 0, and for
every exit the shadowed samples). Those are the harder samples, which makes deep tables cautious,
not optimistic. `--merge` adds the bundle's validation data (every exit observed) to the count.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exitserve.calibration import Calibration
from exitserve.calibration.fitting import Observations, observe_logits, refit_document
from exitserve.calibration.io import save_calibration
from exitserve.errors import BadBundle
from exitserve.models.bundle import CALIBRATION_FILE, load_bundle, write_manifest
from exitserve.service.tools.feedback_reader import read_feedback


@dataclass
class Recalibration:
    out: Path
    version: str
    feedback_samples: int
    merged_samples: int
    skipped: dict[str, int]
    per_exit_samples: list[int]


def validation_spec(bundle_dir: str | Path) -> str:
    """The held-out split the bundle was trained beside, e.g. "cifar10:val" (what `--merge` adds)."""
    bundle = load_bundle(bundle_dir)
    data = bundle.manifest.created_by.extra.get("data")
    if not data:
        raise ValueError(f"{bundle_dir}: the manifest does not say which data it was trained on; pass --data")
    return f"{data}:val"


def next_version(version: str) -> str:
    """"3" -> "4"; anything else gets ".1" appended ("1.2" -> "1.2.1")."""
    return str(int(version) + 1) if version.isdigit() else f"{version}.1"


def recalibrate_from_feedback(
    bundle_dir: str | Path,
    log_path: str | Path,
    *,
    out: str | Path | None = None,
    version: str | None = None,
    merge_data: str | None = None,
    command: str = "",
    progress: bool = False,
) -> Recalibration:
    """Write a new bundle version whose tables are counted from the feedback log (plus validation data)."""
    source = Path(bundle_dir)
    bundle = load_bundle(source, require_calibration=True)
    manifest = bundle.manifest
    assert bundle.calibration is not None  # require_calibration
    base = Calibration.from_dict(bundle.calibration, num_exits=manifest.num_exits)
    logged = read_feedback(Path(log_path), manifest.name, base, len(manifest.labels))
    if logged.used == 0:
        reasons = ", ".join(f"{n} {why}" for why, n in logged.skipped.items()) or "the log is empty"
        raise ValueError(f"{log_path}: no usable feedback for model {manifest.name!r} under this bundle's "
                         f"calibration ({reasons}); the server needs EXITSERVE_FEEDBACK_LOG set and feedback sent")
    observations, labels = logged.observations, logged.labels
    fingerprint = f"feedback:{logged.used}:{logged.digest}"
    merged = 0
    if merge_data:
        from exitserve.service.tools.offline import (  # onnxruntime only when merging
            bundle_logits,
            load_bundle_data,
        )

        data = load_bundle_data(bundle, merge_data)
        logits = bundle_logits(bundle, data.x, progress=progress)
        validation = observe_logits(logits, base.temperatures, base.measure)
        observations = Observations.concatenate([validation, observations])
        labels = np.concatenate([data.y.astype(np.int64), labels])
        merged = len(data.y)
        fingerprint = f"{data.fingerprint}+{fingerprint}"
    document = refit_document(base.to_dict(), observations, labels, data_fingerprint=fingerprint)
    calibration = Calibration.from_dict(document, num_exits=manifest.num_exits)

    new_version = version or next_version(manifest.version)
    target = Path(out) if out else source.parent / f"{source.name}-v{new_version}"
    if target.exists():
        raise BadBundle(f"{target}: already exists; choose another --out")
    shutil.copytree(source, target)
    try:
        save_calibration(calibration, target / CALIBRATION_FILE)
        fields = manifest.model_dump(mode="json")
        fields["version"] = new_version
        extra = dict(fields["created_by"].get("extra") or {})
        extra["recalibrated"] = {"from_version": manifest.version, "feedback_log": str(log_path),
                                 "feedback_samples": logged.used, "merged_with": merge_data, "command": command}
        fields["created_by"]["extra"] = extra
        write_manifest(target, fields)
        load_bundle(target, require_calibration=True)  # what we wrote must load
    except Exception:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return Recalibration(target, new_version, logged.used, merged, logged.skipped,
                         [int(calibration.counts(k)[0].sum()) for k in range(manifest.num_exits)])
