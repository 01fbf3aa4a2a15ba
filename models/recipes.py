"""Named training recipes and one training run end to end (what `exitserve train` does).

Kept free of the service's dependencies so that a bare PyTorch machine (a rented GPU) can run it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from exitserve.models.training import TrainConfig, train

# Issue 17: what the early exits of a many-exit model learn from. `plain` is the earlier default.
RECIPES: dict[str, dict[str, Any]] = {
    "plain": {"regime": "joint", "distill_weight": 0.0, "gradient_equilibrium": False},
    # self-distillation from the last exit (teacher detached), nothing else
    "sd": {"regime": "joint", "distill_weight": 0.5, "gradient_equilibrium": False},
    # IMTA's gradient equilibrium alone
    "ge": {"regime": "joint", "distill_weight": 0.0, "gradient_equilibrium": True},
    # self-distillation from the last exit with IMTA's gradient equilibrium
    "sd-ge": {"regime": "joint", "distill_weight": 0.5, "gradient_equilibrium": True},
    # self-distillation in the mixed regime: backbone and last exit first, then every exit
    "sd-mixed": {"regime": "mixed", "distill_weight": 0.5, "gradient_equilibrium": False},
    # Issue 27: airbench's fast-convergence recipe (arXiv 2404.00498), with gradient equilibrium between
    # exits. Its decoupled hyperparameters (lr 11.5 and weight decay 0.0153 per 1,024 samples, momentum
    # 0.85, summed loss) written for a mean loss at batch 1,024; the cascade presets are built for it.
    "fast": {"regime": "joint", "distill_weight": 0.0, "gradient_equilibrium": True, "batch_size": 1024,
             "lr": 1.5, "momentum": 0.85, "weight_decay": 0.0153 / 11.5, "label_smoothing": 0.2, "crop_pad": 2,
             "norm_lr_scale": 64.0, "schedule": "warmup-linear", "lookahead": True},
}
# the fast recipe with self-distillation from the last exit into the earlier ones
RECIPES["fast-sd"] = {**RECIPES["fast"], "distill_weight": 0.5}


def apply_recipe(config: TrainConfig, recipe: str | None) -> TrainConfig:
    if recipe is None:
        return config
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {sorted(RECIPES)}")
    return replace(config, **RECIPES[recipe])


def run_training(
    arch: str | None,
    data: str,
    out: Path,
    config: TrainConfig,
    split_seed: int = 0,
    init: Path | None = None,
    train_limit: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Train (resuming from out/resume.pt if a run with this config stopped) and write out/checkpoint.pt."""
    from exitserve.models.architectures import build_architecture
    from exitserve.models.checkpoint import load_checkpoint, save_checkpoint
    from exitserve.models.data import Dataset, load_dataset

    train_data = load_dataset(f"{data}:train", seed=split_seed)
    if train_limit:  # a seeded random subset: the stored order can be sorted by class
        keep = np.sort(np.random.default_rng(split_seed).permutation(len(train_data))[:train_limit])
        train_data = Dataset(train_data.x[keep], train_data.y[keep], train_data.labels,
                             f"{train_data.name}-subset{train_limit}")
    val_data = load_dataset(f"{data}:val", seed=split_seed)
    if init:
        net, meta = load_checkpoint(init)
    else:
        if arch is None:
            raise ValueError("need an architecture or a checkpoint to start from")
        net = build_architecture(arch, num_classes=len(train_data.labels))
        meta = {"architecture": arch, "num_classes": len(train_data.labels), "labels": train_data.labels}
    log(f"training {meta['architecture']} on {train_data.name} ({len(train_data)} samples), "
        f"validation {val_data.name} ({len(val_data)}) held out; regime {config.regime}, "
        f"distill {config.distill_weight}, gradient equilibrium {config.gradient_equilibrium}")
    out.mkdir(parents=True, exist_ok=True)
    # resume.pt is rewritten after every epoch; running the same command again continues from it
    history = train(net, train_data, val_data, config, progress=progress, log=log, resume_path=out / "resume.pt")
    meta = {
        **meta,
        "data": data,
        "split_seed": split_seed,
        "train_fingerprint": train_data.fingerprint,
        "val_fingerprint": val_data.fingerprint,
        "history": [vars(e) for e in history.epochs] + meta.get("history", []),
        "train_config": history.config,
        "train_seconds": sum(e.seconds for e in history.epochs),
    }
    save_checkpoint(out / "checkpoint.pt", net, meta)
    (out / "history.json").write_text(json.dumps({"config": history.config, "epochs": meta["history"]}, indent=2))
    log(f"checkpoint: {out / 'checkpoint.pt'}")
    return out / "checkpoint.pt"
