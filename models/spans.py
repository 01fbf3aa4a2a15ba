"""Span graphs: segments first..last fused into one graph that computes only the last one's exit head.

The server runs a batch from stop to stop, where a stop is an exit that can let one of its samples
leave at its δ and policy (`Calibration.firing_exits`), or the last exit. Between two stops only the
hidden state is needed, so a span graph leaves the inner exit heads out (on the default model an exit
head is ~14 % of its segment) and the segment edges too (ONNX Runtime converts tensor layouts at
every graph's inputs and outputs: a chain of four graphs costs 4-8 % more than one). With no exit
able to fire, the span 0..L-1 *is* the plain model.

Every contiguous span first < last is written, K(K-1)/2 graphs for K exits, next to the segments,
and all of them and the segments keep their weights in one shared external-data file, so a bundle
with spans takes no more disk than one without. Needs `onnx` (the `train` extra); serving only reads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from exitserve.errors import BadBundle
from exitserve.models.bundle import MANIFEST_FILE, load_bundle, write_manifest
from exitserve.models.monolithic import merge_span

WEIGHTS_FILE = "weights.bin"  # beside the segment graphs: ONNX Runtime refuses external data outside a model's folder
_EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside their graph (shapes, scalars)
_ALIGN = 64


def span_file(first: int, last: int) -> str:
    return f"span-{first:02d}-{last:02d}.onnx"


def add_spans(bundle_dir: str | Path, check_rows: int = 8) -> list[tuple[int, int, float]]:
    """Write every span graph of an ONNX bundle, move all weights into one shared file, re-sign the
    manifest. Returns (first, last, max |logit difference|) per span against the chained segments,
    checked on `check_rows` random inputs; a difference above 1e-3 refuses the bundle."""
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    if manifest.task == "text-generation":
        raise BadBundle(f"{bundle.path}: generation bundles run their own decoder; spans are for segment graphs")
    segments = manifest.segments
    folder = bundle.segment_path(0).parent
    if any(bundle.segment_path(k).parent != folder for k in range(len(segments))):
        raise BadBundle(f"{bundle.path}: spans need every segment graph in one folder (they share one weights file)")
    models = [onnx.load(str(bundle.segment_path(k))) for k in range(len(segments))]
    spans = {(first, last): merge_span(segments, models, first, last)
             for first in range(len(segments)) for last in range(first + 1, len(segments))}

    for (first, last) in spans:  # a rerun replaces the previous spans
        (folder / span_file(first, last)).unlink(missing_ok=True)
    graphs = {bundle.segment_path(k): model for k, model in enumerate(models)}
    graphs.update({folder / span_file(first, last): model for (first, last), model in spans.items()})
    _share_weights(graphs, folder / WEIGHTS_FILE)
    for path, model in graphs.items():
        onnx.save(model, str(path))

    raw = json.loads((bundle.path / MANIFEST_FILE).read_text())
    relative = Path(segments[0].file).parent.as_posix()
    raw["spans"] = [{"first": first, "last": last, "file": f"{relative}/{span_file(first, last)}"} for first, last in spans]
    write_manifest(bundle.path, raw)
    return _check_spans(bundle.path, list(spans), check_rows)


def _share_weights(graphs: dict[Path, onnx.ModelProto], weights: Path) -> None:
    """Point every large initializer of `graphs` at one copy of its bytes in `weights` (deduplicated by content)."""
    offsets: dict[bytes, tuple[int, int]] = {}
    with weights.open("wb") as out:
        for model in graphs.values():
            for tensor in model.graph.initializer:
                data = numpy_helper.to_array(tensor).tobytes()
                if len(data) < _EXTERNAL_MIN_BYTES:
                    continue
                key = hashlib.sha256(data).digest()
                if key not in offsets:
                    out.write(b"\0" * (-out.tell() % _ALIGN))
                    offsets[key] = (out.tell(), len(data))
                    out.write(data)
                offset, length = offsets[key]
                for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                    tensor.ClearField(field)
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for name, value in (("location", weights.name), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = name, value


def _check_spans(bundle_dir: Path, spans: list[tuple[int, int]], rows: int) -> list[tuple[int, int, float]]:
    """(first, last, max |difference|) of each span's exit logits against the chained segments on
    random inputs; BadBundle above 1e-3."""
    from exitserve.service.runners.onnx_runtime import OnnxRunner

    runner = OnnxRunner(load_bundle(bundle_dir))
    spec = runner.bundle.manifest.input
    rng = np.random.default_rng(0)
    shape = [rows, *[d if d > 0 else 8 for d in spec.shape[1:]]]
    if spec.text is not None:
        x = rng.integers(1, spec.text.vocab_size, shape).astype(spec.dtype)
    else:
        x = rng.random(shape, dtype=np.float32).astype(spec.dtype)
    states, logits = [runner.start(x)], []  # the state at each segment's input, each exit's logits
    for k in range(runner.num_exits):
        state, exit_logits = runner.run_segment(k, states[-1])
        states.append(state)
        logits.append(exit_logits)
    out = []
    for first, last in spans:
        difference = float(np.abs(runner.run_span(first, last, states[first])[1] - logits[last]).max())
        if not difference <= 1e-3:
            raise BadBundle(f"{bundle_dir}: span {first}-{last} disagrees with the chained segments by {difference:g}")
        out.append((first, last, difference))
    return out
