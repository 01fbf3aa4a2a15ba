"""Training regimes for multi-exit networks.

- `joint`: weighted sum of every exit's cross-entropy.
- `mixed`: backbone and final head first, then everything jointly (arXiv 2407.14320).
- `heads-only`: backbone and final head frozen; the early heads learn from the final exit's own
  predictions with loss CE - lambda * entropy (self-supervised exits, arXiv 2407.21082).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from exitserve.models.data import Dataset
from exitserve.models.net import MultiExitNet

Regime = Literal["joint", "mixed", "heads-only"]
REGIMES: tuple[str, ...] = ("joint", "mixed", "heads-only")


@dataclass
class TrainConfig:
    regime: Regime = "joint"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    exit_weights: list[float] | None = None  # joint loss weights; equal when None
    backbone_epochs: int | None = None  # mixed: epochs of phase 1; half of `epochs` when None
    entropy_weight: float = 0.1  # heads-only: lambda in CE - lambda * entropy
    augment: bool = True  # random crop (pad 4) and horizontal flip, for 32x32 colour images
    bf16: bool = False  # bfloat16 autocast (fast on CPUs with AVX512-BF16 and on GPUs)
    device: str = "cpu"


@dataclass
class EpochRecord:
    epoch: int
    phase: str
    loss: float
    val_accuracy: list[float]
    seconds: float


@dataclass
class TrainHistory:
    config: dict
    epochs: list[EpochRecord] = field(default_factory=list)

    @property
    def final_val_accuracy(self) -> list[float]:
        return self.epochs[-1].val_accuracy if self.epochs else []


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 4-pixel-padded crop and horizontal flip, per sample."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx = torch.randint(0, 9, (n,), generator=generator)
    dy = torch.randint(0, 9, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def exit_losses(
    logits: list[torch.Tensor], targets: torch.Tensor, regime: Regime, phase: str, config: TrainConfig
) -> torch.Tensor:
    if regime == "heads-only":
        pseudo = logits[-1].detach().argmax(dim=1)
        terms = [F.cross_entropy(z, pseudo) - config.entropy_weight * entropy(z).mean() for z in logits[:-1]]
        return torch.stack(terms).sum()
    if phase == "backbone":
        return F.cross_entropy(logits[-1], targets)
    weights = config.exit_weights or [1.0] * len(logits)
    return sum(w * F.cross_entropy(z, targets) for w, z in zip(weights, logits, strict=True))


@torch.no_grad()
def per_exit_accuracy(net: MultiExitNet, data: Dataset, batch_size: int = 500, config: TrainConfig | None = None) -> list[float]:
    net.eval()
    device = config.device if config else "cpu"
    bf16 = bool(config and config.bf16)
    correct = np.zeros(net.num_exits)
    for start in range(0, len(data), batch_size):
        x = torch.from_numpy(data.x[start : start + batch_size]).to(device)
        y = torch.from_numpy(data.y[start : start + batch_size]).to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            logits = net(x)
        for k, z in enumerate(logits):
            correct[k] += (z.argmax(dim=1) == y).sum().item()
    return (correct / max(len(data), 1)).tolist()


def _phases(config: TrainConfig) -> list[tuple[str, int]]:
    if config.regime == "mixed":
        first = config.backbone_epochs if config.backbone_epochs is not None else config.epochs // 2
        return [("backbone", first), ("joint", config.epochs - first)]
    return [(config.regime, config.epochs)]


def _trainable(net: MultiExitNet, phase: str) -> list[torch.nn.Parameter]:
    if phase == "heads-only":
        return net.exit_head_parameters(include_final=False)
    if phase == "backbone":
        return net.backbone_parameters() + list(net.heads[-1].parameters())
    return list(net.parameters())


def train(
    net: MultiExitNet,
    train_data: Dataset,
    val_data: Dataset | None,
    config: TrainConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainHistory:
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = config.device
    net.to(device)
    four_d = train_data.x.ndim == 4
    if four_d:
        net.to(memory_format=torch.channels_last)
    augment = config.augment and four_d and train_data.x.shape[1] == 3 and train_data.x.shape[2] >= 32
    history = TrainHistory(config=asdict(config))
    epoch_number = 0
    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)

    for phase, epochs in _phases(config):
        if epochs <= 0:
            continue
        params = _trainable(net, phase)
        trainable_ids = {id(p) for p in params}
        for p in net.parameters():
            p.requires_grad_(id(p) in trainable_ids)
        optimizer = torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
        )
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=epochs * steps_per_epoch, pct_start=0.25,
            anneal_strategy="linear", div_factor=10.0, final_div_factor=100.0,
        )
        for _ in range(epochs):
            epoch_number += 1
            started = time.perf_counter()
            net.train()
            if phase == "heads-only":
                net.segments.eval()  # frozen backbone: keep its batch-norm statistics
                net.heads[-1].eval()
            order = rng.permutation(len(train_data))
            total, seen = 0.0, 0
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch_number} ({phase})", disable=not progress, leave=False)
            for step in bar:
                idx = order[step * config.batch_size : (step + 1) * config.batch_size]
                x = torch.from_numpy(train_data.x[idx])
                y = torch.from_numpy(train_data.y[idx]).to(device)
                if augment:
                    x = _augment(x, generator)
                x = x.to(device)
                if four_d:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=config.bf16):
                    loss = exit_losses(net(x), y, config.regime, phase, config)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(idx)
                seen += len(idx)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{total / seen:.4f}")
            val_acc = per_exit_accuracy(net, val_data, config=config) if val_data is not None else []
            record = EpochRecord(epoch_number, phase, total / seen, val_acc, time.perf_counter() - started)
            history.epochs.append(record)
            accs = " ".join(f"{a:6.2%}" for a in val_acc)
            log(f"epoch {epoch_number:3d}  {phase:10s}  loss {record.loss:.4f}  val acc per exit: {accs}  ({record.seconds:.0f}s)")
    for p in net.parameters():
        p.requires_grad_(True)
    net.eval()
    return history
