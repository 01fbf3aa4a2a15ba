"""A densely connected cascade of fast-converging CNNs for 32x32 images (issue 27).

Why: stage exits on a ResNet tie a smaller static network at equal cost, because an early exit
only sees shallow, fine-grained features (MSDNet's analysis). Here every exit sits at the end of a
complete sub-network — whitened 2x2 stem, then three conv groups down to 3x3 — so even the first,
narrowest one sees coarse, global features; each later, wider sub-network reads the earlier ones'
features at every scale (dense reuse, as in MSDNet/RANet), and its exit classifies the concatenation
of all sub-networks' final features (a learned ensemble, as in Zero Time Waste). One sub-network
alone is a plain static network of the same family: the small models the cascade is compared with.

The blocks follow airbench (Keller Jordan, arXiv 2404.00498; read there, written here): a frozen
whitening convolution fitted to the training images' 2x2 patches, conv -> max-pool -> batch norm ->
GELU -> conv -> batch norm -> GELU groups, batch norms that learn only a bias, identity-initialised
convolutions and a 1/9-scaled linear classifier. `models/training.py` carries its recipe.

State between segments: the whitened image and the concatenated features at the three scales, so
a later sub-network starts from the stem's output and extends every scale's features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from exitserve.models.net import CIFAR10_MEAN, CIFAR10_STD, MultiExitNet, Normalize

Widths = tuple[int, int, int]
STATE_NAMES = ("whitened", "scale1", "scale2", "scale3")
WHITEN_KERNEL = 2
WHITEN_WIDTH = 2 * 3 * WHITEN_KERNEL**2  # each eigenvector of the 2x2x3 patch covariance, and its negative
CLASSIFIER_SCALE = 1 / 9


class BiasBatchNorm(nn.Module):
    """Batch norm that learns only a bias (the scale stays 1), with airbench's fast running statistics."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=0.4, affine=False)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) + self.bias.view(1, -1, 1, 1)


def _conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():  # identity on the first input channels: deep stacks start as shallow ones
        nn.init.dirac_(conv.weight[: min(cin, cout)])
    return conv


class Stem(nn.Module):
    """Per-channel standardisation, then a frozen 2x2 whitening convolution (32x32 -> 31x31) and GELU."""

    weight: torch.Tensor  # a buffer: fitted to data, never trained

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.register_buffer("weight", torch.zeros(WHITEN_WIDTH, 3, WHITEN_KERNEL, WHITEN_KERNEL))
        self.bias = nn.Parameter(torch.zeros(WHITEN_WIDTH))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.normalize(image)
        return F.gelu(F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype)))

    @torch.no_grad()
    def fit_to_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Whitening filters from the covariance of the images' 2x2 patches (images in [0, 1], NCHW)."""
        x = self.normalize(images.float().to(self.weight.device)).cpu()
        k = WHITEN_KERNEL
        patches = x.unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, 3 * k * k).double()
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).flip(0).reshape(-1, 3, k, k)
        self.weight.copy_(torch.cat([filters, -filters]).float())


class ConvGroup(nn.Module):
    """conv -> pool -> norm -> GELU -> (+ earlier sub-networks' features) -> conv -> norm -> GELU."""

    def __init__(self, cin: int, cout: int, prior: int):
        super().__init__()
        self.conv1 = _conv(cin, cout)
        self.norm1 = BiasBatchNorm(cout)
        self.conv2 = _conv(cout + prior, cout)
        self.norm2 = BiasBatchNorm(cout)

    def forward(self, x: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        h = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        if prior is not None:
            h = torch.cat([prior, h], dim=1)
        return F.gelu(self.norm2(self.conv2(h)))


class SubNetwork(nn.Module):
    """One sub-network of the cascade: (whitened image, earlier features per scale) -> the same, extended."""

    def __init__(self, widths: Widths, prior: Widths | None, stem: Stem | None):
        super().__init__()
        self.stem = stem
        cins = (WHITEN_WIDTH, widths[0], widths[1])
        priors = prior or (0, 0, 0)
        self.groups = nn.ModuleList(ConvGroup(cin, cout, p) for cin, cout, p in zip(cins, widths, priors, strict=True))

    def forward(self, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        priors: Sequence[torch.Tensor | None]
        if self.stem is not None:
            whitened, priors = self.stem(state[0]), (None, None, None)
        else:
            whitened, priors = state[0], state[1:]
        x, scales = whitened, []
        for group, prior in zip(self.groups, priors, strict=True):
            x = group(x, prior)
            scales.append(x if prior is None else torch.cat([prior, x], dim=1))
        return (whitened, *scales)


class CascadeHead(nn.Module):
    """Max-pool the 3x3 map of every sub-network's final features so far, then one scaled linear layer."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(channels, num_classes, bias=False)

    def forward(self, *state: torch.Tensor) -> torch.Tensor:
        pooled = torch.amax(state[-1], dim=(2, 3))
        return self.classifier(pooled) * CLASSIFIER_SCALE


def cascade_net(
    stages: Sequence[Widths],
    num_classes: int = 10,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> MultiExitNet:
    """One exit per sub-network; widths per sub-network are (scale 1, scale 2, scale 3) channels."""
    if not stages:
        raise ValueError("a cascade needs at least one sub-network")
    segments: list[nn.Module] = []
    heads: list[nn.Module] = []
    prior: Widths | None = None
    for k, widths in enumerate(stages):
        segments.append(SubNetwork(widths, prior, Stem(mean, std) if k == 0 else None))
        before = prior or (0, 0, 0)
        prior = (before[0] + widths[0], before[1] + widths[1], before[2] + widths[2])
        heads.append(CascadeHead(prior[2], num_classes))
    return MultiExitNet(segments, heads, state_names=STATE_NAMES)


# Sub-network widths (scale 1, 2, 3). A one-stage preset is a static network: the small models.
CASCADE_PRESETS: dict[str, tuple[Widths, ...]] = {
    "cascade-w16": ((16, 32, 32),),
    "cascade-w32": ((32, 64, 64),),
    "cascade-w48": ((48, 96, 96),),
    "cascade-w64": ((64, 128, 128),),
    "cascade-w64-256": ((64, 256, 256),),
    "cascade-large": ((16, 32, 32), (32, 64, 64), (64, 256, 256)),
    # a fourth exit between the middle and the widest sub-network, where the three-exit cascade sends
    # a quarter of the images from 50 straight to 324 MFLOPs
    "cascade-large4": ((16, 32, 32), (32, 64, 64), (48, 96, 96), (64, 256, 256)),
}


def fit_to_data(net: nn.Module, images: torch.Tensor) -> bool:
    """Fit every data-initialised module of `net` (the whitening stem) to training images; False if none."""
    fitted = False
    for module in net.modules():
        if isinstance(module, Stem):
            module.fit_to_data(images)
            fitted = True
    return fitted
