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
# accuracy level 4: activations in int8 inside MatMulNBits (the fast CPU kernels; AVX512-VNNI/AVX2)
ACCURACY_LEVEL = 4
MIN_QUANTISED = 64 * 64  # smaller weights stay float32: nothing to gain


def check_precision(value: str) -> Precision:
    if value not in PRECISIONS:
        raise ValueError(f"unknown weight precision {value!r}; choose from {', '.join(PRECISIONS)}")
    return value


def quantise(model: onnx.ModelProto, weights: dict[str, np.ndarray], precision: Precision) -> onnx.ModelProto:
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
                                     accuracy_level=ACCURACY_LEVEL)
    quantiser.process()
    out = quantiser.model.model
    out.ir_version = model.ir_version  # ONNX Runtime rejects IR 14; keep the builder's
    return out
