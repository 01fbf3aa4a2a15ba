"""The ResNet presets, in particular the depth-not-width ones with an exit after every block (issue 17)."""

from __future__ import annotations

import pytest
import torch

from exitserve.models.architectures import RESNET_PRESETS, build_architecture
from exitserve.models.flops import segment_flops


def _cumulative_mflops(arch: str) -> list[float]:
    net = build_architecture(arch, 10)
    flops = segment_flops(net, (torch.rand(1, 3, 32, 32),))
    total, out = 0, []
    for f in flops:
        total += f
        out.append(total / 1e6)
    return out


@pytest.mark.parametrize("arch", ["resnet-deep", "resnet-deep-late"])
def test_deep_presets_have_an_exit_after_every_block_at_the_small_width(arch: str) -> None:
    preset = RESNET_PRESETS[arch.removeprefix("resnet-")]
    net = build_architecture(arch, 10)
    assert preset.width == RESNET_PRESETS["small"].width
    assert net.num_exits == sum(preset.blocks)
    logits = net.eval()(torch.rand(2, 3, 32, 32))
    assert len(logits) == net.num_exits and all(z.shape == (2, 10) for z in logits)


def test_deep_late_starts_with_the_small_models_exits_and_reaches_past_its_cost() -> None:
    small = _cumulative_mflops("resnet-small")
    late = _cumulative_mflops("resnet-deep-late")
    deep = _cumulative_mflops("resnet-deep")
    assert late[:3] == pytest.approx(small[:3])  # same layout up to the first stage-2 block
    # Exits land every ~10 MFLOPs, with one on each side of the small model's full cost.
    for costs in (late, deep):
        steps = [b - a for a, b in zip(costs, costs[1:], strict=False)]
        assert max(steps) < 15.0
        assert any(c < small[-1] for c in costs) and any(small[-1] < c < small[-1] + 15 for c in costs)
    assert deep[-1] > 3 * small[-1]


def test_lean_heads_keep_the_backbone_and_the_first_conv_heads() -> None:
    late, lean = build_architecture("resnet-deep-late", 10), build_architecture("resnet-deep-late-lean", 10)
    assert [p.shape for s in late.segments for p in s.parameters()] == [p.shape for s in lean.segments for p in s.parameters()]
    preset = RESNET_PRESETS["deep-late-lean"]
    assert preset.conv_head_exits is not None
    for k, (full, slim) in enumerate(zip(late.heads, lean.heads, strict=True)):
        conv = k < preset.conv_head_exits and k < lean.num_exits - 1
        assert isinstance(slim.features, torch.nn.Identity) != conv  # pool + linear from exit 3 on, as the last
        assert (sum(p.numel() for p in slim.parameters()) == sum(p.numel() for p in full.parameters())) == (
            conv or k == lean.num_exits - 1)
    late_cost, lean_cost = _cumulative_mflops("resnet-deep-late"), _cumulative_mflops("resnet-deep-late-lean")
    assert lean_cost[:3] == pytest.approx(late_cost[:3])
    assert lean_cost[-1] < 0.85 * late_cost[-1]  # five conv heads fewer
