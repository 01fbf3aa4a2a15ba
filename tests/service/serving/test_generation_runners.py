"""The decoder runners: ONNX Runtime over graphs built from the weights computes what the torch modules do."""

from __future__ import annotations

import pytest
import torch
from llm_support import EXIT_LAYERS, tiny_heads, tiny_model

from exitserve.models.llm.llama import LayerSpan
from exitserve.service.serving.generation.runners import (
    OnnxRuntimeDecoderRunner,
    TorchDecoderRunner,
    make_runner,
)


@pytest.fixture(scope="module")
def runners():
    model = tiny_model()
    heads = tiny_heads(model).bind(model)
    return model, TorchDecoderRunner(model, heads), OnnxRuntimeDecoderRunner(model, heads)


def spans_for(model, layer: int, starts: list[int], lengths: list[int]):
    """Two sequences with their own caches, `lengths[i]` new rows at positions starts[i]..; caches pre-filled."""
    spans, row = [], 0
    for start, n in zip(starts, lengths, strict=True):
        keys, values = model.new_cache(64)[layer]
        keys[:, :start].normal_()
        values[:, :start].normal_()
        spans.append(LayerSpan.starting_at((row, row + n), start, keys, values))
        row += n
    return spans


def test_every_layer_equals_torch_and_writes_the_same_cache(runners):
    model, torch_runner, onnx_runner = runners
    torch.manual_seed(0)
    for index in range(model.config.num_layers):
        x = torch.randn(5, model.config.hidden_size)
        mine = spans_for(model, index, [7, 3], [2, 3])  # a pending position joins one sequence: 2 rows
        theirs = [LayerSpan(s.rows, s.start, s.keys.clone(), s.values.clone(), s.positions) for s in mine]
        got = onnx_runner.layer(index, x, mine)
        want = torch_runner.layer(index, x, theirs)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


def test_heads_lm_head_and_copied_up_kv_equal_torch(runners):
    model, torch_runner, onnx_runner = runners
    x = torch.randn(3, model.config.hidden_size)
    for k in range(len(EXIT_LAYERS) - 1):
        torch.testing.assert_close(onnx_runner.head_logits(k, x), torch_runner.head_logits(k, x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(onnx_runner.lm_logits(x), torch_runner.lm_logits(x), atol=1e-4, rtol=1e-4)
    positions = torch.tensor([4, 5, 6])
    for got, want in zip(onnx_runner.key_value(2, x, positions), torch_runner.key_value(2, x, positions), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_runner_choice_is_checked():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown decoder runner"):
        make_runner("tensorrt", model, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="float32"):
        OnnxRuntimeDecoderRunner(model.to(torch.bfloat16), None)
