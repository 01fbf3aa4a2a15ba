"""Shared fixtures: a small real multi-exit model trained on sklearn digits and exported as a bundle."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def digits_bundle_uncalibrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-exit CNN trained for a few epochs on digits with the real CLI, exported as a bundle."""
    root = tmp_path_factory.mktemp("digits")
    bundle = root / "digits-bundle"
    subprocess.run(
        [sys.executable, "-m", "service.cli", "train", "--arch", "digits-compact", "--data", "digits",
         "--epochs", "4", "--lr", "0.1", "--batch-size", "64", "--out", str(root / "run"), "--export", str(bundle),
         "--name", "digits", "--no-progress", "--threads", "1"],
        check=True, cwd=REPO, capture_output=True,
    )
    return bundle


@pytest.fixture
def bundle_copy(digits_bundle_uncalibrated: Path, tmp_path: Path) -> Path:
    """A private copy a test may damage."""
    target = tmp_path / "bundle"
    shutil.copytree(digits_bundle_uncalibrated, target)
    return target
