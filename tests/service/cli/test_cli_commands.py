"""calibrate / evaluate print their headline figures; serve's flags come from Settings; every flag
has a help text with its default; export --model exports your own network (in a real process)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exitserve.models.bundle import load_bundle
from exitserve.service.cli.flags import given_settings
from exitserve.service.cli.main import build_parser, main
from exitserve.service.settings import Settings


def _rows(out: str, first: str) -> list[list[str]]:
    """Whitespace-split lines of the table whose header starts with `first`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(first)) + 1
    rows = []
    for line in lines[start:]:
        cells = line.split()
        if not cells or not cells[0][0].isdigit():
            break
        rows.append(cells)
    return rows


def test_calibrate_prints_per_exit_accuracy_and_the_promise(capsys: pytest.CaptureFixture[str], bundle_copy: Path) -> None:
    assert main(["calibrate", str(bundle_copy), "--data", "digits:val", "--no-progress"]) == 0
    out = capsys.readouterr().out
    calibration = json.loads((bundle_copy / "calibration.json").read_text())
    exits = _rows(out, "exit  compute")
    assert [int(r[0]) for r in exits] == [0, 1, 2]  # exits count from 0
    assert [float(r[2]) for r in exits] == [round(e["validation_accuracy"], 3) for e in calibration["exits"]]
    policy = _rows(out, "δ")
    assert [r[0] for r in policy] == ["0.80", "0.90", "0.95", "0.99"]
    assert all(0.0 <= float(r[3]) <= 1.0 for r in policy)  # coverage
    assert Settings().default_policy in out and "calibration data itself" in out


def test_evaluate_prints_what_evaluation_json_holds(capsys: pytest.CaptureFixture[str], digits_bundle: Path,
                                                    tmp_path: Path) -> None:
    out_dir = tmp_path / "eval"
    assert main(["evaluate", str(digits_bundle), "--data", "digits:test", "--out", str(out_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    report = json.loads((out_dir / "evaluation.json").read_text())
    exits = _rows(out, "exit  compute")
    assert [float(r[2]) for r in exits] == [round(e["accuracy"], 3) for e in report["exits"]]
    by_delta = {f"{r['delta']:.2f}": r for r in report["policies"][Settings().default_policy]}
    for delta, accuracy, promised, coverage, _ in (r[:5] for r in _rows(out, "δ")):
        row = by_delta[delta]
        assert float(accuracy) == round(row["accuracy"], 3) and float(coverage) == round(row["coverage"], 3)
        assert promised == ("–" if row["accuracy_promised"] is None else f"{row['accuracy_promised']:.3f}")
    assert (out_dir / "reliability.png").is_file() and "and plots" in out


def test_evaluate_without_matplotlib_writes_the_rest_and_names_the_extra(
        capsys: pytest.CaptureFixture[str], digits_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    out_dir = tmp_path / "eval"
    assert main(["evaluate", str(digits_bundle), "--data", "digits:test", "--out", str(out_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in out_dir.iterdir()) == ["evaluation.json", "evaluation.md"]
    notes = [line for line in out.splitlines() if "matplotlib" in line]
    assert len(notes) == 1 and "pip install 'exitserve[plots]'" in notes[0]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_flag_has_help_with_its_default(command: str) -> None:
    parser = _subcommands()[command]
    text = "".join(parser.format_help().split())  # no whitespace at all: wrapping breaks at hyphens too
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.option_strings or action.dest} has no help text"
        help_text = parser._get_formatter()._expand_help(action)
        assert "".join(help_text.split()) in text
        if action.default not in (None, False) and action.option_strings:
            assert "default:" in help_text, f"{command} {action.option_strings} does not show its default"


def test_serve_has_a_flag_for_every_setting_and_the_environment_still_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    serve = _subcommands()["serve"]
    options = {s for a in serve._actions for s in a.option_strings}
    for name, field in Settings.model_fields.items():
        if name != "bundles":
            assert f"--{name.replace('_', '-')}" in options
            assert field.description and field.description in " ".join(serve.format_help().split())
    monkeypatch.setenv("EXITSERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("EXITSERVE_DEFAULT_DELTA", "0.8")
    args = build_parser().parse_args(["serve", "--delta", "0.95", "--no-spinning", "--warmup-batch-sizes", "1", "4",
                                      "--runner", "onnx"])
    settings = Settings(**given_settings(args, args.settings_flags))
    assert settings.default_delta == 0.95  # the flag wins over the environment
    assert settings.max_batch_size == 7  # a flag not given leaves the environment's value
    assert settings.spinning is False and settings.warmup_batch_sizes == [1, 4]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--runner", "tensorflow"])


FACTORY = '''
import torch
from torch import nn

from exitserve.models.wrap import Exportable, attach_exits


def build_model():
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
    )
    x = torch.rand(16, 1, 8, 8)
    net = attach_exits(backbone, after=[1, 3], example_inputs=x)
    return Exportable(net, example_inputs=x, labels=["cat", "dog", "fox"], name="pets")
'''


def test_export_your_own_model_from_a_factory_in_a_real_process(tmp_path: Path) -> None:
    (tmp_path / "my_pets.py").write_text(FACTORY)
    exitserve = shutil.which("exitserve") or pytest.fail("the exitserve console script is not installed")
    done = subprocess.run([exitserve, "export", "--model", "my_pets:build_model", "--out", "bundles/pets"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "bundle bundles/pets: 3 exits" in done.stdout
    bundle = load_bundle(tmp_path / "bundles" / "pets")
    assert bundle.manifest.name == "pets" and bundle.manifest.labels == ["cat", "dog", "fox"]
    assert bundle.manifest.input.shape == [-1, 1, 8, 8]
    assert bundle.manifest.created_by.extra["factory"] == "my_pets:build_model"


def test_info_counts_a_small_model_in_kflops(capsys: pytest.CaptureFixture[str], digits_bundle: Path) -> None:
    assert main(["info", str(digits_bundle)]) == 0
    out = capsys.readouterr().out
    assert "kFLOPs  cumulative" in out
    rows = _rows(out, "exit")
    assert len(rows) == 3 and all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows)


def test_calibrate_without_an_input_guard_leaves_the_segments_alone(bundle_copy: Path) -> None:
    """`--no-input-guard`: no features tap in the graphs, no guard in calibration.json (issue 26)."""
    from exitserve.models.bundle import load_bundle
    from exitserve.service.cli.main import main

    assert main(["calibrate", str(bundle_copy), "--data", "digits:val", "--no-progress", "--no-input-guard"]) == 0
    bundle = load_bundle(bundle_copy, require_calibration=True)
    assert bundle.manifest.segments[0].features is None and bundle.calibration is not None
    assert bundle.calibration.get("input_guard") is None and bundle.calibration["schema_version"] == 3
    assert main(["calibrate", str(bundle_copy), "--data", "digits:val", "--no-progress", "--guard-quantile", "0.95"]) == 0
    guarded = load_bundle(bundle_copy, require_calibration=True)
    assert guarded.manifest.segments[0].features == "features_0"
    assert guarded.calibration is not None and guarded.calibration["input_guard"]["quantile"] == 0.95
