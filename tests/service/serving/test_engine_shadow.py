"""Shadow rows and per-exit traces in the engine (issue 8): answers are exactly those without
shadowing and are reported at their own exit; shadowed rows end with the last exit's prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exitserve.calibration import Calibration
from exitserve.models.bundle import load_bundle
from exitserve.models.data import load_dataset
from exitserve.service.runners.onnx_runtime import OnnxRunner
from exitserve.service.serving.engine import ExitEngine


@pytest.fixture(scope="module")
def setup(digits_bundle: Path):
    bundle = load_bundle(digits_bundle)
    runner = OnnxRunner(bundle)
    calibration = Calibration.from_dict(bundle.calibration, bundle.manifest.num_exits)
    x = load_dataset("digits:test").x[:120]
    logits = runner.run_all_exits(x, progress=False)
    return runner, calibration, x, logits


def run(engine: ExitEngine, x: np.ndarray, delta: float = 0.8, policy: str = "pcee-cond"):
    reported: list[tuple[int, np.ndarray]] = []

    def on_exit(rows, result):
        reported.append((int(result.exit_index[rows[0]]), rows.copy()))

    result = engine.run(x, np.full(len(x), delta), np.full(len(x), policy, dtype=object), on_exit=on_exit)
    return result, reported


def test_full_shadowing_changes_no_answer_and_delays_none(setup) -> None:
    runner, calibration, x, logits = setup
    plain, _ = run(ExitEngine(runner, calibration), x)
    shadowed, reported = run(ExitEngine(runner, calibration, shadow_fraction=1.0), x)
    for field in ("class_index", "exit_index", "estimate", "target_met", "confidence"):
        assert np.array_equal(getattr(plain, field), getattr(shadowed, field)), field
    assert plain.shadow_prediction is None
    rows = np.concatenate([r for _, r in reported])
    assert sorted(rows.tolist()) == list(range(len(x)))  # every sample answered once
    for k, r in reported:  # ... at the exit that answered it, not at the end of its shadow run
        assert (shadowed.exit_index[r] == k).all()
    last = len(logits) - 1
    early = shadowed.exit_index < last
    assert early.any() and (~early).any()
    assert np.array_equal(shadowed.shadow_prediction[early], logits[last][early].argmax(1))
    assert (shadowed.shadow_prediction[~early] == -1).all()


def test_a_lone_sample_is_shadowed_like_a_batch_row(setup) -> None:
    """One-row flights (the scalar path of issue 16): fully shadowed, each sample is answered once, at
    its own exit, with the unshadowed answer, and ends with the last exit's prediction."""
    runner, calibration, x, logits = setup
    plain, _ = run(ExitEngine(runner, calibration), x)
    engine = ExitEngine(runner, calibration, shadow_fraction=1.0)
    last = len(logits) - 1
    for i in range(len(x)):
        alone, reported = run(engine, x[i : i + 1])
        assert [(k, r.tolist()) for k, r in reported] == [(int(plain.exit_index[i]), [0])]
        for field in ("class_index", "exit_index", "estimate", "target_met", "confidence"):
            assert getattr(alone, field)[0] == getattr(plain, field)[i], (i, field)
        want = logits[last][i].argmax() if plain.exit_index[i] < last else -1
        assert alone.shadow_prediction is not None and alone.shadow_prediction[0] == want, i
    assert (plain.exit_index < last).any()


def test_a_fraction_of_early_exits_is_shadowed(setup) -> None:
    runner, calibration, x, _ = setup
    engine = ExitEngine(runner, calibration, shadow_fraction=0.3)
    shadowed = early = 0
    for _ in range(10):
        result, _ = run(engine, x)
        is_early = result.exit_index < calibration.num_exits - 1
        early += is_early.sum()
        shadowed += (result.shadow_prediction[is_early] >= 0).sum()
        assert (result.shadow_prediction[~is_early] == -1).all()
    share = shadowed / early
    assert 0.2 < share < 0.4, share  # 0.3 of ~1000 early exits: ±0.1 is more than 6 standard deviations


def test_trace_holds_every_exit_a_sample_ran_through(setup) -> None:
    runner, calibration, x, logits = setup
    for fraction in (0.0, 1.0):
        result, _ = run(ExitEngine(runner, calibration, shadow_fraction=fraction, trace=True), x)
        trace = result.trace
        for k, z in enumerate(logits):
            ran = result.exit_index >= k
            if fraction:
                ran |= result.shadow_prediction >= 0
            assert np.allclose(trace.confidence[ran, k], calibration.confidence(k, z[ran]), atol=1e-6)
            assert np.array_equal(trace.prediction[ran, k], z[ran].argmax(1))
            assert np.isnan(trace.confidence[~ran, k]).all() and (trace.prediction[~ran, k] == -1).all()


def test_fraction_outside_zero_one_is_refused(setup) -> None:
    runner, calibration, _, _ = setup
    with pytest.raises(ValueError, match="shadow_fraction"):
        ExitEngine(runner, calibration, shadow_fraction=1.5)
