"""Fused segments: the layers between two exits as one ONNX Runtime call for one sequence's rows
(attention in the graph, the KV cache written in place) compute what the layers do one by one."""

from __future__ import annotations

import pytest
import torch
from llm_support import EXIT_LAYERS, FUSABLE, TINY, random_prompts, tiny_calibration, tiny_heads, tiny_model

from exitserve.service.serving.generation.decoder import MultiExitDecoder, segments_between
from exitserve.service.serving.generation.runners import OnnxRuntimeDecoderRunner, TorchDecoderRunner

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def parts():
    model = tiny_model(config=FUSABLE)
    heads = tiny_heads(model)
    return model, heads, tiny_calibration(model, heads)


def test_segments_lie_between_exits():
    assert segments_between([1, 3, 5]) == ((0, 1), (2, 3), (4, 5))
    assert segments_between([23, 29, 29]) == ((0, 23), (24, 29))  # an exit after the final layer, then the last


def test_only_head_sizes_that_group_query_attention_takes_are_fused():
    assert OnnxRuntimeDecoderRunner(tiny_model(config=FUSABLE), None, segments=((0, 2), (3, 5))).segments == {0: 2, 3: 5}
    assert OnnxRuntimeDecoderRunner(tiny_model(config=TINY), None, segments=((0, 2),)).segments == {}  # head size 12


@pytest.mark.parametrize(("start", "rows"), [(0, 5), (9, 1), (9, 3)])
def test_a_segment_equals_its_layers_one_by_one_and_writes_the_same_cache(parts, start, rows):
    """A prefill (no cache before), a decoding step, and pending positions joining (several rows)."""
    model = parts[0]
    fused = OnnxRuntimeDecoderRunner(model, None, segments=((0, 2), (3, 5)))
    torch.manual_seed(start + rows)
    mine = model.new_cache(32)
    for keys, values in mine:
        keys[:, :start].normal_()
        values[:, :start].normal_()
    theirs = [(k.clone(), v.clone()) for k, v in mine]
    x = torch.randn(rows, model.config.hidden_size)
    got = fused.segment(3, 5, fused.segment(0, 2, x, [start], mine), [start], mine)
    want = TorchDecoderRunner(model, None).segment(0, 5, x, [start], theirs)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for (k, v), (k2, v2) in zip(mine, theirs, strict=True):
        torch.testing.assert_close(k, k2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, v2, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no fused segment"):
        fused.segment(1, 2, x, [start], mine)


def generate_alone(dec: MultiExitDecoder, prompt: list[int], **options) -> tuple[list[int], list[int]]:
    seq = dec.new_sequence(prompt, capacity=len(prompt) + NEW_TOKENS + 16, **options)
    tokens: list[int] = []
    exits: list[int] = []
    while len(tokens) < NEW_TOKENS:
        for t in dec.step([seq])[0]:
            tokens.append(t.token)
            exits.append(t.exit)
    return tokens[:NEW_TOKENS], exits[:NEW_TOKENS]


@pytest.mark.parametrize("mode", ["full", "early", "exact"])
def test_a_sequence_decodes_the_same_with_and_without_fused_segments(parts, mode):
    """One sequence at a time (where segments fuse): same tokens and exits; early mode leaves pending
    positions that join at a segment's first layer; exact mode verifies drafts in one fused call."""
    model, heads, calibration = parts
    fused = MultiExitDecoder(model, heads, EXIT_LAYERS, calibration, runner="onnxruntime")
    plain = MultiExitDecoder(model, heads, EXIT_LAYERS, calibration, runner="onnxruntime", fuse_segments=False)
    assert fused.runner.segments == {0: 1, 2: 3, 4: 5} and plain.runner.segments == {}
    options = {} if mode == "full" else {"delta": 0.15, "policy": "confidence"}
    early = 0
    for prompt in random_prompts(8, seed=21):
        got = generate_alone(fused, prompt, mode=mode, **options)
        assert got == generate_alone(plain, prompt, mode=mode, **options)
        early += sum(e < len(EXIT_LAYERS) - 1 for e in got[1])
        if mode == "exact":
            assert got[0] == generate_alone(plain, prompt, mode="full")[0]
    assert (early > 0) == (mode != "full")
