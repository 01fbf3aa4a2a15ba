"""`exitserve export`: a trained checkpoint, or your own network from a factory, as a verified bundle."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from exitserve.service.cli.errors import UserError
from exitserve.service.cli.flags import add_parser

if TYPE_CHECKING:
    from exitserve.models.wrap import Exportable


def export_checkpoint(checkpoint: Path, out: Path, name: str | None, version: str, torchscript: bool = False) -> int:
    """Export a checkpoint of `exitserve train`, traced and verified on its own validation split."""
    import torch

    from exitserve.models.data import load_dataset
    from exitserve.models.export import export_bundle, load_exportable_checkpoint

    net, meta = load_exportable_checkpoint(checkpoint)
    val = load_dataset(f"{meta['data']}:val", seed=meta.get("split_seed", 0))
    examples = torch.from_numpy(val.x[:16])
    manifest, worst = export_bundle(
        net, examples, out, labels=meta["labels"], name=name or out.name, version=version,
        task="image-classification",
        preprocessing={"layout": "NCHW", "scale": "pixels / 255 (values in [0, 1])", "normalisation": "inside segment 0"},
        data_fingerprint=meta.get("train_fingerprint", ""),
        extra_provenance={
            "architecture": meta["architecture"], "data": meta.get("data"), "split_seed": meta.get("split_seed"),
            "val_fingerprint": meta.get("val_fingerprint"), "train_config": meta.get("train_config"),
            "val_accuracy": meta["history"][-1]["val_accuracy"] if meta.get("history") else None,
            "train_seconds": meta.get("train_seconds"),
        },
        torchscript=torchscript,
    )
    _report(out, manifest.num_exits, worst)
    return 0


def _report(out: Path, num_exits: int, worst: list[float]) -> None:
    print(f"bundle {out}: {num_exits} exits; ONNX vs PyTorch max |diff| per segment: "
          + ", ".join(f"{d:.1e}" for d in worst))


def load_factory(spec: str) -> object:
    """Import `package.module:function` (from the working directory too) and call it."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UserError(f"--model {spec!r}: expected package.module:function, e.g. my_package.my_module:build_model")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # like `python -m`: the user's own modules are importable
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise UserError(f"--model {spec!r}: no module named {exc.name!r} (run from the folder that holds it, "
                            "or install it)") from None
        raise
    factory = getattr(module, attribute, None)
    if factory is None:
        raise UserError(f"--model {spec!r}: module {module_name} has no {attribute!r}")
    if not callable(factory):
        raise UserError(f"--model {spec!r}: {attribute} is a {type(factory).__name__}, not a function")
    return factory()


def _examples(path: str | None):  # -> torch.Tensor | None
    if path is None:
        return None
    import numpy as np
    import torch

    with np.load(path) as data:
        if "x" not in data.files:
            raise UserError(f"--examples {path}: needs an array named 'x' of example inputs (has {', '.join(data.files)})")
        return torch.from_numpy(np.ascontiguousarray(data["x"]))


def export_factory(args: argparse.Namespace) -> int:
    from exitserve.models.export import export_bundle
    from exitserve.models.wrap import as_exportable

    exportable: Exportable = as_exportable(load_factory(args.model), args.model, _examples(args.examples))
    net = exportable.net.eval()
    inputs = exportable.example_inputs
    labels = args.labels.split(",") if args.labels else exportable.labels
    if labels is None:
        import torch

        with torch.no_grad():
            classes = net(*(inputs if isinstance(inputs, tuple) else (inputs,)))[-1].shape[-1]
        labels = [str(i) for i in range(classes)]
    out = Path(args.out)
    manifest, worst = export_bundle(
        net, inputs, out, labels=list(labels), name=args.name or exportable.name or out.name, version=args.version,
        task=exportable.task, preprocessing=exportable.preprocessing, torchscript=args.torchscript,
        extra_provenance={"factory": args.model},
    )
    _report(out, manifest.num_exits, worst)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    if (args.checkpoint is None) == (args.model is None):
        raise UserError("export takes a CHECKPOINT of `exitserve train` or --model package.module:factory (one of them)")
    if args.model is None:
        if args.examples or args.labels:
            raise UserError("--examples and --labels go with --model")
        return export_checkpoint(Path(args.checkpoint), Path(args.out), args.name, args.version, args.torchscript)
    return export_factory(args)


def _cmd_spans(args: argparse.Namespace) -> int:
    from exitserve.models.spans import add_spans

    for first, last, difference in add_spans(Path(args.bundle)):
        print(f"span {first}-{last}: max |logit difference| vs the chained segments {difference:.2e}")
    print(f"{args.bundle}: spans written, weights shared in one file, manifest re-signed")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "export", "export a trained checkpoint, or your own network (--model), as a verified bundle "
                                  "of per-segment ONNX graphs")
    p.add_argument("checkpoint", nargs="?", help="checkpoint.pt written by `exitserve train`")
    p.add_argument("--model", metavar="MODULE:FACTORY",
                   help="your own network: a function returning a MultiExitNet or an exitserve.models.wrap.Exportable")
    p.add_argument("--examples", metavar="NPZ",
                   help="with --model: an .npz whose array 'x' holds at least 7 real inputs to trace and verify with")
    p.add_argument("--labels", help="with --model: comma-separated class names (default: the factory's, else 0..n-1)")
    p.add_argument("--out", required=True, help="bundle directory to write (replaced if it exists)")
    p.add_argument("--name", help="bundle name (default: the factory's, else the output directory's name)")
    p.add_argument("--version", default="1", help="bundle version")
    p.add_argument("--torchscript", action="store_true", help="also write TorchScript twins for the torch runner")
    p.set_defaults(func=_cmd_export)
    p = add_parser(sub, "spans", "add fused span graphs to a bundle exported before they existed: the server then "
                                 "skips exit heads that cannot fire and runs the plain model when none can")
    p.add_argument("bundle", help="bundle directory (rewritten in place: spans, one shared weights file, new checksums)")
    p.set_defaults(func=_cmd_spans)
