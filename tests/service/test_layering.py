"""The service package's layers: imports between sub-packages point one way, and the serving path stays lean."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[2] / "service"

# What each layer may import from the others (calibration and models.bundle are below all of them).
ALLOWED: dict[str, set[str]] = {
    "settings": set(),
    "logs": set(),
    "runners": {"settings"},
    "monitoring": {"settings"},
    "serving": {"runners", "monitoring", "settings"},
    "protocols": {"serving", "monitoring", "settings"},
    "tools": {"serving", "runners", "monitoring", "settings"},
    "app": {"protocols", "serving", "monitoring", "settings", "logs"},
    "cli": {"app", "tools", "serving", "runners", "monitoring", "settings", "logs", "protocols"},
}


def _layer(path: Path) -> str:
    return path.relative_to(SERVICE).parts[0].removesuffix(".py")


def _imported_layers(path: Path) -> set[str]:
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["exitserve", "service"] and len(parts) > 2:
                layers.add(parts[2])
    return layers


def test_sub_packages_import_one_way() -> None:
    wrong = []
    for path in sorted(SERVICE.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == SERVICE:
            continue
        layer = _layer(path)
        assert layer in ALLOWED, f"{path}: a new layer? add it to ALLOWED"
        for other in _imported_layers(path) - {layer} - ALLOWED[layer]:
            wrong.append(f"{path.relative_to(SERVICE)} imports {other}")
    assert not wrong, wrong


def test_allowed_arrows_have_no_cycle() -> None:
    seen: dict[str, int] = {}

    def visit(layer: str, stack: tuple[str, ...]) -> None:
        assert layer not in stack, f"cycle: {' -> '.join((*stack, layer))}"
        if seen.get(layer):
            return
        for other in ALLOWED[layer]:
            visit(other, (*stack, layer))
        seen[layer] = 1

    for layer in ALLOWED:
        visit(layer, ())


def test_the_serving_path_imports_no_offline_code() -> None:
    code = (
        "import sys, exitserve.service.app\n"
        "heavy = ('torch', 'onnx', 'onnxscript', 'tqdm', 'scipy', 'matplotlib', 'sklearn', 'transformers')\n"
        "offline = ('exitserve.calibration.fitting', 'exitserve.calibration.plots', 'exitserve.calibration.evaluation',\n"
        "           'exitserve.service.tools', 'exitserve.service.cli', 'exitserve.models.training',\n"
        "           'exitserve.models.export', 'exitserve.models.data')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(offline))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stdout + done.stderr


def test_serving_the_default_bundle_loads_no_torch() -> None:
    """Building the app (bundles loaded and verified, both repositories) as `exitserve serve` does: the CPU
    image and the README's first command have no torch."""
    code = (
        "import sys\n"
        "from exitserve.service.app import create_app\n"
        "from exitserve.service.settings import Settings\n"
        "create_app(Settings())\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnx', 'tqdm'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stdout + done.stderr
