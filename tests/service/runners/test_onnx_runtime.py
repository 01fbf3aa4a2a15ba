from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from exitserve.errors import BadBundle
from exitserve.models.bundle import load_bundle
from exitserve.models.data import load_dataset
from exitserve.service.runners.onnx_gather import build, build_concat
from exitserve.service.runners.onnx_runtime import OnnxRunner, RunnerOptions


@pytest.mark.parametrize(("elem_type", "dtype", "rank"), [(1, np.float32, 4), (1, np.float32, 2), (7, np.int64, 3), (9, np.bool_, 2)])
def test_hand_built_gather_graph(elem_type: int, dtype, rank: int) -> None:
    session = ort.InferenceSession(build(elem_type, rank), providers=["CPUExecutionProvider"])
    data = (np.random.default_rng(0).random((5,) + (3,) * (rank - 1)) * 10).astype(dtype)
    rows = np.array([4, 0, 2], dtype=np.int64)
    assert np.array_equal(session.run(None, {"data": data, "indices": rows})[0], data[rows])


def test_gather_graph_passes_the_onnx_checker() -> None:
    import onnx  # the train extra; tests install it
    onnx.checker.check_model(onnx.load_from_string(build(1, 4)), full_check=True)


def test_compaction_keeps_the_right_rows(digits_bundle_uncalibrated: Path) -> None:
    runner = OnnxRunner(load_bundle(digits_bundle_uncalibrated))
    x = np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32)
    full = runner.run_all_exits(x, progress=False)
    state, _ = runner.run_segment(0, runner.start(x))
    keep = np.array([5, 2, 3])
    state, logits = runner.run_segment(1, runner.select(state, keep))
    assert np.allclose(logits, full[1][keep], atol=1e-6)
    _, last = runner.run_segment(2, runner.select(state, np.array([1])))
    assert np.allclose(last, full[2][[2]], atol=1e-6)


def test_onnx_that_does_not_load_fails_loudly(bundle_copy: Path) -> None:
    from exitserve.models.bundle import refresh_checksums

    (bundle_copy / "segments" / "01.onnx").write_bytes(b"not a graph")
    refresh_checksums(bundle_copy)
    with pytest.raises(BadBundle, match=r"01\.onnx: ONNX Runtime cannot load"):
        OnnxRunner(load_bundle(bundle_copy))


def test_large_batches_run_on_their_own_sessions_with_the_same_answers(digits_bundle: Path) -> None:
    """Issue 16: batches from `large_batch_rows` rows may use more intra-op threads; same logits either way."""
    bundle = load_bundle(digits_bundle)
    small = OnnxRunner(bundle, options=RunnerOptions(threads=1))
    both = OnnxRunner(bundle, options=RunnerOptions(threads=1, large_batch_threads=2, large_batch_rows=8))
    assert both._large_sessions is not None and small._large_sessions is None
    x = load_dataset("digits:test").x[:16]
    for rows in (4, 16):  # below and above the threshold
        want = small.run_span(0, 2, small.start(x[:rows]))[1]
        got = both.run_span(0, 2, both.start(x[:rows]))[1]
        np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="per-session thread pools"):
        OnnxRunner(bundle, options=RunnerOptions(threads=1, large_batch_threads=2, thread_pool="global"))


@pytest.mark.parametrize(("elem_type", "dtype", "rank", "parts"), [(1, np.float32, 4, 2), (1, np.float32, 2, 3), (7, np.int64, 3, 2)])
def test_hand_built_concat_graph(elem_type: int, dtype, rank: int, parts: int) -> None:
    """Issue 16: continuous batching concatenates flights' states on the device with this graph."""
    session = ort.InferenceSession(build_concat(elem_type, rank, parts), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    arrays = [(rng.random((n,) + (3,) * (rank - 1)) * 10).astype(dtype) for n in range(1, parts + 1)]
    got = session.run(None, {f"part{i}": a for i, a in enumerate(arrays)})[0]
    assert np.array_equal(got, np.concatenate(arrays))
