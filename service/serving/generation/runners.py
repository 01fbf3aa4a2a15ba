"""What runs a decoder's layers and heads: torch modules, or ONNX Runtime sessions over the same weights.

The decoder (`decoder.MultiExitDecoder`) decides, the runner computes. Both runners keep the KV
cache in torch tensors and share `llama.attend` (per-sequence attention, written in place into the
cache), so they differ only in the dense parts. Chosen by measurement (BENCHMARKS.md, "Language
models"): ONNX Runtime on CPU, where its prepacked GEMV reads weights ~1.7× as fast as torch's
(a decoding step 1.56× faster). The ONNX Runtime runner also runs int8/int4 weights
(`models.llm.precision`); the torch runner float32 (or the dtype the model was loaded in) only.

CUDA is a provider switch for both: the torch runner moves the modules, the ONNX Runtime runner
opens its sessions with the CUDA provider on torch's current stream and binds torch's device
tensors as inputs and outputs (I/O binding by pointer: no host copies of hidden states).
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Any, Protocol

import numpy as np
import torch

from exitserve.models.llm.heads import ExitHeads
from exitserve.models.llm.llama import LayerSpan, LlamaModel, attend, batch_spans, span_positions
from exitserve.models.llm.precision import Precision, check_precision, int8_activations_for
from exitserve.service.runners.base import RUNNER_KINDS, RunnerKind, runner_kind

RUNNERS = RUNNER_KINDS


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    Building and quantising the graphs allocates several times the weights in temporaries; they are
    freed, but glibc keeps the pages, so the process looked ~0.5 GB larger than it is (BENCHMARKS.md,
    "Fused segments")."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class DecoderRunner(Protocol):
    # fused segments this runner has: first layer -> last layer (`segment`); empty: layer by layer only
    segments: dict[int, int]

    def segment(self, first: int, last: int, x: torch.Tensor, starts: list[int],
                cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Layers first..last over one sequence's rows, or one row each of a batch of sequences.

        `starts`: per sequence the position of its first row (one sequence: x holds its rows at
        starts[0], starts[0] + 1, ...; several: one row each). `cache[l]`: layer l's keys and values,
        [kv_heads, capacity, d] for one sequence, [batch, kv_heads, capacity, d] for a batch (consecutive
        slots of a `kv_pool.KVPool`). Writes the rows' keys and values into `cache`."""
        ...

    def layer(self, index: int, x: torch.Tensor, spans: list[LayerSpan]) -> torch.Tensor:
        """Decoder layer `index` over rows of one or more sequences; writes their keys and values."""
        ...

    def key_value(self, index: int, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s keys and values [rows, kv_heads, d] for hidden states x (CALM's copy-up)."""
        ...

    def head_logits(self, exit_index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Exit head `exit_index` on hidden states [n, width] -> `ExitHeads.logits` ([n, K] or [n, K + 1])."""
        ...

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's final norm and LM head: [n, width] -> [n, vocabulary]."""
        ...


class TorchDecoderRunner:
    def __init__(self, model: LlamaModel, heads: ExitHeads | None):
        self.model, self.heads = model, heads
        self.rotary = model.rotary()
        self.segments: dict[int, int] = {}  # torch's per-layer calls cost little next to its GEMVs

    def segment(self, first: int, last: int, x: torch.Tensor, starts: list[int],
                cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        for index in range(first, last + 1):
            keys, values = cache[index]
            x = self.layer(index, x, batch_spans(x.shape[0], starts, keys, values))
        return x

    def layer(self, index: int, x: torch.Tensor, spans: list[LayerSpan]) -> torch.Tensor:
        return self.model.layers[index].run(x, spans, self.rotary)

    def key_value(self, index: int, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.model.layers[index]
        return layer.self_attn.key_value(layer.input_layernorm(x), positions, self.rotary)

    def head_logits(self, exit_index: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.heads is None:
            raise RuntimeError("this bundle has no exit heads")
        return self.heads.logits(exit_index, hidden)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)


class OnnxRuntimeDecoderRunner:
    """The dense parts as ONNX Runtime sessions built from the model's weights (`models.llm.onnx_graphs`)."""

    def __init__(self, model: LlamaModel, heads: ExitHeads | None, *, threads: int = 1, device_id: int = 0,
                 precision: Precision = "float32", int8_activations: bool = False,
                 segments: tuple[tuple[int, int], ...] = ()):
        try:
            import onnxruntime as ort
            from onnxruntime.capi import onnxruntime_pybind11_state as C
            from onnxruntime.capi.onnxruntime_inference_collection import OrtDevice
        except ModuleNotFoundError:
            raise ValueError("the onnxruntime runner needs ONNX Runtime (the cpu or gpu extra); "
                             "or serve with --generation-runner torch") from None

        from exitserve.models.llm.onnx_graphs import decoder_graphs
        from exitserve.models.llm.precision import quantise

        int8_activations = int8_activations_for(check_precision(precision), int8_activations)

        weight = model.model.embed_tokens.weight
        if weight.dtype != torch.float32:
            raise ValueError(f"the onnxruntime runner runs float32 weights, not {weight.dtype}: use the torch runner")
        self.device = weight.device
        self.config = model.config
        self.rotary = model.rotary()
        self.head_columns = heads.output_columns if heads is not None else 0
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ValueError("the model is on a GPU but this ONNX Runtime has no CUDA provider: install the gpu "
                                 "extra (onnxruntime-gpu), or serve with --generation-runner torch")
            stream = torch.cuda.current_stream(self.device).cuda_stream
            providers: list = [("CUDAExecutionProvider", {"device_id": self.device.index or device_id,
                                                          "user_compute_stream": str(stream)})]
        else:
            providers = ["CPUExecutionProvider"]
        # Fused segments on the CPU only: GroupQueryAttention's CUDA kernel takes 16-bit floats, not these float32 graphs
        # and its kernel needs head sizes that are multiples of 8 (every Llama's: 64, 128)
        segments = segments if self.device.type == "cpu" and model.config.head_dim % 8 == 0 else ()
        self.segments = {first: last for first, last in segments if last > first}
        self._device = OrtDevice.make(self.device.type, self.device.index or 0)._get_c_device()
        self._new_binding = C.SessionIOBinding
        # GroupQueryAttention's rotary tables: one half of each angle row (the tables repeat it)
        half = model.config.head_dim // 2
        self._half_cos = self.rotary.cos[:, :half].contiguous()
        self._half_sin = self.rotary.sin[:, :half].contiguous()
        self.sessions: dict[str, tuple[Any, list, dict[str, np.ndarray]]] = {}
        for name, graph in decoder_graphs(model, heads, tuple(self.segments.items())).items():
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if precision != "float32":  # weights quantised into the graph itself, nothing external
                quantised = quantise(graph.model, graph.weights, precision, int8_activations)
                session = ort.InferenceSession(quantised.SerializeToString(), options, providers=providers)
                self.sessions[name] = (session, [], {})
                continue
            names = list(graph.weights)
            values = [ort.OrtValue.ortvalue_from_numpy(graph.weights[n]) for n in names]
            options.add_external_initializers(names, values)
            session = ort.InferenceSession(graph.model.SerializeToString(), options, providers=providers)
            self.sessions[name] = (session, values, graph.weights)  # the arrays must outlive the session
        release_freed_memory()

    def _binding(self, name: str) -> tuple[Any, Any]:
        """(session, a new I/O binding of it) at the C level: the Python wrappers cost ~10 µs a bind,
        and a fused segment binds ~100 tensors."""
        session = self.sessions[name][0]._sess
        return session, self._new_binding(session)

    def _run(self, name: str, inputs: dict[str, torch.Tensor], outputs: dict[str, tuple[int, ...]]) -> list[torch.Tensor]:
        session, binding = self._binding(name)
        keep = []
        for key, tensor in inputs.items():
            tensor = tensor.contiguous()
            keep.append(tensor)
            binding.bind_input(key, self._device, np.float32, tuple(tensor.shape), tensor.data_ptr())
        results = []
        for key, shape in outputs.items():
            out = torch.empty(shape, dtype=torch.float32, device=self.device)
            binding.bind_output(key, self._device, np.float32, shape, out.data_ptr())
            results.append(out)
        session.run_with_iobinding(binding, None)
        return results

    def segment(self, first: int, last: int, x: torch.Tensor, starts: list[int],
                cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        if self.segments.get(first) != last:
            raise ValueError(f"no fused segment of layers {first}..{last}")
        session, binding = self._binding(f"segment_{first}_{last}")
        rows, batch = x.shape[0], len(starts)
        x = x.contiguous()
        if batch > 1 and rows != batch:
            raise ValueError(f"a batch of {batch} sequences takes one row each, not {rows} rows")
        # GroupQueryAttention's view of the rows, per sequence the last position's index, and the
        # largest number of positions
        batch_rows = np.array([1, rows] if batch == 1 else [batch, 1], dtype=np.int64)
        last_positions = np.array([start + rows // batch - 1 for start in starts], dtype=np.int32)
        total = np.array(last_positions.max() + 1, dtype=np.int32)
        device = self._device
        for key, tensor in (("x", x), ("cos_cache", self._half_cos), ("sin_cache", self._half_sin)):
            binding.bind_input(key, device, np.float32, tuple(tensor.shape), tensor.data_ptr())
        binding.bind_input("batch_rows", device, np.int64, (2,), batch_rows.ctypes.data)
        binding.bind_input("seqlens_k", device, np.int32, (batch,), last_positions.ctypes.data)
        binding.bind_input("total_length", device, np.int32, (), total.ctypes.data)
        for index in range(first, last + 1):
            for kind, tensor in zip(("key", "value"), cache[index], strict=True):
                shape = tuple(tensor.shape) if tensor.dim() == 4 else (1, *tensor.shape)
                if shape[0] != batch or not tensor.is_contiguous():
                    raise ValueError(f"layer {index}'s {kind}s: {batch} contiguous caches, not {tuple(tensor.shape)}")
                # the caches themselves, in and out: written in place
                binding.bind_input(f"past_{kind}_{index}", device, np.float32, shape, tensor.data_ptr())
                binding.bind_output(f"present_{kind}_{index}", device, np.float32, shape, tensor.data_ptr())
        y = torch.empty_like(x)
        binding.bind_output("y", device, np.float32, tuple(y.shape), y.data_ptr())
        session.run_with_iobinding(binding, None)
        return y

    def _project(self, index: int, x: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        c, rows = self.config, x.shape[0]
        cos, sin = self.rotary.cos[positions][:, None, :], self.rotary.sin[positions][:, None, :]
        return self._run(f"project_{index}", {"x": x, "cos": cos, "sin": sin},
                         {"q": (rows, c.num_heads, c.head_dim), "k": (rows, c.num_kv_heads, c.head_dim),
                          "v": (rows, c.num_kv_heads, c.head_dim)})

    def layer(self, index: int, x: torch.Tensor, spans: list[LayerSpan]) -> torch.Tensor:
        q, k, v = self._project(index, x, span_positions(spans))
        attended = attend(q, k, v, spans)
        return self._run(f"finish_{index}", {"x": x, "attended": attended}, {"y": tuple(x.shape)})[0]

    def key_value(self, index: int, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, k, v = self._project(index, x, positions)
        return k, v

    def head_logits(self, exit_index: int, hidden: torch.Tensor) -> torch.Tensor:
        return self._run(f"head_{exit_index}", {"x": hidden}, {"logits": (hidden.shape[0], self.head_columns)})[0]

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._run("lm_head", {"x": hidden}, {"logits": (hidden.shape[0], self.config.vocab_size)})[0]


def make_runner(kind: RunnerKind | str, model: LlamaModel, heads: ExitHeads | None, *, threads: int = 1,
                precision: Precision = "float32", int8_activations: bool = False,
                segments: tuple[tuple[int, int], ...] = ()) -> DecoderRunner:
    name = runner_kind(kind)  # "onnx" is an alias of "onnxruntime"
    check_precision(precision)
    if name == "torch":  # the onnxruntime runner checks its own precision and activations
        if precision != "float32" or int8_activations:
            raise ValueError(f"{precision} weights run on the onnxruntime runner only (--generation-runner onnxruntime)")
        return TorchDecoderRunner(model, heads)
    if name == "onnxruntime":
        return OnnxRuntimeDecoderRunner(model, heads, threads=threads, precision=precision,
                                        int8_activations=int8_activations, segments=segments)
    raise ValueError(f"unknown decoder runner {kind!r}; choose from {', '.join(RUNNERS)}")
