"""Every command reports a user mistake as one `error: …` line on stderr and exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from exitserve.service.cli.main import main

REPO = Path(__file__).resolve().parents[3]


def run_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI in-process; it must fail with exactly one `error:` line and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_export_explains_what_to_pass_instead_of_a_state_dict_or_a_pickled_module(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(4, 3))
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    torch.save(net, tmp_path / "module.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    out = str(tmp_path / "bundle")

    line = run_error(capsys, ["export", str(tmp_path / "weights.pt"), "--out", out])
    assert "plain state_dict" in line and "--model package.module:factory" in line
    line = run_error(capsys, ["export", str(tmp_path / "module.pt"), "--out", out])
    assert "pickled" in line and "never unpickles" in line and "--model" in line
    line = run_error(capsys, ["export", str(tmp_path / "notes.txt"), "--out", out])
    assert "not a PyTorch checkpoint" in line
    line = run_error(capsys, ["export", str(tmp_path / "missing.pt"), "--out", out])
    assert "missing.pt" in line and "no such" in line
    assert "one of them" in run_error(capsys, ["export", "--out", out])
    assert not Path(out).exists()


def test_export_model_factory_mistakes(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cli_err_factories.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "from exitserve.models.wrap import attach_exits\n"
        "def plain():\n    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))\n"
        "def wrapped():\n"
        "    backbone = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))\n"
        "    return attach_exits(backbone, after=[2], example_inputs=torch.rand(8, 4))\n"
        "not_callable = 3\n"
    )
    monkeypatch.chdir(tmp_path)  # --model imports from the working directory, like `python -m`
    out = str(tmp_path / "bundle")
    line = run_error(capsys, ["export", "--model", "cli_err_factories:plain", "--out", out])
    assert "returned a Sequential, not a multi-exit network" in line and "attach_exits" in line
    line = run_error(capsys, ["export", "--model", "cli_err_factories:wrapped", "--out", out])
    assert "without example inputs" in line and "--examples" in line
    np.savez(tmp_path / "few.npz", x=np.random.rand(3, 4).astype(np.float32))
    line = run_error(capsys, ["export", "--model", "cli_err_factories:wrapped", "--examples", "few.npz", "--out", out])
    assert "at least 7 samples" in line
    np.savez(tmp_path / "nox.npz", inputs=np.zeros(3))
    assert "array named 'x'" in run_error(capsys, ["export", "--model", "cli_err_factories:wrapped", "--examples",
                                                   "nox.npz", "--out", out])
    assert "has no 'nothing'" in run_error(capsys, ["export", "--model", "cli_err_factories:nothing", "--out", out])
    assert "not a function" in run_error(capsys, ["export", "--model", "cli_err_factories:not_callable", "--out", out])
    assert "no module named 'no_such_module'" in run_error(capsys, ["export", "--model", "no_such_module:f", "--out", out])
    assert "package.module:function" in run_error(capsys, ["export", "--model", "cli_err_factories", "--out", out])


def test_calibrate_and_evaluate_mistakes(capsys: pytest.CaptureFixture[str], bundle_copy: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere")
    assert "not a bundle directory" in run_error(capsys, ["calibrate", missing, "--data", "digits:val"])
    assert "unknown data set 'nope'" in run_error(capsys, ["calibrate", str(bundle_copy), "--data", "nope:val"])
    assert "unknown split" in run_error(capsys, ["calibrate", str(bundle_copy), "--data", "digits:valid"])
    line = run_error(capsys, ["calibrate", str(bundle_copy), "--data", str(tmp_path / "held-out.npz")])
    assert "held-out.npz" in line and "No such file" in line
    np.savez(tmp_path / "wrong-shape.npz", x=np.zeros((5, 3, 32, 32), np.float32), y=np.zeros(5, np.int64))
    assert "bundle expects" in run_error(capsys, ["calibrate", str(bundle_copy), "--data", str(tmp_path / "wrong-shape.npz")])
    assert "needs --data" in run_error(capsys, ["calibrate", str(bundle_copy)])
    # the bundle is not calibrated yet
    line = run_error(capsys, ["evaluate", str(bundle_copy), "--data", "digits:test", "--out", str(tmp_path / "eval")])
    assert "calibration.json: missing" in line
    assert not (tmp_path / "eval").exists()


def test_serve_mistakes_name_the_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_error(capsys, ["serve", "--port", "70000"]) == "error: --port: Input should be less than or equal to 65535"
    assert "--default-delta" in run_error(capsys, ["serve", "--delta", "1.5"])
    assert "not a bundle directory" in run_error(capsys, ["serve", str(tmp_path / "nothing")])


def test_missing_optional_dependency_names_the_extra(capsys: pytest.CaptureFixture[str], bundle_copy: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # as if scikit-learn were not installed (also when another test has imported it already)
    for name in ["sklearn", *(m for m in sys.modules if m.startswith("sklearn."))]:
        monkeypatch.setitem(sys.modules, name, None)
    line = run_error(capsys, ["calibrate", str(bundle_copy), "--data", "digits:val"])
    assert "scikit-learn" in line and "pip install 'exitserve[train]'" in line


def test_user_error_in_a_real_process_is_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "exitserve.service.cli", "evaluate", "no/such/bundle", "--data",
                           "digits:test", "--out", "unused"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: no/such/bundle: not a bundle directory"
    assert "Traceback" not in done.stderr + done.stdout


def test_a_bad_flag_value_is_one_line_not_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["serve", "--delta", "abc"])
    assert stopped.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["error: exitserve serve: argument --default-delta/--delta: invalid float value: 'abc' "
                     "(`exitserve serve --help` lists every option)"]


def test_a_wrongly_typed_manifest_field_is_one_line(capsys: pytest.CaptureFixture[str], bundle_copy: Path) -> None:
    manifest = bundle_copy / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": "1"', '"version": [1]', 1))
    line = run_error(capsys, ["info", str(bundle_copy)])
    assert line == f"error: {manifest}: invalid manifest: version: Input should be a valid string (got [1])"
