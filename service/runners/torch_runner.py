"""Torch runner: chains a bundle's TorchScript segment twins (the `train` extra brings torch).

Same three steps as the ONNX Runtime runner (runners/base.py), so the engine cannot tell them apart: the hidden state stays
a device tensor between segments, only exit logits come to the host, compaction is an
index_select on the device. Loading uses torch.jit.load (a TorchScript archive, never a pickle of
Python objects).
"""

from __future__ import annotations

import numpy as np
import torch

from exitserve.errors import BadBundle
from exitserve.models.bundle import Bundle
from exitserve.service.runners.base import ChainRunner
from exitserve.service.runners.cuda_graphs import SpanGraphs

State = dict[str, torch.Tensor]


class TorchScriptRunner(ChainRunner):
    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int | None = None,
                 cuda_graph_buckets: list[int] | None = None):
        self.bundle = bundle
        self.device = torch.device(device)
        if cuda_graph_buckets and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a GPU; this torch runner runs on {self.device}")
        self.graphs = SpanGraphs(self._span, tuple(cuda_graph_buckets)) if cuda_graph_buckets else None
        if threads:
            torch.set_num_threads(threads)
        self.modules: list[torch.jit.ScriptModule] = []
        for k, spec in enumerate(bundle.manifest.segments):
            if spec.torchscript is None:
                raise BadBundle(f"{bundle.path / spec.file}: segment {k} has no TorchScript twin; "
                                  "export with --torchscript to use the torch runner")
            path = bundle.path / spec.torchscript
            try:
                module = torch.jit.load(str(path), map_location=self.device)
            except Exception as exc:  # torch raises several types for a bad archive
                raise BadBundle(f"{path}: torch cannot load this TorchScript segment ({exc})") from exc
            self.modules.append(module.eval())

    def start(self, x: np.ndarray) -> State:
        name = self.bundle.manifest.input.name
        return {name: torch.from_numpy(np.ascontiguousarray(x)).to(self.device)}

    @torch.inference_mode()
    def run_segment(self, k: int, state: State) -> tuple[State, np.ndarray]:
        state, logits = self._segment(k, state)
        return state, logits.float().cpu().numpy()

    @torch.inference_mode()
    def run_span(self, first: int, last: int, state: State) -> tuple[State, np.ndarray]:
        """Segments first..last with one read of the last exit's logits: on a GPU every read waits for
        the device, so reading each inner head's would cost a synchronisation per segment. With CUDA
        graphs the span replays as one launch where a bucket holds the batch."""
        replayed = self.graphs.run(first, last, state) if self.graphs is not None else None
        state, logits = replayed if replayed is not None else self._span(first, last, state)
        return state, logits.float().cpu().numpy()

    def _span(self, first: int, last: int, state: State) -> tuple[State, torch.Tensor]:
        for k in range(first, last + 1):
            state, logits = self._segment(k, state)
        return state, logits

    def _segment(self, k: int, state: State) -> tuple[State, torch.Tensor]:
        spec = self.bundle.manifest.segments[k]
        outputs = self.modules[k](*(state[name] for name in spec.inputs))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        # TorchScript twins have no features tap (models.features): this runner gives none (`gives_features`).
        values = dict(zip([name for name in spec.outputs if name != spec.features], outputs, strict=True))
        return values, values.pop(spec.logits)

    def select(self, state: State, rows: np.ndarray) -> State:
        index = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(self.device)
        return {name: value.index_select(0, index) for name, value in state.items()}

    def concat(self, states: list[State]) -> State:
        return {name: torch.cat([state[name] for state in states]) for name in states[0]}

    def sample_shapes(self, state: State) -> tuple:
        return tuple((name, tuple(value.shape[1:])) for name, value in state.items())
