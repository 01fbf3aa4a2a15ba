"""The torch runner (TorchScript twins) answers exactly like the ONNX runner, in the engine and over HTTP."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import ServerProcess

from exitserve.calibration import Calibration, decide_all
from exitserve.errors import BadBundle
from exitserve.models.architectures import build_architecture
from exitserve.models.bundle import load_bundle, refresh_checksums
from exitserve.models.data import load_dataset
from exitserve.models.export import export_bundle
from exitserve.service.runners.cuda_graphs import SpanGraphs
from exitserve.service.runners.onnx_runtime import OnnxRunner
from exitserve.service.runners.torch_runner import TorchScriptRunner
from exitserve.service.serving.engine import ExitEngine
from exitserve.service.tools.offline import calibrate_bundle


@pytest.fixture(scope="module")
def twin_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    val = load_dataset("digits:val")
    net = build_architecture("digits-compact", 10).eval()
    out = tmp_path_factory.mktemp("twins") / "digits-twins"
    export_bundle(net, torch.from_numpy(val.x[:16]), out, labels=val.labels, name="digits-twins", torchscript=True)
    calibrate_bundle(out, "digits:val", progress=False)
    return out


def test_twins_are_listed_and_checksummed(twin_bundle: Path) -> None:
    bundle = load_bundle(twin_bundle)
    assert [s.torchscript for s in bundle.manifest.segments] == ["segments/00.pt", "segments/01.pt", "segments/02.pt"]
    assert all(s.torchscript in bundle.manifest.sha256 for s in bundle.manifest.segments)


def test_torch_and_onnx_runners_agree(twin_bundle: Path) -> None:
    bundle = load_bundle(twin_bundle)
    x = load_dataset("digits:test").x[:50]
    onnx_logits = OnnxRunner(bundle).run_all_exits(x, batch_size=17, progress=False)
    torch_runner = TorchScriptRunner(bundle)
    torch_logits = torch_runner.run_all_exits(x, batch_size=17, progress=False)
    for a, b in zip(onnx_logits, torch_logits, strict=True):
        assert np.abs(a - b).max() < 1e-4
    calibration = Calibration.from_dict(bundle.calibration, 3)
    deltas = np.full(len(x), 0.9)
    got = ExitEngine(torch_runner, calibration).run(x, deltas, np.full(len(x), "pcee-cond", dtype=object))
    want = decide_all(calibration, "pcee-cond", onnx_logits, deltas)
    assert np.array_equal(got.exit_index, want.exit_index) and np.array_equal(got.class_index, want.prediction)


def test_a_span_reads_only_its_last_exit_and_equals_the_chain(twin_bundle: Path) -> None:
    runner = TorchScriptRunner(load_bundle(twin_bundle))
    x = load_dataset("digits:test").x[:9]
    chained = runner.start(x)
    for k in range(3):
        chained, chain_logits = runner.run_segment(k, chained)
    state, logits = runner.run_span(0, 2, runner.start(x))
    np.testing.assert_array_equal(logits, chain_logits)
    assert state.keys() == chained.keys()
    reads = []
    original = torch.Tensor.cpu

    def counting_cpu(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        reads.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    torch.Tensor.cpu = counting_cpu  # type: ignore[method-assign]
    try:
        runner.run_span(0, 2, runner.start(x))
    finally:
        torch.Tensor.cpu = original  # type: ignore[method-assign]
    assert reads == [(9, 10)]  # the last exit's logits, nothing of the inner heads or hidden states


def test_cuda_graphs_need_a_gpu(twin_bundle: Path) -> None:
    with pytest.raises(ValueError, match="CUDA graphs need a GPU"):
        TorchScriptRunner(load_bundle(twin_bundle), device="cpu", cuda_graph_buckets=[1, 4])


def test_a_batch_replays_in_the_smallest_bucket_that_holds_it() -> None:
    graphs = SpanGraphs(lambda first, last, state: (state, torch.zeros(1)), (16, 1, 4))
    assert [graphs.bucket(n) for n in (1, 2, 4, 5, 16, 17)] == [1, 4, 4, 16, 16, None]
    with pytest.raises(ValueError, match="positive batch sizes"):
        SpanGraphs(lambda first, last, state: (state, torch.zeros(1)), (0, 4))


def test_bundle_without_twins_is_refused_by_the_torch_runner(digits_bundle: Path) -> None:
    with pytest.raises(BadBundle, match="no TorchScript twin"):
        TorchScriptRunner(load_bundle(digits_bundle))


def test_broken_twin_fails_loudly(twin_bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(twin_bundle, copy)
    (copy / "segments" / "01.pt").write_bytes(b"not an archive")
    refresh_checksums(copy)
    with pytest.raises(BadBundle, match=r"01\.pt: torch cannot load"):
        TorchScriptRunner(load_bundle(copy))


def test_server_with_the_torch_runner(twin_bundle: Path) -> None:
    x = load_dataset("digits:test").x[:8]
    proc = ServerProcess([twin_bundle], ["--runner", "torch"])
    try:
        proc.wait_ready()
        body = httpx.post(f"{proc.url}/v1/models/digits-twins/predict", json={"inputs": x.tolist(), "policy": "full"}).json()
        logits = OnnxRunner(load_bundle(twin_bundle)).run_all_exits(x, progress=False)[-1]
        assert [p["class_index"] for p in body["predictions"]] == logits.argmax(1).tolist()
    finally:
        proc.stop()
