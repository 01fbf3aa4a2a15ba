"""The baselines the serving benchmark compares against, as single ONNX graphs:

- `all-exits.onnx`: the whole network in one graph, outputting every exit's logits (the pure cost of cutting);
- `last-exit.onnx`: the plain model a user would deploy, final logits only.

From a clean clone they are built from the bundle itself (its segments merged; no checkpoint, no torch):

    python benchmarks/monolithic.py --bundle bundles/cifar10-resnet-large --out runs/monolithic

or exported from a training checkpoint: `python benchmarks/monolithic.py runs/.../checkpoint.pt`.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import onnx

from exitserve.models.export import MAX_IR_VERSION
from exitserve.models.monolithic import merge_segments


def from_bundle(bundle_dir: Path, out: Path) -> None:
    """Both baselines from a bundle's segments (bit-identical logits to the chained segments)."""
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(merge_segments(bundle_dir, every_exit=True), str(out / "all-exits.onnx"))
    onnx.save(merge_segments(bundle_dir), str(out / "last-exit.onnx"))


def ensure_baselines(bundle_dir: Path, out: Path) -> Path:
    if not ((out / "all-exits.onnx").exists() and (out / "last-exit.onnx").exists()):
        from_bundle(bundle_dir, out)
    return out


def _torch_wrappers():  # torch only for the checkpoint route
    import torch

    class AllExits(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return tuple(self.net(x))

    class LastExit(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            state = (x,)
            for segment in self.net.segments:
                out = segment(*state)
                state = out if isinstance(out, tuple) else (out,)
            return self.net.heads[-1](*state)

    return AllExits, LastExit


def export(module, path: Path, outputs: list[str], shape: tuple[int, ...]) -> None:
    import torch

    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.rand(2, *shape),), str(path), input_names=["input"], output_names=outputs,
                          dynamic_axes={n: {0: "batch"} for n in ["input", *outputs]}, opset_version=17, dynamo=False)
    model = onnx.load(str(path))
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    onnx.save(model, str(path))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", nargs="?", help="a training checkpoint (default: build from --bundle)")
    parser.add_argument("--bundle", default="bundles/cifar10-resnet-large", help="bundle whose segments are merged")
    parser.add_argument("--out", default="runs/monolithic")
    parser.add_argument("--shape", default="3,32,32", help="sample shape for the checkpoint route")
    args = parser.parse_args()
    out = Path(args.out)
    if args.checkpoint is None:
        from_bundle(Path(args.bundle), out)
        print(f"wrote {out / 'all-exits.onnx'} and {out / 'last-exit.onnx'} from {args.bundle}")
        return
    from exitserve.models.checkpoint import load_checkpoint

    net, _ = load_checkpoint(args.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(s) for s in args.shape.split(","))
    all_exits, last_exit = _torch_wrappers()
    export(all_exits(net), out / "all-exits.onnx", [f"logits_{k}" for k in range(net.num_exits)], shape)
    export(last_exit(net), out / "last-exit.onnx", ["logits"], shape)
    print(f"wrote {out / 'all-exits.onnx'} and {out / 'last-exit.onnx'}")


if __name__ == "__main__":
    main()
