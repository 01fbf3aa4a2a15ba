"""The runner interface, apart from any runtime: what the exit engine asks of a runner, and the one place
that builds a runner for a bundle (its kinds, `RunnerKind`, are settings values: service/settings.py).

Importing this module loads neither onnxruntime nor torch; `create_runner` imports the one it needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np

from exitserve.service.settings import RUNNER_KINDS, RunnerKind, runner_kind

if TYPE_CHECKING:
    from exitserve.models.bundle import Bundle

Provider = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class RunnerOptions:
    provider: Provider = "cpu"
    device_id: int = 0
    # "global": one process-wide intra-op pool shared by every segment session, measured fastest and
    # steadiest on 2 cores (docs/onnxruntime.md). ORT then refuses any session in the process
    # that asks for its own pool, so only a dedicated serving process (Settings) turns it on.
    thread_pool: Literal["global", "per-session"] = "per-session"
    threads: int = 1
    spinning: bool = False
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    # Batches of at least `large_batch_rows` rows run on a second set of sessions with this many
    # intra-op threads (None: `threads` for every batch). Memory: the weights twice.
    large_batch_threads: int | None = None
    large_batch_rows: int = 32


@runtime_checkable
class SegmentRunner(Protocol):
    """What the exit engine, calibration and evaluation ask of a runner. A state is the runner's own
    mapping of hidden tensors (on its device); only exit logits come back as numpy arrays."""

    bundle: Bundle

    @property
    def num_exits(self) -> int: ...

    @property
    def features(self) -> str | None: ...

    def take_features(self, state: dict, read: bool = True) -> np.ndarray | None: ...

    def start(self, x: np.ndarray) -> dict: ...

    def run_segment(self, k: int, state: dict) -> tuple[dict, np.ndarray]: ...

    def run_span(self, first: int, last: int, state: dict) -> tuple[dict, np.ndarray]: ...

    def select(self, state: dict, rows: np.ndarray) -> dict: ...

    def concat(self, states: list[dict]) -> dict: ...

    def sample_shapes(self, state: dict) -> tuple: ...

    def run_all_exits(self, x: np.ndarray, batch_size: int = 256, progress: bool = True) -> list[np.ndarray]: ...

    def run_all_exits_with_features(self, x: np.ndarray, batch_size: int = 256, progress: bool = True
                                    ) -> tuple[list[np.ndarray], np.ndarray | None]: ...

    def warmup(self, batch_sizes: list[int]) -> None: ...


class ChainRunner:
    """A SegmentRunner's shared part: spans, full-depth runs and warm-up built on the three steps each
    runner writes itself (start / run_segment / select, and concat / sample_shapes)."""

    bundle: Bundle
    gives_features = False  # does a run from segment 0 leave the features tap's values in its state?

    @property
    def num_exits(self) -> int:
        return len(self.bundle.manifest.segments)

    @property
    def features(self) -> str | None:
        """The features tap's name where this runner gives it (models.features), else None."""
        return self.bundle.manifest.segments[0].features if self.gives_features else None

    def take_features(self, state: dict, read: bool = True) -> np.ndarray | None:
        """Remove the features tap's values from a state a run from segment 0 returned: [n, D] on the host
        (`read` False: only remove them)."""
        name = self.features
        value = state.pop(name, None) if name else None
        return None if value is None or not read else value.numpy()

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
        return self.run_all_exits_with_features(x, batch_size, progress)[0]

    def run_all_exits_with_features(self, x: np.ndarray, batch_size: int = 256, progress: bool = True
                                    ) -> tuple[list[np.ndarray], np.ndarray | None]:
        """`run_all_exits`, and the features tap's values for every sample (None where the runner gives none)."""
        chunks: list[list[np.ndarray]] = [[] for _ in range(self.num_exits)]
        features: list[np.ndarray] = []
        starts: Iterable[int] = range(0, len(x), batch_size)
        if progress:  # offline use only: the serving path never imports tqdm
            from tqdm import tqdm

            starts = tqdm(starts, desc="running segments", unit="batch")
        for start in starts:
            state = self.start(x[start : start + batch_size])
            for k in range(self.num_exits):
                state, logits = self.run_segment(k, state)
                chunks[k].append(logits)
                if k == 0 and (tapped := self.take_features(state)) is not None:
                    features.append(tapped)
        logits_out = [np.concatenate(c) if c else np.zeros((0, len(self.bundle.manifest.labels)), np.float32) for c in chunks]
        return logits_out, np.concatenate(features) if features else None

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


def create_runner(bundle: Bundle, kind: str, options: RunnerOptions | None = None,
                  cuda_graph_buckets: list[int] | None = None) -> SegmentRunner:
    """A runner of `kind` ("onnxruntime", "torch", or an alias) for `bundle`. The torch runner needs the
    bundle's TorchScript twins and torch (the `train` extra); CUDA graphs apply to it on a GPU only."""
    options = options or RunnerOptions()
    canonical = runner_kind(kind)
    if canonical == "torch":
        from exitserve.service.runners.torch_runner import TorchScriptRunner  # torch only when asked for

        on_gpu = options.provider == "cuda"
        return TorchScriptRunner(bundle, device=f"cuda:{options.device_id}" if on_gpu else "cpu", threads=options.threads,
                                 cuda_graph_buckets=cuda_graph_buckets if on_gpu else None)
    if canonical == "onnxruntime":
        from exitserve.service.runners.onnx_runtime import OnnxRunner

        return OnnxRunner(bundle, options=options)
    raise ValueError(f"unknown runner {kind!r}; choose from {', '.join(RUNNER_KINDS)}")


__all__ = ["RUNNER_KINDS", "ChainRunner", "Provider", "RunnerKind", "RunnerOptions", "SegmentRunner", "create_runner", "runner_kind"]
