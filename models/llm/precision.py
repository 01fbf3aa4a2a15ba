"""Weight precision of the ONNX Runtime decoder graphs: float32, or 8/4-bit weight-only quantisation.

Decoding on a CPU is memory-bound (every weight is read once per step), so fewer bytes per weight
is speed. The graphs are built from the same float32 weights as ever; for `int8`/`int4` each
matrix product with a weight (`Gemm` with a transposed weight, as the builder writes them) becomes
a `MatMul` and ONNX Runtime's own `MatMulNBitsQuantizer` turns it into its `MatMulNBits` contrib op
(blockwise symmetric, `BLOCK_SIZE` weights per scale). Norms, rotary embeddings, attention and the
embedding lookup stay float32, and so does the small bias-carrying outside-mass product of the exit
heads.

What this changes for users: exact mode is exact with respect to the model *at that precision*
(its drafts are verified by the quantised full model), and the reliability tables, fitted on the
float32 model, promise agreement with the float32 model's tokens; the README says both.

Activations: by default MatMulNBits computes in float32 (accuracy level 1), where a call's result
for a row does not depend on how many rows the call has, so exact mode (which verifies several
drafts in one call) stays identical to greedy decoding (one row per call). `int8_activations`
(accuracy level 4) quantises the activations to int8 as well, as llama.cpp's Q4/Q8 dot products do:
about 1.6× faster here, but the kernels for one row and for several round differently, so exact
mode would part from greedy at near-ties (measured: 6 of 8 prompts identical over 64 tokens); the
server then refuses exact mode. 8-bit weights always take int8 activations: ONNX Runtime has no
fast kernel for them with float32 (or 16-bit) compute (measured: 4 tokens/s against 25 for float32).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

Precision = Literal["float32", "int8", "int4"]
PRECISIONS: tuple[Precision, ...] = ("float32", "int8", "int4")
BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32
FLOAT32_ACTIVATIONS = 1  # MatMulNBits accuracy level: float32 compute
INT8_ACTIVATIONS = 4  # int8 compute (the fast CPU kernels; AVX512-VNNI/AVX2)
MIN_QUANTISED = 64 * 64  # smaller weights stay float32: nothing to gain


def int8_activations_for(precision: Precision, requested: bool) -> bool:
    """Whether the graphs compute with int8 activations: when asked (int8/int4 weights), and always for int8."""
    if requested and precision == "float32":
        raise ValueError("int8 activations come with int8 or int4 weights")
    return requested or precision == "int8"


def check_precision(value: str) -> Precision:
    if value not in PRECISIONS:
        raise ValueError(f"unknown weight precision {value!r}; choose from {', '.join(PRECISIONS)}")
    return value


def quantise(model: onnx.ModelProto, weights: dict[str, np.ndarray], precision: Precision,
             int8_activations: bool = False) -> onnx.ModelProto:
    """A self-contained copy of `model` (weights embedded) whose weight products run at `precision`."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if precision == "float32":
        raise ValueError("float32 graphs are not quantised")
    graph = onnx.ModelProto()
    graph.CopyFrom(model)
    transposed: dict[str, np.ndarray] = {}
    nodes = []
    for node in graph.graph.node:
        weight = node.input[1] if len(node.input) == 2 else None
        trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
        if node.op_type == "Gemm" and weight in weights and trans_b and weights[weight].size >= MIN_QUANTISED:
            name = f"{weight}_t"
            transposed.setdefault(name, np.ascontiguousarray(weights[weight].T))
            nodes.append(helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name))
        else:
            nodes.append(node)
    used = {i for node in nodes for i in node.input}
    initializers = [t for t in graph.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    initializers += [numpy_helper.from_array(array, name) for name, array in weights.items() if name in used]
    initializers += [numpy_helper.from_array(array, name) for name, array in transposed.items()]
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(initializers)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantiser = MatMulNBitsQuantizer(graph, bits=BITS[precision], block_size=BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=INT8_ACTIVATIONS if int8_activations else FLOAT32_ACTIVATIONS)
    quantiser.process()
    out = quantiser.model.model
    out.ir_version = model.ir_version  # ONNX Runtime rejects IR 14; keep the builder's
    return out
