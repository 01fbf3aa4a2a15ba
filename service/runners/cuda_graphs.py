"""CUDA graphs for the torch runner's spans, one per (span, batch-size bucket) (issue 16).

A multi-exit ResNet's segments are hundreds of small kernels; on a GPU their launches, not their
arithmetic, set the time (a batch of 64 costs what a batch of 1 costs). A captured graph replays
the whole span with one launch. A batch runs in the smallest bucket that holds it: its rows are
copied into the graph's static input, the padding rows keep whatever they held (every row is
computed on its own in eval mode, so they cannot touch the real ones), and the outputs are cloned
out of the graph's buffers, which the next replay overwrites. Graphs are captured on first use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

State = dict[str, torch.Tensor]
SpanFunction = Callable[[int, int, State], tuple[State, torch.Tensor]]
DEFAULT_BUCKETS = (1, 4, 16, 64)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: State
    outputs: State
    logits: torch.Tensor


class SpanGraphs:
    def __init__(self, run_span: SpanFunction, buckets: tuple[int, ...] = DEFAULT_BUCKETS):
        if not buckets or any(b < 1 for b in buckets):
            raise ValueError(f"CUDA graph buckets must be positive batch sizes, got {buckets}")
        self.run_span = run_span
        self.buckets = tuple(sorted(set(buckets)))
        self._graphs: dict[tuple, _Captured] = {}
        self._lock = threading.Lock()  # engine workers share a graph's static buffers: one replay at a time

    def bucket(self, rows: int) -> int | None:
        """The smallest bucket that holds `rows`, None above the largest (such batches run eagerly)."""
        return next((b for b in self.buckets if b >= rows), None)

    def run(self, first: int, last: int, state: State) -> tuple[State, torch.Tensor] | None:
        """Segments first..last by graph replay: (state, last exit's logits) on the device, or None
        when the batch is above every bucket."""
        rows = next(iter(state.values())).shape[0]
        bucket = self.bucket(rows)
        if bucket is None:
            return None
        key = (first, last, bucket, tuple((name, t.shape[1:], t.dtype) for name, t in state.items()))
        with self._lock:
            captured = self._graphs.get(key)
            if captured is None:
                captured = self._graphs[key] = self._capture(first, last, bucket, state)
            for name, tensor in state.items():
                captured.inputs[name][:rows].copy_(tensor)
            captured.graph.replay()
            outputs = {name: tensor[:rows].clone() for name, tensor in captured.outputs.items()}
            return outputs, captured.logits[:rows].clone()

    def _capture(self, first: int, last: int, bucket: int, state: State) -> _Captured:
        inputs = {name: torch.zeros((bucket, *t.shape[1:]), dtype=t.dtype, device=t.device) for name, t in state.items()}
        side = torch.cuda.Stream(device=next(iter(state.values())).device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: cuDNN and TorchScript's profiling settle here
            for _ in range(3):
                self.run_span(first, last, inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs, logits = self.run_span(first, last, inputs)
        return _Captured(graph, inputs, outputs, logits)

    def __len__(self) -> int:
        return len(self._graphs)
