"""Shared fixtures: a small real multi-exit model trained on sklearn digits, exported and calibrated
with the real CLI, and a real `exitserve serve` process on loopback.

Data: tests use the small committed fixtures under tests/fixtures (rebuilt by make_fixtures.py). A
test that needs a full data set says so with `@pytest.mark.needs_data("cifar10", ...)` (folders under
the data root, `$EXITSERVE_DATA` or ../shared/data); without it the test skips with one line naming
the path, unless EXITSERVE_REQUIRE_DATA is set (.ci/run sets it where the data is), which fails it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
FIXTURE_DATA = FIXTURES / "data"  # a data root in the full sets' layout: text/sst2/*.tsv
CIFAR10_FIXTURE = FIXTURES / "cifar10-test-256.npz"
NEEDS_DATA = "needs data:"  # the skip reason's prefix


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_data(*folders): needs these full data sets under the data root")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    from exitserve.models.data import data_root

    for marker in item.iter_markers("needs_data"):
        root = data_root()
        missing = [folder for folder in marker.args if not (root / folder).exists()]
        if not missing:
            continue
        reason = (f"{NEEDS_DATA} {', '.join(missing)} not found under {root} "
                  "(set EXITSERVE_DATA to the data folder; default ../shared/data)")
        if os.environ.get("EXITSERVE_REQUIRE_DATA"):
            pytest.fail(f"{reason}; EXITSERVE_REQUIRE_DATA is set, so a missing data set is a failure", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def digits_bundle_uncalibrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-exit CNN trained for a few epochs on digits with the real CLI, exported as a bundle."""
    root = tmp_path_factory.mktemp("digits")
    bundle = root / "digits-bundle"
    subprocess.run(
        [sys.executable, "-m", "exitserve.service.cli", "train", "--arch", "digits-compact", "--data", "digits",
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


@pytest.fixture(scope="session")
def digits_bundle(digits_bundle_uncalibrated: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits bundle calibrated on its validation split with the real CLI."""
    bundle = tmp_path_factory.mktemp("calibrated") / "digits"
    shutil.copytree(digits_bundle_uncalibrated, bundle)
    subprocess.run([sys.executable, "-m", "exitserve.service.cli", "calibrate", str(bundle), "--data", "digits:val", "--no-progress"],
                   check=True, cwd=REPO, capture_output=True)
    return bundle


@pytest.fixture(scope="session")
def text_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer MiniLM text classifier (SST-2) built and calibrated with the real CLI.

    The real pretrained encoder, cut after 2 of its 6 layers, so that the fixture takes seconds;
    heads trained self-supervised on 2,000 phrases of the committed SST-2 fixture.
    """
    bundle = tmp_path_factory.mktemp("text") / "sst2-tiny"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EXITSERVE_DATA": str(FIXTURE_DATA)}
    subprocess.run(
        [sys.executable, "-m", "exitserve.service.cli", "train-text", "--data", "sst2", "--layers", "2", "--train-limit", "2000",
         "--val-limit", "500", "--epochs", "5", "--cache", "", "--export", str(bundle), "--name", "sst2-tiny"],
        check=True, cwd=REPO, capture_output=True, env=env,
    )
    subprocess.run([sys.executable, "-m", "exitserve.service.cli", "calibrate", str(bundle), "--data", "sst2:val", "--no-progress"],
                   check=True, cwd=REPO, capture_output=True, env=env)
    return bundle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, bundles: list[Path], extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 cwd: Path = REPO):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"exitserve-test-{self.port}.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "exitserve.service.cli", "serve", *map(str, bundles), "--port", str(self.port),
             "--host", "127.0.0.1", *(extra_args or [])],
            cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@contextlib.contextmanager
def running_server(bundles: list[Path], extra_args: list[str] | None = None, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """A real `exitserve serve`, ready, stopped on the way out."""
    proc = ServerProcess(bundles, extra_args, env)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def server(digits_bundle: Path) -> Iterator[ServerProcess]:
    with running_server([digits_bundle], ["--max-batch-size", "16", "--max-queue-delay-ms", "2"]) as proc:
        yield proc
