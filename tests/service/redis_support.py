"""A real `redis-server` (Debian's package) on a loopback port, for the shared decision store's tests."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """One redis-server process; `restart` starts a new one on the same port (an empty store)."""

    def __init__(self, workdir: Path, port: int | None = None):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: apt-get install redis-server (.ci/run does it)")
        self.binary = binary
        self.workdir = workdir
        self.port = port or _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = self._start()

    def _start(self) -> subprocess.Popen:
        # DEBUG SLEEP lets a test make the server answer slowly.
        process = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", str(self.workdir), "--enable-debug-command", "local"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return process
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()  # also ends a SIGSTOP'd server
        self.process.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.process = self._start()


@contextlib.contextmanager
def redis_process(workdir: Path) -> Iterator[RedisProcess]:
    """A redis-server the test may stop (SIGSTOP), resume, kill and restart; killed on the way out."""
    server = RedisProcess(workdir)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """Start redis-server (no persistence) and yield its URL; stopped on the way out."""
    with redis_process(workdir) as server:
        yield server.url
