"""`exitserve train --recipe`: the named recipes reach the training run, and a rerun resumes it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from exitserve.models.checkpoint import load_checkpoint
from exitserve.models.recipes import RECIPES, apply_recipe
from exitserve.models.training import TrainConfig
from exitserve.service.cli.main import main


def test_apply_recipe_sets_only_the_recipe_fields() -> None:
    base = TrainConfig(epochs=7, lr=0.3)
    ge = apply_recipe(base, "ge")
    assert ge.gradient_equilibrium and ge.distill_weight == 0.0 and ge.regime == "joint"
    assert (ge.epochs, ge.lr) == (7, 0.3)
    assert apply_recipe(base, None) is base
    assert apply_recipe(base, "sd-mixed").regime == "mixed"
    with pytest.raises(ValueError, match="unknown recipe"):
        apply_recipe(base, "nope")
    assert set(RECIPES) == {"plain", "sd", "ge", "sd-ge", "sd-mixed", "fast", "fast-sd"}
    fast_sd = apply_recipe(base, "fast-sd")  # the fast recipe, plus distillation from the last exit
    assert fast_sd == replace(apply_recipe(base, "fast"), distill_weight=0.5)
    fast = apply_recipe(base, "fast")  # airbench's recipe brings its own batch size, learning rate and decay
    assert (fast.batch_size, fast.lr, fast.momentum, fast.label_smoothing, fast.lookahead) == (1024, 1.5, 0.85, 0.2, True)
    assert fast.lr * fast.weight_decay == pytest.approx(0.0153 * 1024 / (1024 * (1 + 1 / 0.15)))  # decay per step


def test_train_command_runs_a_recipe_and_a_rerun_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["train", "--arch", "digits-compact", "--data", "digits", "--recipe", "sd-ge", "--epochs", "2",
            "--batch-size", "64", "--lr", "0.1", "--train-limit", "600", "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    history = json.loads((out / "history.json").read_text())
    assert history["config"]["distill_weight"] == 0.5 and history["config"]["gradient_equilibrium"] is True
    assert len(history["epochs"]) == 2
    net, meta = load_checkpoint(out / "checkpoint.pt")
    assert meta["train_fingerprint"].startswith("digits-train-seed0-subset600:600:")
    first = {k: v.clone() for k, v in net.state_dict().items()}
    capsys.readouterr()
    assert main(argv) == 0  # the run had finished: the rerun resumes after epoch 2 and trains nothing more
    assert "resuming" in capsys.readouterr().out
    again, _ = load_checkpoint(out / "checkpoint.pt")
    for key, value in again.state_dict().items():
        assert torch.equal(value, first[key]), key


def test_flags_on_the_command_line_win_over_the_recipe(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["train", "--arch", "digits-compact", "--data", "digits", "--recipe", "fast", "--epochs", "1",
            "--batch-size", "64", "--train-limit", "300", "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    config = json.loads((out / "history.json").read_text())["config"]
    assert config["batch_size"] == 64 and config["lr"] == 1.5 and config["label_smoothing"] == 0.2
    assert config["schedule"] == "warmup-linear" and config["norm_lr_scale"] == 64.0
