"""The runner interface on its own: no runtime to import it, one factory, one spelling per runner kind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exitserve.models.bundle import load_bundle
from exitserve.service.runners.base import RUNNER_KINDS, SegmentRunner, create_runner
from exitserve.service.runners.onnx_runtime import OnnxRunner
from exitserve.service.settings import Settings


def imported_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(m for m in ('onnxruntime', 'torch') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_the_interface_loads_no_runtime_and_the_torch_runner_no_onnxruntime() -> None:
    assert imported_after("import exitserve.service.runners.base") == set()
    assert imported_after("import exitserve.service.runners.torch_runner") == {"torch"}


@pytest.mark.parametrize("kind", ["onnxruntime", "onnx"])
def test_factory_builds_an_onnx_runtime_runner_under_either_spelling(digits_bundle: Path, kind: str) -> None:
    runner = create_runner(load_bundle(digits_bundle), kind)
    assert isinstance(runner, OnnxRunner) and isinstance(runner, SegmentRunner)
    assert runner.num_exits == 3


def test_factory_refuses_an_unknown_kind(digits_bundle: Path) -> None:
    with pytest.raises(ValueError, match="unknown runner 'tensorrt'; choose from onnxruntime, torch"):
        create_runner(load_bundle(digits_bundle), "tensorrt")


def test_settings_take_the_old_spelling_for_both_runner_settings() -> None:
    assert RUNNER_KINDS == ("onnxruntime", "torch")
    assert Settings().runner == "onnxruntime"
    assert Settings(runner="onnx").runner == "onnxruntime"
    assert Settings(generation_runner="onnx").generation_runner == "onnxruntime"
    assert Settings(generation_runner="auto").generation_runner == "auto"


def test_serve_flag_takes_the_old_spelling() -> None:
    from exitserve.service.cli.main import build_parser

    args = build_parser().parse_args(["serve", "--runner", "onnx", "--generation-runner", "onnx"])
    assert (args.runner, args.generation_runner) == ("onnxruntime", "onnxruntime")
