"""The serving benchmark's plain-endpoint baselines come from the bundle itself (no checkpoint needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from exitserve.models.bundle import load_bundle
from exitserve.service.runners.onnx_runtime import OnnxRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # scripts, not a package

import monolithic  # noqa: E402


def test_baselines_from_a_bundle_give_the_chained_segments_logits(digits_bundle: Path, tmp_path: Path) -> None:
    out = monolithic.ensure_baselines(digits_bundle, tmp_path / "mono")
    bundle = load_bundle(digits_bundle)
    x = np.random.default_rng(0).random((7, 1, 8, 8)).astype(np.float32)
    chained = OnnxRunner(bundle).run_all_exits(x, progress=False)
    every = ort.InferenceSession(str(out / "all-exits.onnx")).run(None, {bundle.manifest.input.name: x})
    assert len(every) == bundle.manifest.num_exits
    for got, want in zip(every, chained, strict=True):
        assert np.allclose(got, want, atol=1e-5)
    last = ort.InferenceSession(str(out / "last-exit.onnx"))
    assert [o.name for o in last.get_outputs()] == [bundle.manifest.segments[-1].logits]  # early heads pruned
    assert np.allclose(last.run(None, {bundle.manifest.input.name: x})[0], chained[-1], atol=1e-5)
