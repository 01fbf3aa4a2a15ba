"""Measured FLOPs per segment and exit head, via torch.utils.flop_counter (multiply-add = 2 FLOPs)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from exitserve.models.net import MultiExitNet, SegmentWithHead, as_tuple


def count_flops(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one forward pass of `module` on `inputs` (whatever batch they carry)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


def segment_flops(net: MultiExitNet, example_inputs: tuple[torch.Tensor, ...]) -> list[int]:
    """Per-sample FLOPs of each segment including its exit head, on a batch-1 example."""
    was_training = net.training
    net.eval()
    state = tuple(t[:1] for t in example_inputs)
    flops = []
    with torch.no_grad():
        for k in range(net.num_exits):
            flops.append(count_flops(SegmentWithHead(net, k), *state))
            state = as_tuple(net.segments[k](*state))
    net.train(was_training)
    return flops
