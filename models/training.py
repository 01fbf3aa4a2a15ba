"""Training regimes for multi-exit networks.

- `joint`: weighted sum of every exit's cross-entropy.
- `mixed`: backbone and final head first, then everything jointly (arXiv 2407.14320).
- `heads-only`: backbone and final head frozen; the early heads learn from the final exit's own
  predictions with loss CE - lambda * entropy (self-supervised exits, arXiv 2407.21082).

`joint` and the joint phase of `mixed` can add self-distillation from the last exit and gradient
equilibrium (models/exit_training.py). With `resume_path`, the full training state is saved after
every epoch and a run that finds it picks up where it stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from exitserve.models.cascade import BiasBatchNorm, fit_to_data
from exitserve.models.data import Dataset
from exitserve.models.exit_training import forward_with_equilibrium, random_crop_flip, self_distilled_losses
from exitserve.models.net import MultiExitNet

Regime = Literal["joint", "mixed", "heads-only"]
REGIMES: tuple[str, ...] = ("joint", "mixed", "heads-only")
# one-cycle: linear ramp over the first quarter, then down to 1/1000. warmup-linear: airbench's
# ramp from 0.2x over 23 % of the steps, then linear down to 0.07x.
Schedule = Literal["one-cycle", "warmup-linear"]
LOOKAHEAD_EVERY = 5
FIT_IMAGES = 5000  # training images a data-fitted layer (the whitening stem) sees
NORM_MODULES = (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d, BiasBatchNorm)


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
    distill_weight: float = 0.0  # alpha: early exits learn (1-alpha) CE + alpha KD from the last exit
    distill_temperature: float = 3.0
    gradient_equilibrium: bool = False  # IMTA's gradient rescaling between exits (joint phases)
    bf16: bool = False  # bfloat16 autocast (fast on CPUs with AVX512-BF16 and on GPUs)
    device: str = "cpu"
    # The fast recipe's parts (airbench, arXiv 2404.00498; `recipes.RECIPES["fast"]`):
    label_smoothing: float = 0.0
    crop_pad: int = 4  # random translation by up to this many pixels (reflect padding)
    norm_lr_scale: float = 1.0  # batch-norm parameters learn this much faster (and decay as much less)
    schedule: Schedule = "one-cycle"
    lookahead: bool = False  # every 5 steps pull the weights towards their running average, more so late


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
        return F.cross_entropy(logits[-1], targets, label_smoothing=config.label_smoothing)
    weights = config.exit_weights or [1.0] * len(logits)
    if config.distill_weight > 0:
        return self_distilled_losses(logits, targets, weights, config.distill_weight, config.distill_temperature,
                                     config.label_smoothing)
    smoothing = config.label_smoothing
    return torch.stack([w * F.cross_entropy(z, targets, label_smoothing=smoothing)
                        for w, z in zip(weights, logits, strict=True)]).sum()


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


def _optimizer(net: MultiExitNet, params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.SGD:
    norm_ids = {id(p) for m in net.modules() if isinstance(m, NORM_MODULES) for p in m.parameters()}
    groups = [{"params": [p for p in params if id(p) not in norm_ids], "lr": config.lr,
               "weight_decay": config.weight_decay}]
    norms = [p for p in params if id(p) in norm_ids]
    if norms:  # same decay per step as the other weights: lr x wd is kept
        groups.append({"params": norms, "lr": config.lr * config.norm_lr_scale,
                       "weight_decay": config.weight_decay / config.norm_lr_scale})
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)


def _scheduler(optimizer: torch.optim.SGD, config: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "warmup-linear":
        warmup = max(1, int(0.23 * total_steps))

        def factor(step: int) -> float:
            if step < warmup:
                return 0.2 + 0.8 * step / warmup
            return 1.0 - 0.93 * min(1.0, (step - warmup) / max(1, total_steps - warmup))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps, pct_start=0.25,
        anneal_strategy="linear", div_factor=10.0, final_div_factor=100.0,
    )


class Lookahead:
    """airbench's lookahead: every few steps the weights (and batch-norm statistics) become a running
    average of themselves, weighted towards the average more as training ends, and equal to it at the end."""

    def __init__(self, net: torch.nn.Module, total_steps: int):
        self.average = {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}
        self.total_steps = total_steps

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int) -> None:
        decay = 1.0 if step >= self.total_steps else 0.95**5 * (step / self.total_steps) ** 3
        for name, value in net.state_dict().items():
            if name in self.average:
                self.average[name].lerp_(value, 1 - decay)
                value.copy_(self.average[name])


def _save_resume(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a run killed mid-write keeps the previous epoch's state


def train(
    net: MultiExitNet,
    train_data: Dataset,
    val_data: Dataset | None,
    config: TrainConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
    resume_path: str | Path | None = None,
) -> TrainHistory:
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = config.device
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    net.to(device)
    four_d = train_data.x.ndim == 4
    if four_d:
        net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # valid; missing from torch's stubs
    augment = config.augment and four_d and train_data.x.shape[1] == 3 and train_data.x.shape[2] >= 32
    # On a GPU the whole training set lives there: batches are gathered and augmented on the device.
    x_all = torch.from_numpy(train_data.x).to(device) if on_gpu else torch.from_numpy(train_data.x)
    y_all = torch.from_numpy(train_data.y).to(device)
    history = TrainHistory(config=asdict(config))
    epoch_number = 0
    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    resume_file = Path(resume_path) if resume_path else None
    saved = torch.load(resume_file, map_location="cpu", weights_only=True) if resume_file and resume_file.is_file() else None
    if saved is not None:
        if saved["config"] != asdict(config):
            raise ValueError(f"{resume_file} was written by a run with another configuration: "
                             "delete it to start afresh, or train into another folder")
        net.load_state_dict(saved["net"])
        generator.set_state(saved["generator"])
        rng.bit_generator.state = saved["rng"]
        torch.set_rng_state(saved["torch_rng"])
        history.epochs = [EpochRecord(**e) for e in saved["epochs"]]
        log(f"resuming from {resume_file} after epoch {len(history.epochs)}")
    elif four_d and fit_to_data(net, torch.from_numpy(train_data.x[:FIT_IMAGES])):
        log(f"whitening stem fitted to the patches of {min(FIT_IMAGES, len(train_data))} training images")

    for phase_index, (phase, epochs) in enumerate(_phases(config)):
        if epochs <= 0:
            continue
        params = _trainable(net, phase)
        trainable_ids = {id(p) for p in params}
        for p in net.parameters():
            p.requires_grad_(id(p) in trainable_ids)
        optimizer = _optimizer(net, params, config)
        scheduler = _scheduler(optimizer, config, epochs * steps_per_epoch)
        lookahead = Lookahead(net, epochs * steps_per_epoch) if config.lookahead else None
        first_epoch = 0
        if saved is not None:
            if saved["phase_index"] > phase_index:  # phase finished before the interruption
                epoch_number += epochs
                continue
            if saved["phase_index"] == phase_index:
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
                if lookahead is not None:  # saved on the CPU: back to the weights' device
                    lookahead.average = {k: v.to(device) for k, v in saved["lookahead"].items()}
                first_epoch = saved["epoch_in_phase"]
                epoch_number += first_epoch
        equilibrium = config.gradient_equilibrium and phase == "joint"
        for epoch_in_phase in range(first_epoch, epochs):
            epoch_number += 1
            started = time.perf_counter()
            net.train()
            if phase == "heads-only":
                net.segments.eval()  # frozen backbone: keep its batch-norm statistics
                net.heads[-1].eval()
            order = torch.from_numpy(rng.permutation(len(train_data)))
            total = torch.zeros((), device=device)  # summed on the device: no sync per step
            seen = 0
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch_number} ({phase})", disable=not progress, leave=False)
            for step in bar:
                idx = order[step * config.batch_size : (step + 1) * config.batch_size]
                x = x_all[idx.to(x_all.device)]
                y = y_all[idx.to(y_all.device)]
                if augment:
                    x = random_crop_flip(x, generator, pad=config.crop_pad)
                x = x.to(device)
                if four_d:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=config.bf16):
                    logits = forward_with_equilibrium(net, x) if equilibrium else net(x)
                    loss = exit_losses(logits, y, config.regime, phase, config)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step_in_phase = epoch_in_phase * steps_per_epoch + step + 1
                if lookahead is not None and (step_in_phase % LOOKAHEAD_EVERY == 0 or step_in_phase == lookahead.total_steps):
                    lookahead.update(net, step_in_phase)
                total += loss.detach().float() * len(idx)
                seen += len(idx)
                if progress and step % 20 == 0:
                    bar.set_postfix(loss=f"{total.item() / seen:.4f}")
            val_acc = per_exit_accuracy(net, val_data, config=config) if val_data is not None else []
            record = EpochRecord(epoch_number, phase, total.item() / seen, val_acc, time.perf_counter() - started)
            history.epochs.append(record)
            if resume_file is not None:
                _save_resume(resume_file, {
                    "config": asdict(config), "net": net.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "phase_index": phase_index, "epoch_in_phase": epoch_in_phase + 1,
                    "generator": generator.get_state(), "rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(), "epochs": [asdict(e) for e in history.epochs],
                    "lookahead": lookahead.average if lookahead is not None else None,
                })
            # Without validation data there is nothing to report per exit: say so rather than print an empty list.
            accs = " ".join(f"{a:6.2%}" for a in val_acc) if val_acc else "(no validation data)"
            log(f"epoch {epoch_number:3d}  {phase:10s}  loss {record.loss:.4f}  val acc per exit: {accs}  ({record.seconds:.1f}s)")
    for p in net.parameters():
        p.requires_grad_(True)
    net.eval()
    return history
