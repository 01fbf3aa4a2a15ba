"""Fixtures of the generation decoder tests: the tiny model with heads and tables, and each runner."""

from __future__ import annotations

import pytest
from llm_support import tiny_calibration, tiny_heads, tiny_model

from exitserve.service.serving.generation.runners import RUNNERS


@pytest.fixture(scope="module")
def parts():
    """The tiny Llama-shaped model, its exit heads and label-free tables (a test module may override it)."""
    model = tiny_model()
    heads = tiny_heads(model)
    return model, heads, tiny_calibration(model, heads)


@pytest.fixture(params=RUNNERS)
def runner(request) -> str:
    """Every decoder test runs on both runners: the torch modules and ONNX Runtime over the same weights."""
    return request.param
