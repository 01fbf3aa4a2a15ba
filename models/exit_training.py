"""Training aids for many-exit networks (issue 17).

- Self-distillation ("Be Your Own Teacher", arXiv 1905.08094): every early exit also matches the
  last exit's softened predictions (KL at temperature T, teacher detached).
- Gradient equilibrium (IMTA, arXiv 1908.06294): with K exits the backbone would receive the sum of
  K losses' gradients, growing with depth from the end; GE rescales, at every segment boundary, the
  gradient from the exit head by 1/(r+1) and the gradient from the deeper segments by r/(r+1)
  (r = exits after this one), which keeps the backbone's gradient bounded.
- Random crop (4-pixel reflect pad) and horizontal flip as tensor indexing, so the same code runs on
  a GPU with the data resident there and on the CPU without a per-sample Python loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exitserve.models.net import MultiExitNet, Tensors, as_tuple


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: ANN001 - autograd API
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return grad * ctx.scale, None


def scale_gradient(state: Tensors, scale: float) -> Tensors:
    return tuple(_ScaleGradient.apply(t, scale) if t.is_floating_point() and t.requires_grad else t for t in state)


def forward_with_equilibrium(net: MultiExitNet, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """`net(*inputs)` with IMTA's gradient equilibrium on the backward pass (same forward values)."""
    state: Tensors = tuple(inputs)
    logits = []
    k_exits = net.num_exits
    for k, (segment, head) in enumerate(zip(net.segments, net.heads, strict=True)):
        state = as_tuple(segment(*state))
        after = k_exits - 1 - k  # exits deeper than this one
        logits.append(head(*scale_gradient(state, 1.0 / (after + 1))))
        if after:
            state = scale_gradient(state, after / (after + 1))
    return logits


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) || softmax(student/T)), batch mean; the teacher gets no gradient."""
    t = temperature
    target = F.log_softmax(teacher.detach().float() / t, dim=1)
    return F.kl_div(F.log_softmax(student.float() / t, dim=1), target, reduction="batchmean", log_target=True) * t * t


def self_distilled_losses(
    logits: list[torch.Tensor], targets: torch.Tensor, weights: list[float], alpha: float, temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Σ_k w_k [(1-α) CE_k + α KD(z_k, z_last)] over early exits, plus w_last CE_last."""
    total = weights[-1] * F.cross_entropy(logits[-1], targets, label_smoothing=label_smoothing)
    for w, z in zip(weights[:-1], logits[:-1], strict=True):
        ce = F.cross_entropy(z, targets, label_smoothing=label_smoothing)
        total = total + w * ((1.0 - alpha) * ce + alpha * distillation_loss(z, logits[-1], temperature))
    return total


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-sample random crop of the reflect-padded image and horizontal flip, by gather (no loop).

    Offsets come from `generator` (a CPU generator) and move to x's device, so a run is reproducible
    whatever the device.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator).to(x.device)
    flip = (torch.rand(n, 1, generator=generator) < 0.5).to(x.device)
    rows = dy + torch.arange(h, device=x.device)  # (n, h)
    base = torch.arange(w, device=x.device)
    cols = dx + torch.where(flip, w - 1 - base, base)  # (n, w)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c): advanced indices first
    return out.permute(0, 3, 1, 2).contiguous()
