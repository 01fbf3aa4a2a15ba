"""The dataplane in process: what it accepts, what it refuses (with which error class), and a round trip."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from exitserve.errors import InvalidInput, NotFound, Overloaded, PayloadTooLarge
from exitserve.service.monitoring.metrics import Metrics
from exitserve.service.serving.dataplane import Dataplane
from exitserve.service.serving.repository import ModelRepository, ServedModel
from exitserve.service.settings import Settings


@pytest.fixture(scope="module")
def dataplane(digits_bundle: Path) -> Iterator[Dataplane]:
    settings = Settings(bundles=[digits_bundle], max_request_samples=16, default_delta=0.8)
    repository = ModelRepository(settings, Metrics())
    repository.load(settings.bundles)
    repository.start()
    yield Dataplane(repository, settings)
    repository.stop(5.0)


@pytest.fixture(scope="module")
def model(dataplane: Dataplane) -> ServedModel:
    return dataplane.model("digits")


def test_unknown_model_is_a_404(dataplane: Dataplane) -> None:
    with pytest.raises(NotFound, match="unknown model 'nope'"):
        dataplane.model("nope")


@pytest.mark.parametrize(("delta", "expected"), [
    (None, [0.8, 0.8]), (0.5, [0.5, 0.5]), (1, [1.0, 1.0]), ([0.6, 0.95], [0.6, 0.95]),
    (np.array([0.7, 0.9], np.float32), [0.7, 0.9]),
])
def test_deltas_are_numbers_in_range(dataplane: Dataplane, delta: object, expected: list[float]) -> None:
    assert np.allclose(dataplane.check_deltas(delta, 2), expected)


@pytest.mark.parametrize("delta", ["0.9", True, b"0.9", [0.9, "0.9"], 0.0, 1.5, float("nan"), [0.9],
                                   np.array([b"0.9", b"0.8"], dtype=object)])
def test_anything_else_is_refused(dataplane: Dataplane, delta: object) -> None:
    with pytest.raises(InvalidInput, match="delta"):
        dataplane.check_deltas(delta, 2)


def test_inputs_are_checked_against_the_model(dataplane: Dataplane, model: ServedModel) -> None:
    good = np.zeros((2, 1, 8, 8), np.float64)
    checked = dataplane.check_inputs(model, good)
    assert checked.dtype == model.input_dtype and checked.flags.c_contiguous
    with pytest.raises(InvalidInput, match="does not match the model input"):
        dataplane.check_inputs(model, np.zeros((2, 8, 8), np.float32))
    with pytest.raises(InvalidInput, match="empty batch"):
        dataplane.check_inputs(model, np.zeros((0, 1, 8, 8), np.float32))
    with pytest.raises(InvalidInput, match="dtype uint8 given"):
        dataplane.check_inputs(model, np.zeros((1, 1, 8, 8), np.uint8))
    bad = good.copy()
    bad[1, 0, 3, 4] = np.inf
    with pytest.raises(InvalidInput, match=r"infinity at index \[1, 0, 3, 4\]"):
        dataplane.check_inputs(model, bad)
    with pytest.raises(PayloadTooLarge, match="17 samples exceed the limit of 16"):
        dataplane.check_inputs(model, np.zeros((17, 1, 8, 8), np.float32))
    with pytest.raises(InvalidInput, match="takes tensors, not texts"):
        dataplane.check_texts(model, ["a text"])


def test_policy_defaults_and_unknown_policies(dataplane: Dataplane, model: ServedModel) -> None:
    assert dataplane.check_policy(model, None, 3).tolist() == [dataplane.settings.default_policy] * 3
    with pytest.raises(InvalidInput, match="unknown policy 'fastest'"):
        dataplane.check_policy(model, "fastest", 1)


def test_infer_round_trip_and_a_model_that_is_not_ready(dataplane: Dataplane, model: ServedModel) -> None:
    x = dataplane.check_inputs(model, np.random.default_rng(0).random((3, 1, 8, 8)).astype(np.float32))

    async def ask() -> np.ndarray:
        prediction = await dataplane.infer(model, x, dataplane.check_deltas(1.0, 3),
                                           dataplane.check_policy(model, "full", 3), want_probabilities=True)
        assert prediction.result.probabilities is not None
        assert np.allclose(prediction.result.probabilities.sum(axis=1), 1.0, atol=1e-5)
        return prediction.result.exit_index

    assert asyncio.run(ask()).tolist() == [model.manifest.num_exits - 1] * 3  # policy full: the last exit
    model.ready = False
    try:
        with pytest.raises(Overloaded, match="not ready"):
            asyncio.run(ask())
    finally:
        model.ready = True
