"""The FLOPs a sample really costs each server, counted on the ONNX graphs it runs.

The manifest's `cumulative_flops` (and the `compute_fraction` answers carry) add up whole segments,
each with its exit head, so its "full depth" counts every inner head. The plain endpoint's model
has none of them, and exitserve computes only the heads of exits that can fire at the request's δ
and runs the stretch between two such exits as one fused span graph. So the FLOPs-ideal gain over
the plain endpoint is the plain graph's FLOPs over the FLOPs of the graphs exitserve ran for a
sample, not 1 / compute_fraction (which overstates it by the inner heads' share, 10 % on the
default bundle).

Counted like torch.utils.flop_counter, which measured the manifest's figures at export: 2 FLOPs a
multiply-add of Conv, Gemm and MatMul, per sample (batch 1); `check_against_manifest` holds the two
counts equal on every segment.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import shape_inference

from exitserve.calibration.rules import Calibration
from exitserve.models.bundle import Bundle
from exitserve.models.monolithic import merge_segments


def graph_flops(graph: Path | onnx.ModelProto) -> int:
    """FLOPs of one sample through a graph (Conv, Gemm and MatMul; batch axis pinned to 1)."""
    if isinstance(graph, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(graph)
    else:
        model = onnx.load(str(graph), load_external_data=False)  # weight shapes are in the graph, values are not needed
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_value = 1
    model = shape_inference.infer_shapes(model)
    graph = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*graph.input, *graph.value_info, *graph.output]}
    shapes.update({t.name: list(t.dims) for t in graph.initializer})
    flops = 0
    for node in graph.node:
        if node.op_type == "Conv":  # weight [out, in / groups, *kernel] applied at every output position
            flops += 2 * math.prod(shapes[node.input[1]]) * math.prod(_known(shapes, node.output[0])[2:])
        elif node.op_type in ("Gemm", "MatMul"):
            a, b = _known(shapes, node.input[0]), _known(shapes, node.input[1])
            transposed_b = node.op_type == "Gemm" and any(x.name == "transB" and x.i for x in node.attribute)
            out_features = b[-2] if transposed_b else b[-1]
            flops += 2 * math.prod(a) * out_features
    return flops


def _known(shapes: dict[str, list[int]], name: str) -> list[int]:
    shape = shapes.get(name)
    if shape is None or any(d <= 0 for d in shape):
        raise ValueError(f"shape of {name!r} is not known after shape inference: {shape}")
    return shape


def check_against_manifest(bundle: Bundle) -> None:
    """Fail loudly unless every segment graph's count equals the FLOPs its manifest records."""
    for k, spec in enumerate(bundle.manifest.segments):
        counted = graph_flops(bundle.segment_path(k))
        if abs(counted - spec.flops) > 1e-3 * spec.flops:
            raise ValueError(f"segment {k}: {counted} FLOPs counted on the graph, {spec.flops} in the manifest")


class RouteFlops:
    """FLOPs of a sample leaving at each exit, as exitserve's engine routes it for one (policy, δ)."""

    def __init__(self, bundle: Bundle, calibration: Calibration):
        check_against_manifest(bundle)
        self.num_exits = bundle.manifest.num_exits
        self.calibration = calibration
        self._segments = [graph_flops(bundle.segment_path(k)) for k in range(self.num_exits)]
        self._spans = {key: graph_flops(path) for key, path in bundle.span_paths().items()}
        # The plain model: the segments merged, inner heads pruned (what a fused full span holds).
        last = self.num_exits - 1
        if last == 0:
            self._plain = self._segments[0]
        elif (0, last) in self._spans:
            self._plain = self._spans[(0, last)]
        else:
            self._plain = graph_flops(merge_segments(bundle.path))

    def full_depth(self) -> int:
        """What one sample costs the plain model (segments merged, no inner head): exitserve's full depth
        where the bundle has the fused span 0..last."""
        return self._plain

    def heads(self) -> list[int]:
        """FLOPs of each exit's head: segment k + span k+1..last − span k..last, since a span holds the
        bodies of its segments and only its last head (0 for the last exit, whose head every path pays)."""
        last = self.num_exits - 1
        return [self._segments[k] + self._span(k + 1, last) - self._span(k, last) for k in range(last)] + [0]

    def bodies(self) -> list[int]:
        """FLOPs of each segment without its exit head (the last keeps its own)."""
        return [s - h for s, h in zip(self._segments, self.heads(), strict=True)]

    def _span(self, first: int, last: int) -> int:
        # The engine runs a fused span graph where the bundle has one, else the segments one by one.
        if first == last:
            return self._segments[first]
        return self._spans.get((first, last), sum(self._segments[first : last + 1]))

    def per_exit(self, policy: str, delta: float) -> np.ndarray:
        """[num_exits]: FLOPs of a sample that leaves at exit k (nan where no sample can leave)."""
        last = self.num_exits - 1
        stops = [last] if policy == "full" else sorted(set(self.calibration.next_firing_exits_at(policy, delta)))
        cost = np.full(self.num_exits, np.nan)
        spent, previous = 0, -1
        for stop in stops:
            spent += self._span(previous + 1, stop)
            cost[stop] = spent
            previous = stop
        return cost

    def mean(self, policy: str, delta: float, exit_index: np.ndarray) -> float:
        """Mean FLOPs per sample of samples that left at `exit_index` under (policy, δ)."""
        cost = self.per_exit(policy, delta)[np.asarray(exit_index)]
        if np.isnan(cost).any():
            raise ValueError(f"a sample left at an exit that cannot fire under {policy} at δ {delta}")
        return float(cost.mean())
