"""Export the default model as single ONNX graphs, the baselines the serving benchmark compares against.

- `all-exits.onnx`: the whole network in one graph, outputting every exit's logits (the pure cost of cutting);
- `last-exit.onnx`: the plain model a user would deploy, final logits only.

    python benchmarks/monolithic.py runs/cifar10-resnet-large/checkpoint.pt --out runs/monolithic
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import onnx
import torch

from exitserve.models.checkpoint import load_checkpoint
from exitserve.models.export import MAX_IR_VERSION


class _AllExits(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return tuple(self.net(x))


class _LastExit(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        state = (x,)
        for segment in self.net.segments:
            out = segment(*state)
            state = out if isinstance(out, tuple) else (out,)
        return self.net.heads[-1](*state)


def export(module: torch.nn.Module, path: Path, outputs: list[str], shape: tuple[int, ...]) -> None:
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
    parser.add_argument("checkpoint")
    parser.add_argument("--out", default="runs/monolithic")
    parser.add_argument("--shape", default="3,32,32")
    args = parser.parse_args()
    net, _ = load_checkpoint(args.checkpoint)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(s) for s in args.shape.split(","))
    export(_AllExits(net), out / "all-exits.onnx", [f"logits_{k}" for k in range(net.num_exits)], shape)
    export(_LastExit(net), out / "last-exit.onnx", ["logits"], shape)
    print(f"wrote {out / 'all-exits.onnx'} and {out / 'last-exit.onnx'}")


if __name__ == "__main__":
    main()
