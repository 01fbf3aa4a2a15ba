"""Checkpoints: a state dict plus plain metadata, always loaded with weights_only=True."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from exitserve.models.architectures import build_architecture
from exitserve.models.net import MultiExitNet


def save_checkpoint(path: str | Path, net: MultiExitNet, meta: dict[str, Any]) -> None:
    """`meta` must hold `architecture`, `num_classes` and `labels`; anything else JSON-like is kept."""
    missing = {"architecture", "num_classes", "labels"} - set(meta)
    if missing:
        raise ValueError(f"checkpoint metadata lacks {sorted(missing)}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "meta": meta}, path)


def load_checkpoint(path: str | Path) -> tuple[MultiExitNet, dict[str, Any]]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    meta = payload["meta"]
    net = build_architecture(meta["architecture"], int(meta["num_classes"]))
    net.load_state_dict(payload["state_dict"])
    net.eval()
    return net, meta
