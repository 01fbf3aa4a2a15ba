"""int8/int4 weights: ONNX Runtime's MatMulNBits graphs stay close to float32, and exact mode stays exact."""

from __future__ import annotations

import pytest
import torch
from llm_support import EXIT_LAYERS, random_prompts, tiny_calibration, tiny_heads, tiny_model

from exitserve.models.llm.llama import LayerSpan
from exitserve.models.llm.onnx_graphs import decoder_graphs
from exitserve.models.llm.precision import check_precision, int8_activations_for, quantise
from exitserve.service.serving.generation.decoder import MultiExitDecoder
from exitserve.service.serving.generation.runners import (
    OnnxRuntimeDecoderRunner,
    TorchDecoderRunner,
    make_runner,
)

# largest relative error (max |difference| / max |float32|) measured on the tiny model, with headroom
TOLERANCE = {"int8": 0.03, "int4": 0.25}


def test_weight_products_become_matmul_nbits_and_the_rest_stays():
    model = tiny_model()
    heads = tiny_heads(model).bind(model)
    graphs = decoder_graphs(model, heads)
    finish = quantise(graphs["finish_0"].model, graphs["finish_0"].weights, "int4")
    ops = [n.op_type for n in finish.graph.node]
    assert ops.count("MatMulNBits") == 2  # gate+up and down are large enough; the output projection (48x48) is not
    assert "Gemm" in ops and finish.ir_version <= 13
    head = quantise(graphs["head_0"].model, graphs["head_0"].weights, "int8")
    # the outside-mass product carries a bias: it stays a float32 Gemm
    assert any(n.op_type == "Gemm" and len(n.input) == 3 for n in head.graph.node)
    with pytest.raises(ValueError, match="float32 graphs are not quantised"):
        quantise(finish, {}, "float32")
    with pytest.raises(ValueError, match="unknown weight precision"):
        check_precision("int3")


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_layers_heads_and_lm_head_stay_within_tolerance(precision):
    model = tiny_model()
    heads = tiny_heads(model).bind(model)
    reference, quantised = TorchDecoderRunner(model, heads), OnnxRuntimeDecoderRunner(model, heads, precision=precision)
    torch.manual_seed(0)
    x = torch.randn(6, model.config.hidden_size)

    def error(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max())

    for index in range(model.config.num_layers):
        outs = []
        for runner in (quantised, reference):
            keys, values = model.new_cache(16)[index]
            outs.append(runner.layer(index, x, [LayerSpan.starting_at((0, 6), 0, keys, values)]))
        assert error(*outs) < TOLERANCE[precision], (index, error(*outs))
    assert error(quantised.lm_logits(x), reference.lm_logits(x)) < TOLERANCE[precision]
    assert error(quantised.head_logits(0, x), reference.head_logits(0, x)) < TOLERANCE[precision]


def test_exact_mode_equals_greedy_at_the_same_precision():
    model = tiny_model()
    heads = tiny_heads(model)
    calibration = tiny_calibration(model, heads)
    prompts = random_prompts(4, seed=7)
    outputs: dict[str, list[list[int]]] = {}
    for mode in ("full", "exact"):
        decoder = MultiExitDecoder(model, heads, EXIT_LAYERS, calibration, runner="onnxruntime", precision="int4")
        outputs[mode] = []
        for prompt in prompts:
            seq = decoder.new_sequence(prompt, capacity=len(prompt) + 40, mode=mode, delta=0.3, policy="pcee")
            while len(seq.tokens) < len(prompt) + 20:
                decoder.step([seq])
            outputs[mode].append(seq.tokens[len(prompt):len(prompt) + 20])
    assert outputs["exact"] == outputs["full"]
    float32 = MultiExitDecoder(model, heads, EXIT_LAYERS, calibration, runner="onnxruntime")
    seqs = [float32.new_sequence(p, capacity=len(p) + 40, mode="full") for p in prompts]
    while len(seqs[0].tokens) < len(prompts[0]) + 20:
        float32.step(seqs)
    # int4 greedy is its own model: on random weights it parts from float32 somewhere
    assert [s.tokens[len(p):len(p) + 20] for s, p in zip(seqs, prompts, strict=True)] != outputs["full"]


def test_the_torch_runner_refuses_quantised_weights():
    model = tiny_model()
    with pytest.raises(ValueError, match="onnxruntime runner only"):
        make_runner("torch", model, None, precision="int4")
    with pytest.raises(ValueError, match="int8 activations come with int8 or int4 weights"):
        make_runner("onnxruntime", model, None, int8_activations=True)


def test_int8_activations_use_the_fast_kernels():
    model = tiny_model()
    graphs = decoder_graphs(model, None)
    levels = {}
    for int8 in (False, True):
        quantised = quantise(graphs["finish_0"].model, graphs["finish_0"].weights, "int4", int8_activations=int8)
        [level] = {a.i for n in quantised.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                   if a.name == "accuracy_level"}
        levels[int8] = level
    assert levels == {False: 1, True: 4}
    # 8-bit weights have no fast float32 kernel: they always take int8 activations, and exact mode is off
    assert int8_activations_for("int8", False) and not int8_activations_for("int4", False)
