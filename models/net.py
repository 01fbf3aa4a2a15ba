"""A multi-exit network: an ordered list of segments, each followed by an exit head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

Tensors = tuple[torch.Tensor, ...]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def as_tuple(value: torch.Tensor | Sequence[torch.Tensor]) -> Tensors:
    return (value,) if isinstance(value, torch.Tensor) else tuple(value)


class MultiExitNet(nn.Module):
    """Wrap any backbone cut into segments, with one exit head after each segment.

    Segment k takes the tensors segment k-1 returned (a tensor or a tuple, e.g. hidden states and
    an attention mask) and head k takes the same tensors segment k returned. `forward` returns the
    list of per-exit logits; the last head is the model's final classifier.
    """

    def __init__(
        self,
        segments: Sequence[nn.Module],
        heads: Sequence[nn.Module],
        state_names: Sequence[str] = ("hidden",),
    ):
        super().__init__()
        if len(segments) != len(heads) or not segments:
            raise ValueError(f"need one head per segment, got {len(segments)} segments and {len(heads)} heads")
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        self.state_names = tuple(state_names)

    @property
    def num_exits(self) -> int:
        return len(self.segments)

    def forward(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        state: Tensors = tuple(inputs)
        logits = []
        for segment, head in zip(self.segments, self.heads, strict=True):
            state = as_tuple(segment(*state))
            logits.append(head(*state))
        return logits

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for s in self.segments for p in s.parameters()]

    def exit_head_parameters(self, include_final: bool = False) -> list[nn.Parameter]:
        heads = self.heads if include_final else self.heads[:-1]
        return [p for h in heads for p in h.parameters()]


class SegmentWithHead(nn.Module):
    """Segment k of a MultiExitNet as one graph: inputs -> (*state outputs, logits)."""

    def __init__(self, net: MultiExitNet, index: int):
        super().__init__()
        self.segment = net.segments[index]
        self.head = net.heads[index]
        self.is_last = index == net.num_exits - 1

    def forward(self, *inputs: torch.Tensor) -> Tensors:
        state = as_tuple(self.segment(*inputs))
        logits = self.head(*state)
        return (logits,) if self.is_last else (*state, logits)


class Normalize(nn.Module):
    """Per-channel standardisation inside the graph, so clients send pixels scaled to [0, 1]."""

    mean: torch.Tensor  # buffers, declared for the type checker
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
