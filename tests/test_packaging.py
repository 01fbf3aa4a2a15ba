"""The distribution installs one import package, `exitserve`, and nothing under generic names; the
default bundle travels inside it, so an installed copy serves it with no checkout beside it."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = tmp_path_factory.mktemp("source")  # setuptools writes build/ beside the sources: not in the repo
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("exitserve", "models", "calibration", "service", "bundles"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(source)], check=True, cwd=out)
    (built,) = out.glob("exitserve-*.whl")
    return built


def test_wheel_holds_only_the_exitserve_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        top = {name.split("/", 1)[0] for name in archive.namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"exitserve"}
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for module in ("exitserve/service/app.py", "exitserve/models/bundle.py", "exitserve/calibration/__init__.py",
                   "exitserve/service/serving/engine.py", "exitserve/service/protocols/v2.py"):
        assert module in names


def test_installed_copy_imports_as_exitserve_and_nothing_bare(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)
    code = (
        "import importlib.util as u, sys\n"
        f"sys.path.insert(0, {str(target)!r})\n"
        "sys.path = [p for p in sys.path if p not in ('', '.', " + repr(str(REPO)) + ")]\n"
        "import exitserve, exitserve.service.app as app\n"
        f"assert app.__file__.startswith({str(target)!r}), app.__file__\n"
        "print(exitserve.__version__)\n"
        "bare = [m for m in ('models', 'service', 'calibration') if u.find_spec(m) is not None]\n"
        "assert not bare, bare\n"
    )
    # Run from outside the repository, whose folders would otherwise be importable from the cwd.
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from importlib.metadata import version

    assert done.stdout.strip() == version("exitserve")


def test_wheel_holds_the_default_bundle_and_no_other(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    default = REPO / "bundles" / "cifar10-resnet-large"
    expected = {f"exitserve/bundles/{p.relative_to(REPO / 'bundles').as_posix()}" for p in default.rglob("*") if p.is_file()}
    assert expected and expected <= names
    assert not [n for n in names if n.startswith("exitserve/bundles/cifar10-resnet-deep-late")]


def test_installed_copy_serves_the_default_bundle_with_no_argument(wheel: Path, tmp_path: Path) -> None:
    """`exitserve serve` with no argument, from a wheel installed away from the checkout (the
    dependencies are this environment's)."""
    from tests.conftest import free_port

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)
    port = free_port()
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(target)!r})\n"
        "sys.path = [p for p in sys.path if p not in ('', '.', " + repr(str(REPO)) + ")]\n"
        "from exitserve.service.settings import DEFAULT_BUNDLE\n"
        f"assert str(DEFAULT_BUNDLE).startswith({str(target)!r}), DEFAULT_BUNDLE\n"
        "from exitserve.service.cli.main import main\n"
        f"sys.exit(main(['serve', '--port', '{port}']))\n"
    )
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = False
        for _ in range(600):  # up to a minute; a server that exits ends the wait at once
            if server.poll() is not None:
                break
            with contextlib.suppress(httpx.HTTPError):
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
            if ready:
                break
            time.sleep(0.1)
        assert ready, (tmp_path / "serve.log").read_text()
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert "cifar10-resnet-large" in str(models)
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/models/cifar10-resnet-large/predict",
                            json={"inputs": [[[[0.5] * 32] * 32] * 3], "delta": 0.9}, timeout=30).json()
        assert answer["predictions"][0]["exits_total"] == 4
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_version_has_one_source() -> None:
    import exitserve
    from exitserve.service.app import create_app  # noqa: F401  (the app reports the same string)

    text = (REPO / "pyproject.toml").read_text()
    assert f'version = "{exitserve.__version__}"' in text
    sources = subprocess.run(["git", "grep", "-n", "-E", r"__version__ *= *['\"][0-9]+\.[0-9]", "--", "*.py"],
                             cwd=REPO, capture_output=True, text=True).stdout
    assert sources == "", sources
