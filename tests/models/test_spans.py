"""Issue 16: span graphs run segments first..last in one graph, with only the last exit head."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from exitserve.errors import BadBundle
from exitserve.models.bundle import MANIFEST_FILE, load_bundle, refresh_checksums
from exitserve.models.data import load_dataset
from exitserve.models.spans import add_spans
from exitserve.service.runners.onnx_runtime import OnnxRunner


def chained(runner: OnnxRunner, x: np.ndarray, first: int, last: int) -> np.ndarray:
    state = runner.start(x)
    for k in range(last + 1):
        state, logits = runner.run_segment(k, state)
    return logits


def test_every_span_gives_the_chained_segments_logits(digits_bundle_uncalibrated: Path) -> None:
    bundle = load_bundle(digits_bundle_uncalibrated)
    runner = OnnxRunner(bundle)
    assert set(runner.span_sessions) == {(0, 1), (0, 2), (1, 2)}
    x = load_dataset("digits:test").x[:16]
    for (first, last) in runner.span_sessions:
        state = runner.start(x)
        for k in range(first):
            state, _ = runner.run_segment(k, state)
        _, fused = runner.run_span(first, last, state)
        np.testing.assert_allclose(fused, chained(runner, x, first, last), atol=1e-5)


def test_span_graphs_leave_the_inner_heads_out(digits_bundle_uncalibrated: Path) -> None:
    bundle = load_bundle(digits_bundle_uncalibrated)
    segments = bundle.manifest.segments
    span = onnx.load(str(bundle.span_paths()[0, 2]), load_external_data=False)
    assert [o.name for o in span.graph.output] == [segments[2].logits]
    assert [i.name for i in span.graph.input] == segments[0].inputs
    nodes = len(span.graph.node)
    every = sum(len(onnx.load(str(bundle.segment_path(k)), load_external_data=False).graph.node) for k in range(3))
    assert nodes < every  # the heads of exits 0 and 1 are gone


def test_spans_share_the_weights_so_the_bundle_does_not_grow(digits_bundle_uncalibrated: Path, tmp_path: Path) -> None:
    """The same bundle exported without spans (segments self-contained) takes as much disk, within graph structure."""
    bundle = load_bundle(digits_bundle_uncalibrated)
    plain = tmp_path / "plain"
    plain.mkdir()
    for k in range(3):  # self-contained segment graphs: what a bundle without spans holds
        model = onnx.load(str(bundle.segment_path(k)))
        onnx.save(model, str(plain / f"{k}.onnx"))
    without = sum(p.stat().st_size for p in plain.iterdir())
    with_spans = sum((bundle.path / name).stat().st_size for name in bundle.manifest.sha256)
    assert with_spans < 1.25 * without + 64 * 1024, (with_spans, without)


def test_a_bundle_without_spans_gets_them_and_keeps_its_answers(digits_bundle_uncalibrated: Path, tmp_path: Path) -> None:
    source = tmp_path / "old"
    shutil.copytree(digits_bundle_uncalibrated, source)
    # Make it a bundle as exported before spans: self-contained segments, no span list.
    raw = json.loads((source / MANIFEST_FILE).read_text())
    bundle = load_bundle(source)
    models = [onnx.load(str(bundle.segment_path(k))) for k in range(3)]
    for path in (source / "segments").glob("*"):
        path.unlink()
    for k, model in enumerate(models):
        onnx.save(model, str(source / raw["segments"][k]["file"]))
    raw.pop("spans")
    (source / MANIFEST_FILE).write_text(json.dumps(raw))
    refresh_checksums(source)
    x = load_dataset("digits:test").x[:8]
    before = OnnxRunner(load_bundle(source))
    assert before.span_sessions == {}
    expected = chained(before, x, 0, 2)
    np.testing.assert_allclose(before.run_span(0, 2, before.start(x))[1], expected)  # chains when it has no span

    differences = add_spans(source)
    assert [(a, b) for a, b, _ in differences] == [(0, 1), (0, 2), (1, 2)]
    after = OnnxRunner(load_bundle(source))
    np.testing.assert_allclose(after.run_span(0, 2, after.start(x))[1], expected, atol=1e-5)


def test_a_span_listed_wrong_fails_loudly(bundle_copy: Path) -> None:
    raw = json.loads((bundle_copy / MANIFEST_FILE).read_text())
    raw["spans"][0]["first"], raw["spans"][0]["last"] = 1, 1
    (bundle_copy / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(BadBundle, match="span 1-1: needs first < last"):
        load_bundle(bundle_copy)


def test_a_span_graph_that_does_not_fit_its_segments_fails_loudly(bundle_copy: Path) -> None:
    raw = json.loads((bundle_copy / MANIFEST_FILE).read_text())
    spans = {(s["first"], s["last"]): s for s in raw["spans"]}
    spans[0, 1]["file"], spans[1, 2]["file"] = spans[1, 2]["file"], spans[0, 1]["file"]  # swapped graphs
    (bundle_copy / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(BadBundle, match=r"span 0-1 inputs .* do not match the manifest"):
        OnnxRunner(load_bundle(bundle_copy))
