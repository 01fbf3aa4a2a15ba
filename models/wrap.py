"""Bring your own PyTorch network: wrap it as a multi-exit network, train its exits, export a bundle.

Two ways in:

- `MultiExitNet(segments, heads)`: you cut the network yourself; segment k feeds segment k+1 and
  head k turns segment k's output into logits (the last head is the final classifier).
- `attach_exits(backbone, after=[...], example_inputs=x)`: an existing `nn.Sequential` whose
  last layers produce the logits; exit heads go after the named (or numbered) layers. Heads are
  built from the shapes seen on `example_inputs` (pool + linear) unless you give your own, and
  the wrapped network's last exit is checked to reproduce `backbone(x)` exactly.

Then `train_exits` (any regime of `exitserve.models.training`, including self-supervised heads
that learn the final exit's own predictions with no labels) and `export_bundle` (per-segment ONNX
graphs, verified against PyTorch). `exitserve export --model pkg.module:factory` calls a factory
that returns a `MultiExitNet` or an `Exportable` (the network with its example inputs and labels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from exitserve.models.data import Dataset
from exitserve.models.export import export_bundle
from exitserve.models.net import MultiExitNet, as_tuple
from exitserve.models.training import REGIMES, TrainConfig, TrainHistory, train

__all__ = [
    "REGIMES",
    "Exportable",
    "MultiExitNet",
    "PooledHead",
    "TrainConfig",
    "TrainHistory",
    "attach_exits",
    "export_bundle",
    "split_sequential",
    "train_exits",
]


@dataclass
class Exportable:
    """What `exitserve export --model` needs besides the network: real example inputs (at least 7
    samples: tracing, FLOPs and the ONNX parity check use them) and the class names."""

    net: MultiExitNet
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...]
    labels: Sequence[str] | None = None  # default: "0", "1", … (one per class of the final exit)
    name: str | None = None  # default: the output directory's name
    task: str = "classification"
    preprocessing: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest for clients


class PooledHead(nn.Module):
    """Default exit head: average over the spatial / sequence axes, then one linear layer."""

    def __init__(self, features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # [N, C, H, W]
            x = x.mean(dim=(2, 3))
        elif x.dim() == 3:  # [N, L, D]
            x = x.mean(dim=1)
        elif x.dim() != 2:
            x = x.flatten(1)
        return self.linear(x)


def _head_for(state: torch.Tensor, num_classes: int) -> nn.Module:
    if state.dim() == 4:
        return PooledHead(state.shape[1], num_classes)
    if state.dim() in (2, 3):
        return PooledHead(state.shape[-1], num_classes)
    return PooledHead(int(np.prod(state.shape[1:])), num_classes)


def _cut_indices(backbone: nn.Sequential, after: Sequence[int | str]) -> list[int]:
    names = [name for name, _ in backbone.named_children()]
    indices = []
    for point in after:
        if isinstance(point, str):
            if point not in names:
                raise ValueError(f"no layer named {point!r} in the backbone; its layers are {', '.join(names)}")
            indices.append(names.index(point))
        else:
            if not -len(names) <= point < len(names):
                raise ValueError(f"layer index {point} out of range: the backbone has {len(names)} layers")
            indices.append(point % len(names))
    if indices != sorted(set(indices)) or (indices and indices[-1] >= len(names) - 1):
        raise ValueError("exit points must be distinct, in forward order, and before the backbone's last layer "
                         "(the last layer's output is the final exit)")
    return indices


def split_sequential(backbone: nn.Sequential, after: Sequence[int | str]) -> list[nn.Sequential]:
    """Cut `backbone` after each named (or numbered) layer: len(after) + 1 segments sharing its modules."""
    children = list(backbone.children())
    bounds = [-1, *_cut_indices(backbone, after), len(children) - 1]
    return [nn.Sequential(*children[a + 1 : b + 1]) for a, b in zip(bounds, bounds[1:], strict=False)]


@torch.no_grad()
def attach_exits(
    backbone: nn.Sequential,
    after: Sequence[int | str],
    example_inputs: torch.Tensor,
    heads: Sequence[nn.Module] | None = None,
    head_factory: Callable[[torch.Tensor, int], nn.Module] = _head_for,
) -> MultiExitNet:
    """`backbone` with an exit after each layer in `after`; its own output stays the final exit.

    `heads` (one per exit point) replace the default heads, which `head_factory(state, classes)`
    builds from the activation seen at each cut on `example_inputs`. The backbone's children must
    run one after another in its forward: the wrapped network's final exit is compared with
    `backbone(example_inputs)` and a mismatch is refused (e.g. a missing flatten between layers).
    """
    if not isinstance(backbone, nn.Sequential):
        raise TypeError(f"attach_exits takes an nn.Sequential, got {type(backbone).__name__}: list its layers in "
                        "forward order (nn.Sequential(model.stem, *model.blocks, nn.Flatten(), model.fc)) or "
                        "build MultiExitNet(segments, heads) yourself")
    segments = split_sequential(backbone, after)
    was_training = backbone.training
    backbone.eval()
    expected = backbone(example_inputs)
    num_classes = expected.shape[-1]
    states, state = [], example_inputs
    for segment in segments[:-1]:
        state = segment(state)
        states.append(state)
    if heads is None:
        heads = [head_factory(s, num_classes) for s in states]
    if len(heads) != len(segments) - 1:
        raise ValueError(f"need one head per exit point: {len(segments) - 1} exit points, {len(heads)} heads")
    net = MultiExitNet(segments, [*heads, nn.Identity()])
    net.eval()
    final = net(example_inputs)[-1]
    if not torch.allclose(final, expected, rtol=1e-4, atol=1e-5):
        raise ValueError("the wrapped network's last exit differs from backbone(x): do the backbone's layers run "
                         "one after another in its forward? (e.g. a torch.flatten call inside forward needs an "
                         "nn.Flatten layer in the Sequential)")
    net.train(was_training)
    return net


def train_exits(
    net: MultiExitNet,
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    labels: Sequence[str] | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    **config: Any,
) -> TrainHistory:
    """Train `net` on arrays with one of the regimes (TrainConfig fields as keywords).

    `regime="heads-only"` freezes the backbone and the final classifier and trains the exit heads
    on the final exit's own predictions (CE - λ·entropy): self-supervised, so `y` may be None.
    `joint` and `mixed` train everything on the labels `y`. `augment` is on by default: 3-channel
    images of at least 32 px are randomly cropped (padding 4) and flipped left-right; other inputs are
    left alone. The README lists every option ("Serve your own model").
    """
    train_config = TrainConfig(**config)
    if y is None:
        if train_config.regime != "heads-only":
            raise ValueError(f"regime {train_config.regime!r} learns from labels: pass y (only heads-only needs none)")
        y = np.zeros(len(x), np.int64)  # never read: heads-only targets are the final exit's predictions
    classes = list(labels) if labels is not None else [str(i) for i in range(int(np.max(y)) + 1)]
    train_data = Dataset(np.ascontiguousarray(x, np.float32), np.asarray(y, np.int64), classes, "train")
    val_data = None
    if val is not None:
        val_data = Dataset(np.ascontiguousarray(val[0], np.float32), np.asarray(val[1], np.int64), classes, "val")
    return train(net, train_data, val_data, train_config, progress=progress, log=log)


def as_exportable(obj: object, where: str, example_inputs: torch.Tensor | None = None) -> Exportable:
    """What a `--model` factory returned, as an Exportable; a ValueError explains anything else.

    `example_inputs` (from `--examples`) complete a bare MultiExitNet or replace an Exportable's.
    """
    if isinstance(obj, MultiExitNet):
        if example_inputs is None:
            raise ValueError(f"{where} returned a MultiExitNet without example inputs: exporting traces and verifies "
                             "it on real inputs; return exitserve.models.wrap.Exportable(net, example_inputs=x[:16], "
                             "labels=[...]) or pass --examples FILE.npz (an array 'x' of at least 7 inputs)")
        obj = Exportable(obj, example_inputs)
    if not isinstance(obj, Exportable):
        raise ValueError(f"{where} returned a {type(obj).__name__}, not a multi-exit network: wrap your network with "
                         "exitserve.models.wrap.attach_exits(backbone, after=[...], example_inputs=x) or "
                         "MultiExitNet(segments, heads) and return it (or an Exportable)")
    if not isinstance(obj.net, MultiExitNet):
        raise ValueError(f"{where}: Exportable.net is a {type(obj.net).__name__}, not a MultiExitNet")
    if example_inputs is not None:
        obj.example_inputs = example_inputs
    inputs = () if obj.example_inputs is None else as_tuple(obj.example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ValueError(f"{where}: example_inputs must be a tensor (or a tuple of tensors) of real inputs")
    return obj
