"""One ONNX graph from a bundle's segments: the same model without exits, for comparisons.

Segment k's state outputs are wired to segment k+1's inputs (`onnx.compose`), then the graph is cut
down to what the last exit needs, so the early heads are gone. The result is written as a bundle
of one segment, served by the same server, tokenizer and HTTP path: any difference measured
against the multi-exit bundle is the cost or gain of exiting, nothing else.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnx.compose
import onnx.utils

from exitserve.models.bundle import MANIFEST_FILE, SegmentSpec, load_bundle, write_manifest
from exitserve.models.export import MAX_IR_VERSION


def merge_segments(bundle_dir: str | Path, every_exit: bool = False) -> onnx.ModelProto:
    """The bundle's segments as one graph: the last exit's logits only (early heads pruned), or with
    `every_exit` each exit's logits as an output (the pure cost of cutting, for benchmarks)."""
    bundle = load_bundle(bundle_dir)
    segments = bundle.manifest.segments
    models = [onnx.load(str(bundle.segment_path(k))) for k in range(len(segments))]
    return merge_span(segments, models, 0, len(segments) - 1, every_exit=every_exit, features=False)


def merge_span(segments: Sequence[SegmentSpec], models: Sequence[onnx.ModelProto], first: int, last: int,
               every_exit: bool = False, features: bool = True) -> onnx.ModelProto:
    """Segments first..last (their graphs `models`) as one graph taking segment `first`'s inputs and
    giving segment `last`'s outputs (its state, then its exit logits); the inner exit heads are
    pruned, or with `every_exit` kept as outputs. `features`: a span from segment 0 keeps its
    features tap as an output (models.features); the plain model (merge_segments) drops it."""
    final = len(segments) - 1
    merged: onnx.ModelProto | None = None
    for k in range(first, last + 1):
        # Unique names per segment (exporters reuse initializer names), but keep the span's inputs
        # and outputs named as the segments name them.
        model = onnx.compose.add_prefix(models[k], f"s{k}/", rename_inputs=k > first, rename_outputs=k < last)
        if merged is None:
            merged = model
            continue
        previous = segments[k - 1]
        io_map = [(f"s{k - 1}/{name}", f"s{k}/{name}") for name in previous.state_outputs]
        keep = [o.name for o in model.graph.output]
        tap = segments[first].features if first == 0 and features else None
        if tap is not None and not every_exit:  # the features tap of segment 0 stays an output (models.features)
            keep = [f"s0/{tap}", *keep]
        if every_exit:  # the earlier exits' logits stay outputs of the merged graph
            early = {f"s{j}/{segments[j].logits}" for j in range(first, k)}
            keep = [o.name for o in merged.graph.output if o.name in early] + keep
        merged = onnx.compose.merge_models(merged, model, io_map=io_map, outputs=keep)
    assert merged is not None
    merged.ir_version = min(merged.ir_version, MAX_IR_VERSION)
    if every_exit:
        exits = [s.logits if k == last else f"s{k}/{s.logits}" for k, s in enumerate(segments) if first <= k <= last]
        kept = {o.name for o in merged.graph.output}
        missing = [name for name in exits if name not in kept]
        assert not missing, missing
        del merged.graph.output[:]
        merged.graph.output.extend(_value_infos(merged, exits))
        return merged
    outputs = segments[last].outputs if last < final else [segments[last].logits]
    tap = segments[first].features if first == 0 and features else None
    if tap is not None:
        outputs = [*outputs, f"s0/{tap}"]
    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "merged.onnx"
        onnx.save(merged, str(whole))
        pruned = Path(tmp) / "pruned.onnx"
        # Keep only what feeds the span's outputs: the inner exit heads drop out.
        onnx.utils.extract_model(str(whole), str(pruned), list(segments[first].inputs), list(outputs))
        span = onnx.load(str(pruned))
    if tap is not None:  # the tap keeps its segment's name, as the runner binds it
        for node in span.graph.node:
            node.output[:] = [tap if name == f"s0/{tap}" else name for name in node.output]
        for value in span.graph.output:
            if value.name == f"s0/{tap}":
                value.name = tap
    return span


def monolithic_bundle(bundle_dir: str | Path, out_dir: str | Path, name: str | None = None) -> Path:
    """Write a one-segment, one-exit bundle equivalent to the last exit of `bundle_dir` (uncalibrated)."""
    source = load_bundle(bundle_dir)
    model = merge_segments(bundle_dir)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    (out / "segments").mkdir(parents=True)
    onnx.save(model, str(out / "segments" / "00.onnx"))
    raw = json.loads((source.path / MANIFEST_FILE).read_text())
    if source.manifest.input.text:
        shutil.copyfile(source.path / source.manifest.input.text.tokenizer, out / source.manifest.input.text.tokenizer)
    final = raw["segments"][-1]
    raw["name"] = name or out.name
    raw["segments"] = [{"file": "segments/00.onnx", "inputs": [source.manifest.input.name], "outputs": [final["logits"]],
                        "logits": final["logits"], "flops": source.manifest.full_flops}]
    raw["exits"] = [{"index": 0, "after_segment": 0, "cumulative_flops": source.manifest.full_flops}]
    raw.pop("spans", None)  # one segment: nothing to fuse
    raw["created_by"]["extra"] = {**raw["created_by"]["extra"], "monolithic_of": f"{source.manifest.name} v{source.manifest.version}"}
    write_manifest(out, raw)
    return out


def _value_infos(model: onnx.ModelProto, names: list[str]) -> list[onnx.ValueInfoProto]:
    """Output declarations for `names`, in that order (shapes from the segments' own declarations)."""
    known = {v.name: v for v in [*model.graph.output, *model.graph.value_info]}
    return [known[name] if name in known else onnx.helper.make_empty_tensor_value_info(name) for name in names]
