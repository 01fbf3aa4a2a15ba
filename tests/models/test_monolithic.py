"""One graph from a bundle's segments: the same final logits, the early heads pruned away."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exitserve.models.bundle import load_bundle
from exitserve.models.monolithic import monolithic_bundle
from exitserve.service.runners.onnx_runtime import OnnxRunner


def final_logits(bundle_dir: Path, x: np.ndarray) -> np.ndarray:
    return OnnxRunner(load_bundle(bundle_dir)).run_all_exits(x, progress=False)[-1]


@pytest.mark.parametrize("which", ["digits", "text"])
def test_monolithic_bundle_matches_the_last_exit(which: str, digits_bundle: Path, text_bundle: Path, tmp_path: Path) -> None:
    source = digits_bundle if which == "digits" else text_bundle
    x = (np.random.default_rng(0).random((9, 1, 8, 8), dtype=np.float32) if which == "digits"
         else np.array([[101, 2307, 3185, 102, 0, 0], [101, 6659, 1010, 11771, 2143, 102]], np.int64))
    mono = monolithic_bundle(source, tmp_path / "mono")
    bundle = load_bundle(mono)
    assert bundle.manifest.num_exits == 1
    assert bundle.manifest.full_flops == load_bundle(source).manifest.full_flops
    assert (bundle.manifest.input.text is None) == (which == "digits")
    session = ort.InferenceSession(str(bundle.segment_path(0)), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == [bundle.manifest.segments[0].logits]
    got = session.run(None, {bundle.manifest.input.name: x})[0]
    np.testing.assert_allclose(got, final_logits(source, x), atol=1e-5)
    graph_nodes = len(onnx.load(str(bundle.segment_path(0))).graph.node)
    segment_nodes = sum(len(onnx.load(str(load_bundle(source).segment_path(k))).graph.node)
                        for k in range(load_bundle(source).manifest.num_exits))
    assert graph_nodes < segment_nodes  # the early exit heads are gone
