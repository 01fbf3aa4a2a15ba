"""Helpers shared by the reliability tests: offline reference decisions, RSS, latency summaries, damage."""

from __future__ import annotations

import base64
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exitserve.calibration import Calibration, decide_all
from exitserve.models.bundle import MANIFEST_FILE, load_bundle, refresh_checksums
from exitserve.service.runners.onnx_runtime import OnnxRunner
from exitserve.service.settings import Settings

MODEL = "digits"
SERVER_DEFAULT_POLICY: str = Settings.model_fields["default_policy"].default


@dataclass
class Reference:
    """Offline decisions (class index, exit index) for every sample of a pool, per delta and policy."""

    x: np.ndarray
    logits: list[np.ndarray]
    calibration: Calibration
    model: str = MODEL

    @classmethod
    def of(cls, bundle_path: Path, x: np.ndarray) -> Reference:
        bundle = load_bundle(bundle_path)
        logits = OnnxRunner(bundle).run_all_exits(x, progress=False)
        return cls(x, logits, Calibration.from_dict(bundle.calibration, bundle.manifest.num_exits), bundle.manifest.name)

    def decide(self, rows: np.ndarray, deltas: np.ndarray, policy: str | None = None) -> tuple[list[int], list[int]]:
        """What the server must answer; `policy` None means the server's default policy."""
        policy = policy or SERVER_DEFAULT_POLICY
        decisions = decide_all(self.calibration, policy, [z[rows] for z in self.logits], deltas)
        return decisions.prediction.tolist(), decisions.exit_index.tolist()


def raw_tensor(x: np.ndarray) -> dict:
    """The v1 raw-tensor form: cheaper to send and parse than nested lists."""
    return {"b64": base64.b64encode(np.ascontiguousarray(x, "<f4").tobytes()).decode(), "dtype": "float32",
            "shape": list(x.shape)}


def v1_answer(payload: dict) -> tuple[list[int], list[int]]:
    return [p["class_index"] for p in payload["predictions"]], [p["exit"] for p in payload["predictions"]]


def v2_json_body(x: np.ndarray, deltas: np.ndarray, policy: str | None = None) -> dict:
    body = {"inputs": [
        {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()},
        {"name": "delta", "shape": [len(deltas)], "datatype": "FP64", "data": deltas.tolist()},
    ], "outputs": [{"name": "class_index"}, {"name": "exit"}]}
    if policy is not None:
        body["parameters"] = {"policy": policy}
    return body


def v2_answer(payload: dict) -> tuple[list[int], list[int]]:
    outputs = {o["name"]: o["data"] for o in payload["outputs"]}
    return outputs["class_index"], outputs["exit"]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def percentiles(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"n": 0}
    a = np.asarray(seconds) * 1000.0
    return {"n": len(a), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "max_ms": round(float(a.max()), 2)}


def metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# --- damaged bundles: each returns (bundle directory, text the error must contain) -----------------

def _edit_manifest(bundle: Path, edit) -> None:  # noqa: ANN001 - a callable on the raw dict
    path = bundle / MANIFEST_FILE
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def damage(source: Path, target: Path, kind: str) -> tuple[Path, str]:
    """A copy of `source` at `target` with one defect of `kind`; the error must mention the returned text."""
    shutil.copytree(source, target)
    if kind == "missing file":
        (target / "segments" / "02.onnx").unlink()
        return target, "segments/02.onnx: listed in the manifest but missing"
    if kind == "checksum mismatch":
        data = bytearray((target / "segments" / "01.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (target / "segments" / "01.onnx").write_bytes(bytes(data))
        return target, "segments/01.onnx: sha256 mismatch"
    if kind == "schema version":
        _edit_manifest(target, lambda raw: raw.update(schema_version=99))
        return target, "schema_version 99 is not supported"
    if kind == "onnx does not load":
        (target / "segments" / "01.onnx").write_bytes(b"this is not an ONNX graph")
        refresh_checksums(target)
        return target, "segments/01.onnx: ONNX Runtime cannot load"
    if kind == "calibration exit count":
        calibration = json.loads((target / "calibration.json").read_text())
        calibration["exits"] = calibration["exits"][:2]
        calibration["num_exits"] = 2
        (target / "calibration.json").write_text(json.dumps(calibration))
        refresh_checksums(target)
        return target, "2 exit tables for 3 exits"
    if kind == "mismatched labels":
        # The manifest is not checksummed: a relabelled manifest with 9 labels for a 10-class model.
        _edit_manifest(target, lambda raw: raw.update(labels=raw["labels"][:9]))
        return target, "scores 10 classes but the manifest lists 9 labels"
    if kind == "path escapes the bundle":
        outside = target.parent / f"{target.name}-outside.onnx"
        shutil.copy(target / "segments" / "00.onnx", outside)

        def escape(raw: dict) -> None:
            digest = raw["sha256"].pop("segments/00.onnx")
            raw["sha256"][f"../{outside.name}"] = digest
            raw["segments"][0]["file"] = f"../{outside.name}"

        (target / "segments" / "00.onnx").unlink()
        _edit_manifest(target, escape)
        return target, f"'../{outside.name}' escapes the bundle directory"
    raise ValueError(kind)


DAMAGE_KINDS = ["missing file", "checksum mismatch", "schema version", "onnx does not load", "calibration exit count",
                "mismatched labels", "path escapes the bundle"]
