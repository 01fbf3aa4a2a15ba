"""Export a MultiExitNet as a bundle: one ONNX graph per segment (with its exit head), verified."""

from __future__ import annotations

import errno
import pickle
import shutil
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from exitserve import __version__
from exitserve.models.bundle import Manifest, load_bundle, write_manifest
from exitserve.models.flops import segment_flops
from exitserve.models.net import MultiExitNet, SegmentWithHead, as_tuple

PARITY_TOLERANCE = 1e-4  # absolute, on tensors whose largest magnitude is at most 1; relative above
PARITY_BATCHES = (1, 7)
MAX_IR_VERSION = 10  # onnxruntime 1.31 rejects IR 14, which onnx 1.23 writes by default


def invocation() -> str:
    """The command line that made this, as a user would type it (`exitserve ...`)."""
    program = Path(sys.argv[0]).name
    if program in ("exitserve", "__main__.py") or sys.argv[0].endswith("service/cli/main.py"):
        return " ".join(["exitserve", *sys.argv[1:]])
    return " ".join(sys.argv)


class ExportParityError(RuntimeError):
    pass


HOW_TO_EXPORT_YOUR_OWN = ("to export your own network, pass --model package.module:factory: a function that builds it, "
                          "loads its weights and returns it wrapped (exitserve.models.wrap)")


def load_exportable_checkpoint(path: str | Path) -> tuple[MultiExitNet, dict[str, Any]]:
    """A checkpoint written by `exitserve train`, loaded without unpickling code.

    Anything else (a plain state_dict, a pickled module, another file) is a ValueError whose
    one-line message says what to pass instead.
    """
    from exitserve.models.architectures import ARCHITECTURES
    from exitserve.models.checkpoint import load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no such checkpoint file", str(path))
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise ValueError(f"{path} is not a PyTorch checkpoint; {HOW_TO_EXPORT_YOUR_OWN}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} holds pickled Python objects (a whole module saved with torch.save(model)?), and "
                         f"exitserve never unpickles code; {HOW_TO_EXPORT_YOUR_OWN}") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path} is not a PyTorch checkpoint ({exc}); {HOW_TO_EXPORT_YOUR_OWN}") from None
    if isinstance(payload, dict) and {"state_dict", "meta"} <= set(payload):
        architecture = payload["meta"].get("architecture") if isinstance(payload["meta"], dict) else None
        if architecture not in ARCHITECTURES:
            raise ValueError(f"{path}: architecture {architecture!r} is not one exitserve builds; {HOW_TO_EXPORT_YOUR_OWN}")
        return load_checkpoint(path)
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise ValueError(f"{path} is a plain state_dict (weights without the code of the network); {HOW_TO_EXPORT_YOUR_OWN}")
    raise ValueError(f"{path} is not a checkpoint written by `exitserve train`; {HOW_TO_EXPORT_YOUR_OWN}")


def segment_names(net: MultiExitNet, input_names: list[str]) -> list[tuple[list[str], list[str], str]]:
    """(inputs, outputs, logits name) of every segment graph."""
    names = []
    inputs = list(input_names)
    for k in range(net.num_exits):
        logits = f"logits_{k}"
        state = [] if k == net.num_exits - 1 else [f"{s}_{k}" for s in net.state_names]
        names.append((inputs, state + [logits], logits))
        inputs = state
    return names


def _export_segment(module: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path, inputs: list[str],
                    outputs: list[str], logits: str, sequence_axis: bool = False) -> None:
    # The exporter restores the top module's train/eval flag recursively afterwards: a wrapper left
    # in training mode would switch the whole net to training and corrupt batch-norm statistics.
    module.eval()
    dynamic_axes = {name: {0: "batch"} for name in inputs + outputs}
    if sequence_axis:  # text: token ids, hidden states and masks also vary in length
        for name in inputs + outputs:
            if name != logits:
                dynamic_axes[name][1] = "sequence"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter is ~30x faster on small graphs and exact for these ops.
        torch.onnx.export(
            module, example, str(path), input_names=inputs, output_names=outputs,
            dynamic_axes=dynamic_axes, opset_version=17, dynamo=False,
        )
    model = onnx.load(str(path))
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def verify_parity(net: MultiExitNet, bundle_dir: Path, manifest: Manifest, inputs: tuple[torch.Tensor, ...]) -> list[float]:
    """Run every segment in ONNX Runtime on real inputs at batch 1 and 7; max |diff| per segment
    (divided by the largest magnitude of the tensor where that is above 1)."""
    import onnxruntime as ort

    worst = [0.0] * net.num_exits
    for batch in PARITY_BATCHES:
        state = tuple(t[:batch] for t in inputs)
        ort_state = {manifest.input.name: state[0].numpy()}
        for k, spec in enumerate(manifest.segments):
            with torch.no_grad():
                expected = SegmentWithHead(net, k).eval()(*state)
            session = ort.InferenceSession(str(bundle_dir / spec.file), providers=["CPUExecutionProvider"])
            got = session.run(spec.outputs, {name: ort_state[name] for name in spec.inputs})
            for want, have in zip(expected, got, strict=True):
                if want.numel():
                    # float32 rounding grows with magnitude: transformer hidden states reach tens
                    scale = max(1.0, float(np.max(np.abs(want.numpy()))))
                    worst[k] = max(worst[k], float(np.max(np.abs(want.numpy() - have))) / scale)
            ort_state = dict(zip(spec.outputs, got, strict=True))
            state = expected[:-1]
    for k, diff in enumerate(worst):
        if diff > PARITY_TOLERANCE:
            raise ExportParityError(f"segment {k}: ONNX Runtime differs from PyTorch by {diff:.2e} (relative to the "
                                    f"largest magnitude where above 1) > {PARITY_TOLERANCE}")
    return worst


def export_bundle(
    net: MultiExitNet,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    out_dir: str | Path,
    labels: list[str],
    name: str = "model",
    version: str = "1",
    task: str = "classification",
    input_name: str = "input",
    preprocessing: dict[str, Any] | None = None,
    data_fingerprint: str = "",
    extra_provenance: dict[str, Any] | None = None,
    torchscript: bool = False,
    text: dict[str, Any] | None = None,
    extra_files: dict[str, Path] | None = None,
    spans: bool = True,
) -> tuple[Manifest, list[float]]:
    """Write a verified bundle directory; returns the manifest and the max parity error per segment.

    `example_inputs` are real inputs with at least 7 samples: they are used for tracing, for the
    FLOPs count and for the parity check at batch 1 and 7. `torchscript` also writes a traced
    TorchScript twin of every segment (`segments/NN.pt`) for the torch runner. `text` (the fields
    of `models.bundle.TextSpec`) marks a text model: token-id input, sequence axes left dynamic;
    `extra_files` (bundle-relative name -> source) are copied in and signed, e.g. the tokenizer.
    `spans` adds the fused span graphs the server runs between exits that can fire (models.spans).
    """
    inputs = as_tuple(example_inputs)
    if inputs[0].shape[0] < max(PARITY_BATCHES):
        raise ValueError(f"example_inputs need at least {max(PARITY_BATCHES)} samples for the parity check")
    net = net.cpu().eval()
    # training may leave channels_last weights; the stubs lack Module.to's memory_format keyword
    net.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    (out / "segments").mkdir(parents=True)

    names = segment_names(net, [input_name] if len(inputs) == 1 else [f"{input_name}_{i}" for i in range(len(inputs))])
    flops = segment_flops(net, inputs)
    segments, exits = [], []
    state = tuple(t[:2] for t in inputs)
    cumulative = 0
    for k, (seg_inputs, seg_outputs, logits) in enumerate(names):
        file = f"segments/{k:02d}.onnx"
        _export_segment(SegmentWithHead(net, k), state, out / file, seg_inputs, seg_outputs, logits, sequence_axis=text is not None)
        spec: dict[str, Any] = {"file": file, "inputs": seg_inputs, "outputs": seg_outputs, "logits": logits, "flops": flops[k]}
        if torchscript:
            twin = f"segments/{k:02d}.pt"
            spec["torchscript"] = twin
            with torch.no_grad():
                traced = torch.jit.trace(SegmentWithHead(net, k).eval(), state, check_trace=False)
            torch.jit.save(traced, str(out / twin))
        with torch.no_grad():
            state = as_tuple(net.segments[k](*state))
        cumulative += flops[k]
        segments.append(spec)
        exits.append({"index": k, "after_segment": k, "cumulative_flops": cumulative})

    for file_name, source in (extra_files or {}).items():
        shutil.copyfile(source, out / file_name)
    shape = [-1, -1] if text is not None else [-1, *inputs[0].shape[1:]]
    dtype = str(inputs[0].dtype).removeprefix("torch.")
    manifest = write_manifest(out, {
        "schema_version": 1,
        "name": name,
        "version": version,
        "task": task,
        "input": {"name": names[0][0][0], "shape": shape, "dtype": dtype, "preprocessing": preprocessing or {}, "text": text},
        "labels": list(labels),
        "segments": segments,
        "exits": exits,
        "created_by": {
            "exitserve_version": __version__,
            "command": invocation(),
            "data_fingerprint": data_fingerprint,
            "extra": extra_provenance or {},
        },
    })
    worst = verify_parity(net, out, manifest, inputs)
    if spans and len(segments) > 1:
        from exitserve.models.spans import add_spans

        add_spans(out)
        manifest = load_bundle(out).manifest
    return manifest, worst
