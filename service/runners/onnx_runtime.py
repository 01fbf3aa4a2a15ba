"""ONNX Runtime runner: chains a bundle's segment sessions with IOBinding.

Hidden state lives in OrtValues on the execution device from one segment to the next; only each
exit's logits come back to the host. Compaction (keeping the rows that did not exit) is a Gather
run on the same device, so on CUDA no hidden state ever crosses to the host. CPU runs the very same
path, which is how CI covers it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from exitserve.errors import BadBundle
from exitserve.models.bundle import Bundle
from exitserve.service.runners import onnx_gather
from exitserve.service.runners.base import ChainRunner, Provider, RunnerOptions

_ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_ONNX_ELEMENT_TYPES = {"tensor(float)": 1, "tensor(float16)": 10, "tensor(int64)": 7, "tensor(int32)": 6, "tensor(bool)": 9}

_global_pool_lock = threading.Lock()
_global_pool_threads: int | None = None


def _ensure_global_pool(threads: int) -> None:
    global _global_pool_threads
    with _global_pool_lock:
        if _global_pool_threads is None:
            ort.set_global_thread_pool_sizes(threads, 1)
            _global_pool_threads = threads


def session_options(options: RunnerOptions) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = _OPT_LEVELS[options.graph_optimization]
    so.log_severity_level = 3
    spin = "1" if options.spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    if options.thread_pool == "global" and options.provider == "cpu":
        _ensure_global_pool(options.threads)
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
    return so


State = dict[str, ort.OrtValue]


class OnnxRunner(ChainRunner):
    """Runs segments of one bundle. Thread-safe: ORT sessions are, and per-call state is local."""

    gives_features = True

    def __init__(self, bundle: Bundle, provider: Provider = "cpu", threads: int = 1, options: RunnerOptions | None = None):
        self.bundle = bundle
        self.options = options or RunnerOptions(provider=provider, threads=threads)
        if self.options.large_batch_threads not in (None, self.options.threads) and self.options.thread_pool == "global":
            raise ValueError("large_batch_threads needs per-session thread pools (a global pool has one size)")
        self.device = "cuda" if self.options.provider == "cuda" else "cpu"
        self.device_id = self.options.device_id if self.device == "cuda" else 0
        providers: list[str | tuple[str, dict[str, int]]] = [_ORT_PROVIDERS[self.options.provider]]
        if self.options.provider == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("provider 'cuda' requested but this onnxruntime has no CUDAExecutionProvider")
            providers = [("CUDAExecutionProvider", {"device_id": self.device_id}), "CPUExecutionProvider"]
        self._providers = providers
        self.sessions, self.span_sessions = self._open_graphs(session_options(self.options))
        # Large batches on their own sessions with more intra-op threads (RunnerOptions.large_batch_threads).
        self._large_sessions: tuple[list[ort.InferenceSession], dict[tuple[int, int], ort.InferenceSession]] | None = None
        large = self.options.large_batch_threads
        if large is not None and large != self.options.threads and self.options.provider == "cpu":
            self._large_sessions = self._open_graphs(session_options(replace(self.options, threads=large)))
        self._helper_sessions: dict[tuple[str, str, int, int], ort.InferenceSession] = {}
        self._helper_lock = threading.Lock()
        # Every tensor a state can hold: the model's inputs (flights that have not run yet merge too) and
        # the segments' outputs.
        self._state_types = {
            o.name: (o.type, len(o.shape)) for s in self.sessions for o in [*s.get_inputs(), *s.get_outputs()]
        }
        self._input_type = self.sessions[0].get_inputs()[0]

    def warmup(self, batch_sizes: list[int]) -> None:
        """The segments and gathers (ChainRunner.warmup), then every span at every batch size: the
        engine runs spans, and a graph's first run at a new size pays for its memory plans."""
        super().warmup(batch_sizes)
        if not self.span_sessions:
            return
        shape = [d if d > 0 else 1 for d in self.bundle.manifest.input.shape[1:]]
        dtype = np.dtype(self.bundle.manifest.input.dtype)
        for n in batch_sizes:
            states = [self.start(np.zeros([n, *shape], dtype=dtype))]  # the state at each segment's input
            for k in range(self.num_exits - 1):
                states.append(self.run_segment(k, states[-1])[0])
            for first, last in self.span_sessions:
                self.run_span(first, last, states[first])

    def _open_graphs(self, so: ort.SessionOptions) -> tuple[list[ort.InferenceSession], dict[tuple[int, int], ort.InferenceSession]]:
        """Sessions for every segment and every fused span (models.spans), their inputs and outputs checked."""
        segments = self.bundle.manifest.segments
        sessions = [self._open(self.bundle.segment_path(k), spec.inputs, spec.outputs, so, "segment")
                    for k, spec in enumerate(segments)]
        # A span takes segment first's inputs and gives segment last's outputs.
        spans = {(first, last): self._open(path, segments[first].inputs, self._span_outputs(first, last), so, f"span {first}-{last}")
                 for (first, last), path in self.bundle.span_paths().items()}
        return sessions, spans

    def _open(self, path: Path, inputs: list[str], outputs: list[str], so: ort.SessionOptions, what: str) -> ort.InferenceSession:
        try:
            session = ort.InferenceSession(str(path), so, providers=self._providers)
        except Exception as exc:  # ORT raises several exception types for bad graphs
            raise BadBundle(f"{path}: ONNX Runtime cannot load this {what} ({exc})") from exc
        names_in = [i.name for i in session.get_inputs()]
        names_out = [o.name for o in session.get_outputs()]
        if names_in != inputs or sorted(names_out) != sorted(outputs):
            raise BadBundle(f"{path}: {what} inputs {names_in} / outputs {names_out} do not match the manifest "
                              f"({inputs} / {outputs})")
        return session

    def _span_outputs(self, first: int, last: int) -> list[str]:
        """Segment last's outputs, and the features tap where the span starts at segment 0 (models.features)."""
        segments = self.bundle.manifest.segments
        tap = segments[0].features if first == 0 else None
        return [*segments[last].outputs, *([tap] if tap else [])]

    def _sessions_for(self, state: State) -> tuple[list[ort.InferenceSession], dict[tuple[int, int], ort.InferenceSession]]:
        if self._large_sessions is not None:
            rows = next(iter(state.values())).shape()[0]
            if rows >= self.options.large_batch_rows:
                return self._large_sessions
        return self.sessions, self.span_sessions

    # --- the three steps the engine composes ----------------------------------------------------

    def start(self, x: np.ndarray) -> State:
        """Place the model input on the execution device."""
        name = self.bundle.manifest.input.name
        return {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), self.device, self.device_id)}

    def run_segment(self, k: int, state: State) -> tuple[State, np.ndarray]:
        """Run segment k; return the state for segment k+1 (device OrtValues) and the exit logits (host)."""
        spec = self.bundle.manifest.segments[k]
        return self._run_graph(self._sessions_for(state)[0][k], spec.inputs, spec.outputs, spec.logits, state)

    def run_span(self, first: int, last: int, state: State) -> tuple[State, np.ndarray]:
        session = self._sessions_for(state)[1].get((first, last))
        if session is None:
            return super().run_span(first, last, state)
        segments = self.bundle.manifest.segments
        return self._run_graph(session, segments[first].inputs, self._span_outputs(first, last), segments[last].logits, state)

    def _run_graph(self, session: ort.InferenceSession, inputs: list[str], outputs: list[str], logits_name: str,
                   state: State) -> tuple[State, np.ndarray]:
        binding = session.io_binding()
        for name in inputs:
            binding.bind_ortvalue_input(name, state[name])
        for name in outputs:
            # Logits (and the input guard's few pooled features) go to the host; the hidden state stays on the device.
            on_host = name == logits_name or name == self.features
            binding.bind_output(name, "cpu" if on_host else self.device, 0 if on_host else self.device_id)
        session.run_with_iobinding(binding)
        values = dict(zip(outputs, binding.get_outputs(), strict=True))
        logits = values.pop(logits_name).numpy()
        return values, logits

    def select(self, state: State, rows: np.ndarray) -> State:
        """Keep only `rows` (int64 indices) of every state tensor, on the device."""
        indices = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(rows, dtype=np.int64), self.device, self.device_id)
        out = {}
        for name, value in state.items():
            session = self._gather_session(name)
            binding = session.io_binding()
            binding.bind_ortvalue_input("data", value)
            binding.bind_ortvalue_input("indices", indices)
            binding.bind_output("out", self.device, self.device_id)
            session.run_with_iobinding(binding)
            out[name] = binding.get_outputs()[0]
        return out

    def concat(self, states: list[State]) -> State:
        """On the device: one hand-built Concat graph per tensor type, rank and count (CPU runs the same path)."""
        out = {}
        for name in states[0]:
            session = self._concat_session(name, len(states))
            binding = session.io_binding()
            for i, state in enumerate(states):
                binding.bind_ortvalue_input(f"part{i}", state[name])
            binding.bind_output("out", self.device, self.device_id)
            session.run_with_iobinding(binding)
            out[name] = binding.get_outputs()[0]
        return out

    def sample_shapes(self, state: State) -> tuple:
        return tuple((name, tuple(value.shape()[1:])) for name, value in state.items())

    def _concat_session(self, state_name: str, parts: int) -> ort.InferenceSession:
        onnx_type, rank = self._state_types[state_name]
        return self._helper_session(("concat", onnx_type, rank, parts),
                                    lambda: onnx_gather.build_concat(_ONNX_ELEMENT_TYPES[onnx_type], rank, parts))

    def _gather_session(self, state_name: str) -> ort.InferenceSession:
        onnx_type, rank = self._state_types[state_name]
        return self._helper_session(("gather", onnx_type, rank, 1),
                                    lambda: onnx_gather.build(_ONNX_ELEMENT_TYPES[onnx_type], rank))

    def _helper_session(self, key: tuple[str, str, int, int], build: Callable[[], bytes]) -> ort.InferenceSession:
        """A session of one hand-built graph (gather, concat), made once per key on first use."""
        session = self._helper_sessions.get(key)
        if session is None:
            with self._helper_lock:
                session = self._helper_sessions.get(key)
                if session is None:
                    # the model's providers: on CUDA the same device_id as the states it gathers
                    session = ort.InferenceSession(build(), session_options(self.options), providers=self._providers)
                    self._helper_sessions[key] = session
        return session
