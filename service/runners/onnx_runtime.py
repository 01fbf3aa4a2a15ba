"""ONNX Runtime runner: chains a bundle's segment sessions with IOBinding.

Hidden state lives in OrtValues on the execution device from one segment to the next; only each
exit's logits come back to the host. Compaction (keeping the rows that did not exit) is a Gather
run on the same device, so on CUDA no hidden state ever crosses to the host. CPU runs the very same
path, which is how CI covers it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from exitserve.errors import BadBundle
from exitserve.models.bundle import Bundle
from exitserve.service.runners import onnx_gather

Provider = Literal["cpu", "cuda"]
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


@dataclass(frozen=True)
class RunnerOptions:
    provider: Provider = "cpu"
    device_id: int = 0
    # "global": one process-wide intra-op pool shared by every segment session, measured fastest and
    # steadiest on 2 cores (shared/notes/onnxruntime.md). ORT then refuses any session in the process
    # that asks for its own pool, so only a dedicated serving process (Settings) turns it on.
    thread_pool: Literal["global", "per-session"] = "per-session"
    threads: int = 1
    spinning: bool = False
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    # Batches of at least `large_batch_rows` rows run on a second set of sessions with this many
    # intra-op threads (None: `threads` for every batch). Memory: the weights twice.
    large_batch_threads: int | None = None
    large_batch_rows: int = 32


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


class ChainRunner:
    """What every runner offers on top of start / run_segment / select (the engine's three steps)."""

    bundle: Bundle

    @property
    def num_exits(self) -> int:
        return len(self.bundle.manifest.segments)

    def start(self, x: np.ndarray) -> dict:
        raise NotImplementedError

    def run_segment(self, k: int, state: dict) -> tuple[dict, np.ndarray]:
        raise NotImplementedError

    def select(self, state: dict, rows: np.ndarray) -> dict:
        raise NotImplementedError

    def concat(self, states: list[dict]) -> dict:
        """Several batches' states as one, rows in order (segment-level continuous batching)."""
        raise NotImplementedError

    def sample_shapes(self, state: dict) -> tuple:
        """The state's tensor shapes beyond the batch axis: states concatenate only when these agree."""
        raise NotImplementedError

    def run_span(self, first: int, last: int, state: dict) -> tuple[dict, np.ndarray]:
        """Segments first..last; only segment `last`'s exit logits come back. Runners with fused span
        graphs skip the inner heads; this chain computes them and drops them."""
        for k in range(first, last + 1):
            state, logits = self.run_segment(k, state)
        return state, logits

    def run_all_exits(self, x: np.ndarray, batch_size: int = 256, progress: bool = True) -> list[np.ndarray]:
        """Every exit's logits for every sample (full depth; for calibration and evaluation)."""
        chunks: list[list[np.ndarray]] = [[] for _ in range(self.num_exits)]
        starts: Iterable[int] = range(0, len(x), batch_size)
        if progress:  # offline use only: the serving path never imports tqdm
            from tqdm import tqdm

            starts = tqdm(starts, desc="running segments", unit="batch")
        for start in starts:
            state = self.start(x[start : start + batch_size])
            for k in range(self.num_exits):
                state, logits = self.run_segment(k, state)
                chunks[k].append(logits)
        return [np.concatenate(c) if c else np.zeros((0, len(self.bundle.manifest.labels)), np.float32) for c in chunks]

    def warmup(self, batch_sizes: list[int]) -> None:
        """Run every segment (and the compaction gathers) once per batch size, before serving."""
        shape = [d if d > 0 else 1 for d in self.bundle.manifest.input.shape[1:]]
        dtype = np.dtype(self.bundle.manifest.input.dtype)
        for n in batch_sizes:
            state = self.start(np.zeros([n, *shape], dtype=dtype))
            for k in range(self.num_exits):
                state, _ = self.run_segment(k, state)
                if state and n > 1:
                    state = self.select(state, np.arange(n - 1))


class OnnxRunner(ChainRunner):
    """Runs segments of one bundle. Thread-safe: ORT sessions are, and per-call state is local."""

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
        spans = {(first, last): self._open(path, segments[first].inputs, segments[last].outputs, so, f"span {first}-{last}")
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
        return self._run_graph(session, segments[first].inputs, segments[last].outputs, segments[last].logits, state)

    def _run_graph(self, session: ort.InferenceSession, inputs: list[str], outputs: list[str], logits_name: str,
                   state: State) -> tuple[State, np.ndarray]:
        binding = session.io_binding()
        for name in inputs:
            binding.bind_ortvalue_input(name, state[name])
        for name in outputs:
            # Logits go to the host (the only copy); the hidden state stays on the device.
            on_host = name == logits_name
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
