"""The features tap: the first segment also outputs pooled statistics of its hidden state.

The input guard (calibration.input_guard) scores how unlike the calibration data an input is from
these statistics. They come out of the graph that runs anyway, so the serving path pays no extra
pass and no hidden state leaves the device: the segment-0 graph, and every span graph starting at
segment 0 (models.spans), gain one small output `features_0`:

  [N, C, H, W] (images)      per channel, the mean and the standard deviation over H x W: [N, 2C]
  [N, T, D] + mask [N, T]    per feature, the mean over the real (unmasked) tokens: [N, D]
  [N, D]                     the hidden state itself

Needs `onnx` (the `train` extra): `exitserve calibrate` adds the tap where it fits the guard.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from exitserve.errors import BadBundle
from exitserve.models.bundle import MANIFEST_FILE, load_bundle, write_manifest

FEATURES_OUTPUT = "features_0"


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


# The opset from which each op takes its axes as an input instead of an attribute.
_AXES_INPUT_SINCE = {"ReduceMean": 18, "ReduceSum": 13, "Unsqueeze": 13}


def _with_axes(op: str, source: str, out: str, axes: list[int], opset: int, name: str, keepdims: int | None = None
               ) -> list[onnx.NodeProto]:
    """`op` over `axes` in the form the model's opset wants (a Constant input, or the attribute before)."""
    nodes = []
    if opset >= _AXES_INPUT_SINCE[op]:
        axes_name = f"{name}/axes"
        nodes.append(helper.make_node("Constant", [], [axes_name], name=f"{name}/axes_const",
                                      value=helper.make_tensor(axes_name, TensorProto.INT64, [len(axes)], axes)))
        node = helper.make_node(op, [source, axes_name], [out], name=name)
    else:
        node = helper.make_node(op, [source], [out], name=name, axes=axes)
    if keepdims is not None:
        node.attribute.append(helper.make_attribute("keepdims", keepdims))
    return [*nodes, node]


def _rank(model: onnx.ModelProto, name: str) -> int:
    for value in model.graph.output:
        if value.name == name:
            return len(value.type.tensor_type.shape.dim)
    raise BadBundle(f"features tap: the first segment has no output {name!r}")


def tap_nodes(model: onnx.ModelProto, hidden: str, mask: str | None) -> list[onnx.NodeProto]:
    """Nodes computing FEATURES_OUTPUT, [N, D], from the hidden state (and the key mask of a text model)."""
    opset = _opset(model)
    rank = _rank(model, hidden)
    p = "features_tap"
    if rank == 4:
        nodes = _with_axes("ReduceMean", hidden, f"{p}/mean", [2, 3], opset, f"{p}/reduce_mean", keepdims=0)
        nodes += [helper.make_node("Mul", [hidden, hidden], [f"{p}/square"], name=f"{p}/square")]
        nodes += _with_axes("ReduceMean", f"{p}/square", f"{p}/mean_square", [2, 3], opset, f"{p}/reduce_square",
                            keepdims=0)
        nodes += [
            helper.make_node("Mul", [f"{p}/mean", f"{p}/mean"], [f"{p}/mean_squared"], name=f"{p}/mean_squared"),
            helper.make_node("Sub", [f"{p}/mean_square", f"{p}/mean_squared"], [f"{p}/variance_raw"], name=f"{p}/variance"),
            # Rounding can make E[x^2] - E[x]^2 slightly negative for a flat channel.
            helper.make_node("Relu", [f"{p}/variance_raw"], [f"{p}/variance"], name=f"{p}/clip"),
            helper.make_node("Sqrt", [f"{p}/variance"], [f"{p}/std"], name=f"{p}/std"),
            helper.make_node("Concat", [f"{p}/mean", f"{p}/std"], [FEATURES_OUTPUT], name=f"{p}/concat", axis=1),
        ]
        return nodes
    if rank == 3 and mask is not None:
        nodes = _with_axes("Unsqueeze", mask, f"{p}/weights", [2], opset, f"{p}/unsqueeze")
        nodes += [helper.make_node("Mul", [hidden, f"{p}/weights"], [f"{p}/weighted"], name=f"{p}/weighted")]
        nodes += _with_axes("ReduceSum", f"{p}/weighted", f"{p}/sum", [1], opset, f"{p}/sum", keepdims=0)
        nodes += _with_axes("ReduceSum", f"{p}/weights", f"{p}/count_raw", [1], opset, f"{p}/count", keepdims=0)
        one = helper.make_tensor(f"{p}/one", TensorProto.FLOAT, [], [1.0])
        nodes += [
            helper.make_node("Constant", [], [f"{p}/one"], name=f"{p}/one_const", value=one),
            helper.make_node("Max", [f"{p}/count_raw", f"{p}/one"], [f"{p}/count_safe"], name=f"{p}/count_safe"),
            helper.make_node("Div", [f"{p}/sum", f"{p}/count_safe"], [FEATURES_OUTPUT], name=f"{p}/mean"),
        ]
        return nodes
    if rank == 2:
        return [helper.make_node("Identity", [hidden], [FEATURES_OUTPUT], name=f"{p}/identity")]
    raise BadBundle(f"features tap: no pooling for a first-segment state of rank {rank} "
                      f"{'without' if mask is None else 'with'} a mask")


def add_features_tap(bundle_dir: str | Path) -> str:
    """Give an ONNX bundle's first segment (and its spans) the features output; returns its name.

    Idempotent: a bundle that has the tap keeps it. The manifest is rewritten and re-signed."""
    from exitserve.models.spans import add_spans  # spans import this module's helpers in turn

    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    if manifest.task == "text-generation":
        raise BadBundle(f"{bundle.path}: generation bundles have no segment graphs to tap")
    first = manifest.segments[0]
    if first.features is not None:
        return first.features
    if first.file.endswith(".pt"):
        raise BadBundle(f"{bundle.path}: the features tap needs ONNX segments")
    path = bundle.segment_path(0)
    model = onnx.load(str(path))
    states = first.state_outputs
    if not states:
        raise BadBundle(f"{bundle.path}: a one-segment model has no hidden state to tap")
    hidden = states[0]
    mask = states[1] if len(states) == 2 and _rank(model, states[1]) == 2 else None
    nodes = tap_nodes(model, hidden, mask)
    model.graph.node.extend(nodes)
    model.graph.output.append(helper.make_tensor_value_info(FEATURES_OUTPUT, TensorProto.FLOAT, ["batch", "features"]))
    onnx.checker.check_model(model)
    had_spans = bool(manifest.spans)
    onnx.save(model, str(path))  # weights inline; add_spans moves them back into the shared file
    raw = json.loads((bundle.path / MANIFEST_FILE).read_text())
    raw["segments"][0]["outputs"] = [*first.outputs, FEATURES_OUTPUT]
    raw["segments"][0]["features"] = FEATURES_OUTPUT
    write_manifest(bundle.path, raw)
    if had_spans:
        add_spans(bundle.path)  # the spans from segment 0 carry the tap too; weights shared again
    return FEATURES_OUTPUT
