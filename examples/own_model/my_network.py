"""Your own PyTorch network, as you would write it without exitserve, plus the two small pieces
exitserve needs: where the exits go (`wrap`) and a factory for `exitserve export --model`."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from exitserve.models.wrap import Exportable, MultiExitNet, attach_exits

CLASSES = [str(d) for d in range(10)]
EXIT_AFTER = ["block1", "block2"]  # exits after these layers; the network's own output is the last exit


def build_backbone() -> nn.Sequential:
    """A small CNN for 8x8 grey digits; named layers so exits can be placed by name."""
    return nn.Sequential(OrderedDict([
        ("stem", nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())),
        ("block1", nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())),
        ("block2", nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU())),
        ("block3", nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())),
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("classifier", nn.Linear(64, len(CLASSES))),
    ]))


def wrap(backbone: nn.Sequential, example_inputs: torch.Tensor) -> MultiExitNet:
    """The backbone with an exit head after block1 and block2 (pool + linear, sized on the examples)."""
    return attach_exits(backbone, after=EXIT_AFTER, example_inputs=example_inputs)


def build_model() -> Exportable:
    """For `exitserve export --model my_network:build_model`: the wrapped network with its trained
    weights (MY_NETWORK_WEIGHTS, a state_dict of the wrapped network) and real example inputs."""
    weights = Path(os.environ.get("MY_NETWORK_WEIGHTS", "runs/own-model-example/multi_exit.pt"))
    examples = Path(os.environ.get("MY_NETWORK_EXAMPLES", weights.parent / "val.npz"))
    with np.load(examples) as data:
        x = torch.from_numpy(data["x"][:16])
    net = wrap(build_backbone(), x)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return Exportable(net.eval(), example_inputs=x, labels=CLASSES, name="my-digits",
                      preprocessing={"layout": "NCHW", "scale": "pixels in [0, 1]"})
