"""Shipped multi-exit architectures: a ResNet-style CNN family for 32x32 images and a compact MNIST net."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from exitserve.models.cascade import CASCADE_PRESETS, cascade_net
from exitserve.models.net import CIFAR10_MEAN, CIFAR10_STD, MultiExitNet, Normalize

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


def conv_bn_relu(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn_relu(cin, cout, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ConvHead(nn.Module):
    """Exit head: one (strided) conv to mix features cheaply, global pooling, linear classifier."""

    def __init__(self, channels: int, num_classes: int, stride: int):
        super().__init__()
        self.features = conv_bn_relu(channels, channels, stride) if stride else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@dataclass(frozen=True)
class ResNetPreset:
    width: int
    blocks: tuple[int, ...]
    exit_every_block: bool = False
    conv_head_exits: int | None = None  # inner exits after these first ones get pool + linear heads


RESNET_PRESETS = {
    "small": ResNetPreset(width=16, blocks=(1, 1, 1, 1)),
    # between the two: its full depth costs about what the large preset spends at its second exit
    "medium": ResNetPreset(width=24, blocks=(1, 1, 1, 1)),
    "large": ResNetPreset(width=32, blocks=(1, 1, 1, 1)),
    # Depth, not width (issue 17): the small preset's widths with 11 blocks and an exit after each,
    # so exits come every ~10 MFLOPs and one lands near the small model's full cost.
    "deep": ResNetPreset(width=16, blocks=(1, 2, 4, 4), exit_every_block=True),
    # The same with the extra depth in the last two stages: its first three exits are the small
    # preset's (11.5 / 20.0 / 28.5 MFLOPs), where exits after stage-1 blocks are weak for their cost.
    "deep-late": ResNetPreset(width=16, blocks=(1, 1, 3, 4), exit_every_block=True),
    # The same with pool + linear heads (the last exit's kind) from exit 3 on, where conv heads cost
    # 1.2-4.7 MFLOPs each. Fitted on a frozen deep-late backbone such heads lose under a point; trained
    # jointly the lean model measured better at 12 epochs and worse at 24 (BENCHMARKS.md §4.1a): kept to
    # repeat those runs, not a recommended recipe.
    "deep-late-lean": ResNetPreset(width=16, blocks=(1, 1, 3, 4), exit_every_block=True, conv_head_exits=3),
}


def multi_exit_resnet(
    width: int = 32,
    blocks: Sequence[int] = (1, 1, 1, 1),
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    exit_every_block: bool = False,
    conv_head_exits: int | None = None,
) -> MultiExitNet:
    """ResNet for 32x32 inputs, width doubling per stage; one exit per stage, or per block.

    Early heads down-sample with one strided conv until the map is 4x4 or smaller; the final head
    is pooling plus a linear layer, as in a plain ResNet, and so is every inner head from exit
    `conv_head_exits` on (None: conv heads on every inner exit).
    """
    groups: list[tuple[list[nn.Module], int, int]] = []  # (layers, channels out, map size) per segment
    cin, size = width, 32
    for stage, count in enumerate(blocks):
        cout = width * 2**stage
        stride = 1 if stage == 0 else 2
        size //= stride
        layers: list[nn.Module] = []
        if stage == 0:
            layers += [Normalize(mean, std), conv_bn_relu(in_channels, width)]
        for b in range(count):
            layers.append(BasicBlock(cin if b == 0 else cout, cout, stride if b == 0 else 1))
            if exit_every_block:
                groups.append((layers, cout, size))
                layers = []
        if not exit_every_block:
            groups.append((layers, cout, size))
        cin = cout
    segments, heads = [], []
    for k, (layers, channels, map_size) in enumerate(groups):
        segments.append(nn.Sequential(*layers))
        lean = k == len(groups) - 1 or (conv_head_exits is not None and k >= conv_head_exits)
        heads.append(ConvHead(channels, num_classes, stride=0 if lean else (2 if map_size > 4 else 1)))
    return MultiExitNet(segments, heads)


def resnet_preset(name: str, num_classes: int = 10) -> MultiExitNet:
    if name not in RESNET_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(RESNET_PRESETS)}")
    preset = RESNET_PRESETS[name]
    return multi_exit_resnet(preset.width, preset.blocks, num_classes, exit_every_block=preset.exit_every_block,
                             conv_head_exits=preset.conv_head_exits)


class _MLPHead(nn.Module):
    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Linear(channels * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(x), 1))


def compact_mnist_net(num_classes: int = 10, width: int = 16, image_size: int = 28) -> MultiExitNet:
    """Three-exit CNN for MNIST (28x28) or sklearn digits (8x8); a few hundred thousand FLOPs."""
    segments = [
        nn.Sequential(Normalize(MNIST_MEAN, MNIST_STD), conv_bn_relu(1, width)),
        conv_bn_relu(width, 2 * width, stride=2),
        conv_bn_relu(2 * width, 4 * width, stride=2 if image_size > 8 else 1),
    ]
    heads = [_MLPHead(width, num_classes), _MLPHead(2 * width, num_classes), _MLPHead(4 * width, num_classes)]
    return MultiExitNet(segments, heads)


ARCHITECTURES: dict[str, Callable[[int], MultiExitNet]] = {
    "resnet-small": lambda num_classes: resnet_preset("small", num_classes),
    "resnet-medium": lambda num_classes: resnet_preset("medium", num_classes),
    "resnet-large": lambda num_classes: resnet_preset("large", num_classes),
    "resnet-deep": lambda num_classes: resnet_preset("deep", num_classes),
    "resnet-deep-late": lambda num_classes: resnet_preset("deep-late", num_classes),
    "resnet-deep-late-lean": lambda num_classes: resnet_preset("deep-late-lean", num_classes),
    "mnist-compact": lambda num_classes: compact_mnist_net(num_classes, image_size=28),
    "digits-compact": lambda num_classes: compact_mnist_net(num_classes, width=8, image_size=8),
}
ARCHITECTURES.update({name: partial(cascade_net, stages) for name, stages in CASCADE_PRESETS.items()})


def build_architecture(name: str, num_classes: int) -> MultiExitNet:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose from {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](num_classes)
