"""ONNX graphs of a Llama decoder's dense parts, built in memory from the loaded weights.

Decoding one token is memory-bound: every step reads every weight once. On the 2-core CPU ONNX
Runtime's prepacked GEMV streams a cold weight at ~19 GB/s against torch's ~11 GB/s (BENCHMARKS.md,
"Language models"), so the dense parts run there. Attention stays outside the graphs (each
sequence has its own cache length; `llama.attend` does it in place in the KV cache), so per layer
there are two graphs:

  project_l   x [rows, width], cos/sin [rows, 1, head_dim] -> q [rows, heads, d], k, v [rows, kv_heads, d]
  finish_l    x, attended [rows, heads * d] -> x' (output projection, residual, MLP)

plus one per exit head (`head_k`: x -> logits over the head vocabulary) and the LM head (`lm_head`).
For one sequence's rows, the layers between two exits also run as one `segment_graph`, attention
included (ONNX Runtime's GroupQueryAttention over the cache in place): two calls a layer become one
call a segment, which is what a decoding step at batch 1 spends its overhead on.
Weights are not serialised into the graphs: every initializer is declared as external data and
handed to ONNX Runtime as an array (`Graph.weights`, `SessionOptions.add_external_initializers`),
so building 60 sessions takes seconds. Q/K/V and gate/up projections are concatenated into one
matrix each (one GEMV instead of three or two).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from exitserve.models.llm.heads import ExitHead, ExitHeads
from exitserve.models.llm.llama import DecoderLayer, LlamaModel, RMSNorm

OPSET = 17
IR_VERSION = 8  # ONNX Runtime rejects IR 14; 8 is what opset 17 needs
CONTRIB_DOMAIN = "com.microsoft"  # ONNX Runtime's own operators (GroupQueryAttention)


@dataclass
class Graph:
    """A graph and the arrays of its external initializers (kept alive as long as a session uses them)."""

    name: str
    model: onnx.ModelProto
    weights: dict[str, np.ndarray] = field(default_factory=dict)


class _Builder:
    def __init__(self, name: str, joined: dict[tuple[int, ...], np.ndarray] | None = None):
        self.name = name
        # concatenated weights by their parts' addresses: graphs built with the same dict share one array
        self.joined = {} if joined is None else joined
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.weights: dict[str, np.ndarray] = {}
        self.constants: list[onnx.TensorProto] = []
        self._count = 0

    def input(self, name: str, shape: list) -> str:
        return self.typed_input(name, TensorProto.FLOAT, shape)

    def typed_input(self, name: str, element_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, element_type, shape))
        return name

    def output(self, value: str, name: str, shape: list) -> None:
        self.nodes.append(helper.make_node("Identity", [value], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))

    def weight(self, name: str, value: torch.Tensor | np.ndarray) -> str:
        array = value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else value
        self.weights[name] = np.ascontiguousarray(array, dtype=np.float32)
        return name

    def joined_weight(self, name: str, parts: list[torch.Tensor]) -> str:
        """The row-wise concatenation of `parts` as one weight (Q/K/V, gate/up: one product instead of several)."""
        key = tuple(part.data_ptr() for part in parts)
        if key not in self.joined:
            self.joined[key] = np.ascontiguousarray(torch.cat(parts).detach().float().cpu().numpy(), dtype=np.float32)
        self.weights[name] = self.joined[key]
        return name

    def constant(self, value: np.ndarray) -> str:
        name = f"const_{len(self.constants)}"
        self.constants.append(helper.make_tensor(name, _onnx_type(value), value.shape, value.flatten().tolist()))
        return name

    def op(self, kind: str, inputs: list[str], outputs: int = 1, **attributes) -> list[str]:
        names = [f"{kind.lower()}_{self._count}_{i}" for i in range(outputs)]
        self._count += 1
        self.nodes.append(helper.make_node(kind, inputs, names, **attributes))
        return names

    def one(self, kind: str, inputs: list[str], **attributes) -> str:
        return self.op(kind, inputs, **attributes)[0]

    def linear(self, x: str, weight: str) -> str:
        """x [rows, in] @ weight [out, in].T (torch's Linear layout; Gemm transposes without a copy)."""
        return self.one("Gemm", [x, weight], transB=1)

    def rms_norm(self, x: str, norm: RMSNorm, name: str) -> str:
        # the pattern ONNX Runtime fuses into SimplifiedLayerNormalization
        squared = self.one("Pow", [x, self.constant(np.array(2.0, dtype=np.float32))])
        mean = self.one("ReduceMean", [squared], axes=[-1], keepdims=1)
        root = self.one("Sqrt", [self.one("Add", [mean, self.constant(np.array(norm.eps, dtype=np.float32))])])
        return self.one("Mul", [self.one("Div", [x, root]), self.weight(name, norm.weight)])

    def silu(self, x: str) -> str:
        return self.one("Mul", [x, self.one("Sigmoid", [x])])

    def rotate(self, x: str, cos: str, sin: str, head_dim: int) -> str:
        """Rotary embedding of x [rows, heads, d]: x * cos + rotate_half(x) * sin."""
        half = self.constant(np.array([head_dim // 2, head_dim // 2], dtype=np.int64))
        first, second = self.op("Split", [x, half], outputs=2, axis=-1)
        rotated = self.one("Concat", [self.one("Neg", [second]), first], axis=-1)
        return self.one("Add", [self.one("Mul", [x, cos]), self.one("Mul", [rotated, sin])])

    def build(self) -> Graph:
        externals = [_external(name, array) for name, array in self.weights.items()]
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, externals + self.constants)
        opsets = [helper.make_opsetid("", OPSET)]
        if any(node.domain == CONTRIB_DOMAIN for node in self.nodes):
            opsets.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = IR_VERSION
        return Graph(self.name, model, self.weights)


def _onnx_type(value: np.ndarray) -> int:
    return helper.np_dtype_to_tensor_dtype(value.dtype)


def _external(name: str, array: np.ndarray) -> onnx.TensorProto:
    """A float initializer declared as external data; its bytes come from the session options."""
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape),
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", f"{name}.bin"), ("offset", "0"), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _qkv(b: _Builder, layer: DecoderLayer, x: str, prefix: str = "") -> tuple[str, str, str]:
    """Queries [rows, heads * d], keys and values [rows, kv_heads * d] of hidden states x, not rotated."""
    attn = layer.self_attn
    h, kvh, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    qkv_weight = b.joined_weight(f"{prefix}qkv", [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    qkv = b.linear(b.rms_norm(x, layer.input_layernorm, f"{prefix}input_norm"), qkv_weight)
    sizes = b.constant(np.array([h * d, kvh * d, kvh * d], dtype=np.int64))
    q, k, v = b.op("Split", [qkv, sizes], outputs=3, axis=1)
    return q, k, v


def _project(b: _Builder, layer: DecoderLayer, x: str, cos: str, sin: str) -> tuple[str, str, str]:
    """Queries and keys (rotated) [rows, heads, d] / [rows, kv_heads, d] and values of hidden states x."""
    attn = layer.self_attn
    h, kvh, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k, v = _qkv(b, layer, x)
    heads_shape = b.constant(np.array([0, h, d], dtype=np.int64))
    kv_shape = b.constant(np.array([0, kvh, d], dtype=np.int64))
    q = b.rotate(b.one("Reshape", [q, heads_shape]), cos, sin, d)
    k = b.rotate(b.one("Reshape", [k, kv_shape]), cos, sin, d)
    return q, k, b.one("Reshape", [v, kv_shape])


def _finish(b: _Builder, layer: DecoderLayer, x: str, attended: str, prefix: str = "") -> str:
    """Output projection, residual and MLP after attention."""
    attn, mlp = layer.self_attn, layer.mlp
    intermediate = mlp.gate_proj.out_features
    x = b.one("Add", [x, b.linear(attended, b.weight(f"{prefix}o_proj", attn.o_proj.weight))])
    normed = b.rms_norm(x, layer.post_attention_layernorm, f"{prefix}post_attention_norm")
    gate_up = b.linear(normed, b.joined_weight(f"{prefix}gate_up", [mlp.gate_proj.weight, mlp.up_proj.weight]))
    gate, up = b.op("Split", [gate_up, b.constant(np.array([intermediate, intermediate], dtype=np.int64))],
                    outputs=2, axis=1)
    down = b.linear(b.one("Mul", [b.silu(gate), up]), b.weight(f"{prefix}down_proj", mlp.down_proj.weight))
    return b.one("Add", [x, down])


def project_graph(layer: DecoderLayer, index: int, joined: dict | None = None) -> Graph:
    attn = layer.self_attn
    h, kvh, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    b = _Builder(f"project_{index}", joined)
    x = b.input("x", ["rows", attn.q_proj.in_features])
    cos, sin = b.input("cos", ["rows", 1, d]), b.input("sin", ["rows", 1, d])
    q, k, v = _project(b, layer, x, cos, sin)
    b.output(q, "q", ["rows", h, d])
    b.output(k, "k", ["rows", kvh, d])
    b.output(v, "v", ["rows", kvh, d])
    return b.build()


def finish_graph(layer: DecoderLayer, index: int, joined: dict | None = None) -> Graph:
    attn = layer.self_attn
    width = attn.o_proj.out_features
    b = _Builder(f"finish_{index}", joined)
    x = b.input("x", ["rows", width])
    attended = b.input("attended", ["rows", attn.num_heads * attn.head_dim])
    b.output(_finish(b, layer, x, attended), "y", ["rows", width])
    return b.build()


def segment_graph(model: LlamaModel, first: int, last: int, joined: dict | None = None) -> Graph:
    """Layers first..last for the new rows of one sequence, or one new row each of several, attention
    included, in one graph.

    Per-layer graphs cost two session calls a layer and attention outside; at batch 1 that overhead
    was a third of a decoding step (BENCHMARKS.md, "Language models"). Here attention is ONNX
    Runtime's GroupQueryAttention, which rotates queries and keys itself (from `cos_cache`/`sin_cache`,
    at the positions after the cached ones), reads the sequence's KV cache in place and writes the
    new rows' keys and values into it (each layer's cache is bound as both `past_*` and `present_*`:
    shared buffers, no copy). Inputs: x [rows, width], `batch_rows` int64 [2] (how GroupQueryAttention
    sees the rows: [1, rows] for one sequence's rows, [rows, 1] for one row each of `rows` sequences
    whose caches are consecutive slots of one pool), cos/sin_cache [max positions, d / 2],
    `seqlens_k` [batch] int32 (per sequence, positions before its rows + rows - 1), `total_length`
    int32 (the largest of those + 1) and per layer l `past_key_l`/`past_value_l` [batch, kv_heads,
    capacity, d]; outputs y and `present_key_l`/`present_value_l`.
    """
    c = model.config
    h, kvh, d = c.num_heads, c.num_kv_heads, c.head_dim
    b = _Builder(f"segment_{first}_{last}", joined)
    x = b.input("x", ["rows", c.hidden_size])
    cos, sin = b.input("cos_cache", ["positions", d // 2]), b.input("sin_cache", ["positions", d // 2])
    batch_rows = b.typed_input("batch_rows", TensorProto.INT64, [2])
    seqlens = b.typed_input("seqlens_k", TensorProto.INT32, ["batch"])
    total = b.typed_input("total_length", TensorProto.INT32, [])
    batch_shape = b.one("Concat", [batch_rows, b.constant(np.array([h * d], dtype=np.int64))], axis=0)
    batch_kv_shape = b.one("Concat", [batch_rows, b.constant(np.array([kvh * d], dtype=np.int64))], axis=0)
    rows_shape = b.constant(np.array([-1, h * d], dtype=np.int64))
    for index in range(first, last + 1):
        layer = model.layers[index]
        prefix = f"l{index}_"
        q, k, v = _qkv(b, layer, x, prefix)
        past_k = b.input(f"past_key_{index}", ["batch", kvh, "capacity", d])
        past_v = b.input(f"past_value_{index}", ["batch", kvh, "capacity", d])
        attended, present_k, present_v = b.op(
            "GroupQueryAttention",
            [b.one("Reshape", [q, batch_shape]), b.one("Reshape", [k, batch_kv_shape]),
             b.one("Reshape", [v, batch_kv_shape]), past_k, past_v, seqlens, total, cos, sin],
            outputs=3, domain=CONTRIB_DOMAIN, num_heads=h, kv_num_heads=kvh, do_rotary=1)
        b.output(present_k, f"present_key_{index}", ["batch", kvh, "capacity", d])
        b.output(present_v, f"present_value_{index}", ["batch", kvh, "capacity", d])
        x = _finish(b, layer, x, b.one("Reshape", [attended, rows_shape]), prefix)
    b.output(x, "y", ["rows", c.hidden_size])
    return b.build()


def exit_head_graph(head: ExitHead, rows: torch.Tensor, index: int) -> Graph:
    """`ExitHeads.logits`: hidden [n, width] -> logits over the head vocabulary [n, K], then the outside
    estimate (log-sum-exp of the outside rows) as one more column where the head has one."""
    b = _Builder(f"head_{index}")
    x = b.input("x", ["rows", head.up.in_features])
    inner = b.linear(b.silu(b.linear(b.rms_norm(x, head.norm_in, "norm_in"), b.weight("up", head.up.weight))),
                     b.weight("down", head.down.weight))
    features = b.rms_norm(b.one("Add", [x, inner]), head.norm_out, "norm_out")
    logits = b.linear(features, b.weight("vocab_rows", rows))
    columns = int(rows.shape[0])
    if head.outside is not None:
        outside = b.one("Gemm", [features, b.weight("outside_rows", head.outside.weight),
                                 b.weight("outside_bias", head.outside.bias)], transB=1)
        mass = b.one("ReduceLogSumExp", [outside], axes=[-1], keepdims=1)
        logits, columns = b.one("Concat", [logits, mass], axis=1), columns + 1
    b.output(logits, "logits", ["rows", columns])
    return b.build()


def lm_head_graph(model: LlamaModel) -> Graph:
    b = _Builder("lm_head")
    x = b.input("x", ["rows", model.config.hidden_size])
    normed = b.rms_norm(x, model.model.norm, "norm")
    b.output(b.linear(normed, b.weight("lm_head", model.lm_head.weight)), "logits", ["rows", model.config.vocab_size])
    return b.build()


def decoder_graphs(model: LlamaModel, heads: ExitHeads | None,
                   segments: tuple[tuple[int, int], ...] = ()) -> dict[str, Graph]:
    """Every graph the ONNX Runtime decoder runner needs, by name (`segment_{first}_{last}` for each
    fused segment asked for)."""
    graphs = {}
    joined: dict[tuple[int, ...], np.ndarray] = {}  # one Q/K/V and one gate/up array a layer, shared by its graphs
    for first, last in segments:
        graphs[f"segment_{first}_{last}"] = segment_graph(model, first, last, joined)
    for index, layer in enumerate(model.layers):
        graphs[f"project_{index}"] = project_graph(layer, index, joined)
        graphs[f"finish_{index}"] = finish_graph(layer, index, joined)
    if heads is not None:
        for index, head in enumerate(heads.exit_heads):
            graphs[f"head_{index}"] = exit_head_graph(head, heads.bound_rows(), index)
    graphs["lm_head"] = lm_head_graph(model)
    return graphs
