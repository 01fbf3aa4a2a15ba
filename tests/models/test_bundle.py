import json
import subprocess
import sys
from pathlib import Path

import pytest

from exitserve.errors import BadBundle
from exitserve.models.bundle import MANIFEST_FILE, load_bundle, refresh_checksums


def test_loads_and_verifies(digits_bundle_uncalibrated: Path) -> None:
    bundle = load_bundle(digits_bundle_uncalibrated)
    m = bundle.manifest
    assert m.num_exits == 3
    assert m.labels == [str(d) for d in range(10)]
    assert [e.cumulative_flops for e in m.exits] == sorted(e.cumulative_flops for e in m.exits)
    assert m.compute_fractions()[-1] == 1.0
    spans = {span.file for span in m.spans or []}
    assert len(spans) == 3  # every span first < last of 3 segments, sharing one weights file
    assert set(m.sha256) == {s.file for s in m.segments} | spans | {"segments/weights.bin"}


def test_tampered_byte_names_the_file(bundle_copy: Path) -> None:
    target = bundle_copy / "segments" / "01.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BadBundle, match=r"segments/01\.onnx: sha256 mismatch"):
        load_bundle(bundle_copy)


def test_missing_file_is_named(bundle_copy: Path) -> None:
    (bundle_copy / "segments" / "02.onnx").unlink()
    with pytest.raises(BadBundle, match=r"segments/02\.onnx: listed in the manifest but missing"):
        load_bundle(bundle_copy)


def test_unexpected_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "segments" / "evil.onnx").write_bytes(b"x")
    with pytest.raises(BadBundle, match=r"evil\.onnx: not listed"):
        load_bundle(bundle_copy)


def test_wrong_schema_version(bundle_copy: Path) -> None:
    path = bundle_copy / MANIFEST_FILE
    raw = json.loads(path.read_text())
    raw["schema_version"] = 99
    path.write_text(json.dumps(raw))
    with pytest.raises(BadBundle, match="schema_version 99 is not supported"):
        load_bundle(bundle_copy)


def test_inconsistent_flops_refused(bundle_copy: Path) -> None:
    path = bundle_copy / MANIFEST_FILE
    raw = json.loads(path.read_text())
    raw["exits"][1]["cumulative_flops"] += 1
    path.write_text(json.dumps(raw))
    with pytest.raises(BadBundle, match="cumulative_flops"):
        load_bundle(bundle_copy)


def test_calibration_with_wrong_exit_count_refused(bundle_copy: Path) -> None:
    (bundle_copy / "calibration.json").write_text(json.dumps({"exits": [{}, {}]}))
    refresh_checksums(bundle_copy)
    with pytest.raises(BadBundle, match="2 exit tables for 3 exits"):
        load_bundle(bundle_copy)


def test_refresh_checksums_accepts_deliberate_change(bundle_copy: Path) -> None:
    (bundle_copy / "calibration.json").write_text(json.dumps({"exits": [{}, {}, {}]}))
    with pytest.raises(BadBundle, match="not listed"):
        load_bundle(bundle_copy)
    refresh_checksums(bundle_copy)
    assert load_bundle(bundle_copy).calibration == {"exits": [{}, {}, {}]}


def test_loader_and_runner_import_without_torch() -> None:
    code = (
        "import sys, exitserve.models.bundle, exitserve.models.data, exitserve.service.runners.onnx_runtime, "
        "exitserve.service.cli, exitserve.service.app, exitserve.calibration\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
