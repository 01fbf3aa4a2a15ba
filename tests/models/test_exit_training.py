"""Self-distillation, gradient equilibrium and the tensor augmentation (models/exit_training.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exitserve.models.architectures import build_architecture
from exitserve.models.exit_training import (
    distillation_loss,
    forward_with_equilibrium,
    random_crop_flip,
    self_distilled_losses,
)


def _grads(net: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    net.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}


def test_gradient_equilibrium_keeps_outputs_and_averages_the_backbone_gradient() -> None:
    torch.manual_seed(0)
    net = build_architecture("digits-compact", 10).eval()  # eval: batch norm must not move between passes
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    plain = net(x)
    balanced = forward_with_equilibrium(net, x)
    for a, b in zip(plain, balanced, strict=True):
        assert torch.equal(a, b)
    per_exit = [_grads(net, F.cross_entropy(net(x)[k], y)) for k in range(net.num_exits)]
    got = _grads(net, sum(F.cross_entropy(z, y) for z in forward_with_equilibrium(net, x)))
    k = net.num_exits
    for name, grad in got.items():
        if name.startswith("segments."):
            # Segment s feeds exits s..K-1; GE gives it the mean of their gradients, not the sum.
            s = int(name.split(".")[1])
            expected = sum(g[name] for g in per_exit[s:]) / (k - s)
        else:  # a head gets its own loss's gradient unchanged
            h = int(name.split(".")[1])
            expected = per_exit[h][name]
        assert torch.allclose(grad, expected, atol=1e-6), name


def test_distillation_loss_is_t_squared_kl_and_leaves_the_teacher_alone() -> None:
    torch.manual_seed(0)
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    t = 3.0
    p_teacher = torch.softmax(teacher / t, 1)
    expected = (p_teacher * (p_teacher.log() - torch.log_softmax(student / t, 1))).sum(1).mean() * t * t
    got = distillation_loss(student, teacher, t)
    assert torch.isclose(got, expected)
    got.backward()
    assert teacher.grad is None and student.grad is not None
    assert distillation_loss(teacher, teacher, t).abs() < 1e-6


def test_self_distilled_losses_mix_ce_and_kd_for_early_exits_only() -> None:
    torch.manual_seed(0)
    logits = [torch.randn(6, 4) for _ in range(3)]
    y = torch.randint(0, 4, (6,))
    plain = sum(F.cross_entropy(z, y) for z in logits)
    assert torch.isclose(self_distilled_losses(logits, y, [1.0] * 3, 0.0, 3.0), plain)
    kd_only = self_distilled_losses(logits, y, [1.0] * 3, 1.0, 2.0)
    expected = F.cross_entropy(logits[-1], y) + sum(distillation_loss(z, logits[-1], 2.0) for z in logits[:-1])
    assert torch.isclose(kd_only, expected)


def test_random_crop_flip_gives_a_crop_or_mirrored_crop_of_the_padded_image() -> None:
    x = torch.rand(16, 3, 32, 32)
    out = random_crop_flip(x, torch.Generator().manual_seed(1))
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    flipped = 0
    for i in range(len(x)):
        crops = [padded[i, :, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        plain = any(torch.equal(c, out[i]) for c in crops)
        mirrored = any(torch.equal(c.flip(-1), out[i]) for c in crops)
        assert plain or mirrored, f"sample {i} is neither a crop nor a mirrored crop"
        flipped += mirrored and not plain
    assert 0 < flipped < len(x)  # both kinds occur in 16 samples
    again = random_crop_flip(x, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)  # the generator fixes the augmentation
