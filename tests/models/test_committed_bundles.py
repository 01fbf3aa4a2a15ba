"""Every bundle committed under bundles/ loads, verifies and runs (on the committed fixture images), and keeps its
promise on 2,000 CIFAR-10 test images (the full data set)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exitserve.calibration import Calibration
from exitserve.models.bundle import load_bundle
from exitserve.models.data import load_dataset
from exitserve.service.runners.onnx_runtime import OnnxRunner
from exitserve.service.serving.engine import ExitEngine
from tests.conftest import CIFAR10_FIXTURE

BUNDLES = sorted(p for p in (Path(__file__).parents[2] / "bundles").iterdir() if p.is_dir())


def test_both_cifar10_bundles_are_committed() -> None:
    assert {p.name for p in BUNDLES} >= {"cifar10-resnet-large", "cifar10-resnet-deep-late"}


@pytest.fixture(scope="module")
def test_images():
    data = load_dataset("cifar10:test")
    return data.x[:2000], data.y[:2000]


@pytest.mark.parametrize("path", BUNDLES, ids=lambda p: p.name)
def test_bundle_runs_fused_as_chained_on_the_fixture_images(path: Path) -> None:
    bundle = load_bundle(path, require_calibration=True)  # checksums verified
    calibration = Calibration.from_dict(bundle.calibration, num_exits=bundle.manifest.num_exits)
    runner = OnnxRunner(bundle)
    data = load_dataset(str(CIFAR10_FIXTURE))
    last = bundle.manifest.num_exits - 1
    chained = runner.run_all_exits(data.x[:16], progress=False)[-1]
    _, fused = runner.run_span(0, last, runner.start(data.x[:16]))
    np.testing.assert_allclose(fused, chained, atol=1e-4)
    result = ExitEngine(runner, calibration).run(data.x, np.full(len(data), 0.8), np.full(len(data), "pcee-lb-tail", dtype=object))
    assert result.exit_index.mean() < last and result.target_met.any()


@pytest.mark.needs_data("cifar10")
@pytest.mark.parametrize("path", BUNDLES, ids=lambda p: p.name)
def test_bundle_keeps_its_promise(path: Path, test_images) -> None:
    bundle = load_bundle(path, require_calibration=True)
    calibration = Calibration.from_dict(bundle.calibration, num_exits=bundle.manifest.num_exits)
    engine = ExitEngine(OnnxRunner(bundle), calibration)
    x, y = test_images
    last = bundle.manifest.num_exits - 1
    for delta in (0.8, 0.9):
        result = engine.run(x, np.full(len(x), delta), np.full(len(x), "pcee-lb-tail", dtype=object))
        kept = result.target_met
        promised = float((result.class_index[kept] == y[kept]).mean())
        assert kept.mean() > 0.5, f"{path.name}: only {kept.mean():.2f} of answers meet δ {delta}"
        assert promised >= delta - 0.02, f"{path.name}: promised accuracy {promised:.3f} at δ {delta}"
        assert result.exit_index.mean() < last, f"{path.name}: nothing left early at δ {delta}"
