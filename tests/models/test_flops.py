import torch
from torch import nn

from exitserve.models.architectures import build_architecture
from exitserve.models.flops import count_flops, segment_flops


def test_conv_flops_match_analytic_count() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    # 2 FLOPs per multiply-add: out channels x out pixels x (in channels x kernel area)
    assert count_flops(conv, torch.zeros(1, 3, 8, 8)) == 2 * 8 * 64 * 3 * 9


def test_linear_flops_scale_with_batch() -> None:
    linear = nn.Linear(16, 4)
    assert count_flops(linear, torch.zeros(5, 16)) == 5 * 2 * 16 * 4


def test_segment_flops_are_per_sample_and_sum_to_model() -> None:
    net = build_architecture("resnet-small", 10).eval()
    x = torch.zeros(3, 3, 32, 32)
    per_segment = segment_flops(net, (x,))
    assert len(per_segment) == 4 and all(f > 0 for f in per_segment)
    # The whole network at batch 1 costs the sum of its segments and heads.
    assert sum(per_segment) == count_flops(net, x[:1])
