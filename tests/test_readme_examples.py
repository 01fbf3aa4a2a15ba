"""The README's examples against the default bundle, run as pasted: its curl commands in bash, its
tritonclient snippet in Python and deploy/README.md's traffic snippet, against a real `exitserve serve`
(only the address changes: a free port).

Examples that need what a clone does not have (a trained text or language-model bundle) or that are
templates (`[--merge] [--out DIR]`) are left to the tests of their features.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from exitserve.service.settings import DEFAULT_BUNDLE
from tests.conftest import ServerProcess

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
KEY = "readme-admin-key"
MODEL = "cifar10-resnet-large"


def fenced(language: str, text: str = README) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def curl_command(route: str) -> str:
    """The one README curl command (continuation lines joined) whose URL is `route`."""
    commands = [c for block in fenced("bash") for c in block.replace("\\\n", " ").splitlines()
                if c.lstrip().startswith("curl") and f"localhost:8000{route} " in c]
    assert len(commands) == 1, f"{route}: {commands}"
    return commands[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The default bundle served from a directory laid out as the README assumes: bundles/NAME and the
    recalibrated bundles/NAME-v2 the reload example names, relative to the working directory."""
    root = tmp_path_factory.mktemp("readme")
    for name in (MODEL, f"{MODEL}-v2"):
        shutil.copytree(DEFAULT_BUNDLE, root / "bundles" / name)
    proc = ServerProcess([Path("bundles") / MODEL], env={"EXITSERVE_ADMIN_API_KEY": KEY}, cwd=root)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def run_bash(command: str, server: ServerProcess) -> str:
    command = command.replace("localhost:8000", f"127.0.0.1:{server.port}")
    # `python` in the examples is the environment's own; $KEY is what the reload example reads
    env = {**os.environ, "KEY": KEY, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", command + " -w '\\n%{http_code}'"], capture_output=True, text=True,
                          env=env, cwd=server.log_path.parent, timeout=60)
    body, _, status = done.stdout.rpartition("\n")
    assert done.returncode == 0 and status == "200", f"{command}\n-> {status}: {body}{done.stderr}"
    return body


def test_v1_predict_answers_what_the_readme_shows(server: ServerProcess) -> None:
    answer = json.loads(run_bash(curl_command(f"/v1/models/{MODEL}/predict"), server))
    [shown] = [json.loads(b.replace('"…"', '""')) for b in fenced("json") if '"predictions"' in b][:1]
    assert answer["model"] == shown["model"] and answer["request_id"]
    assert answer["predictions"] == shown["predictions"]


def test_feedback_example_is_accepted(server: ServerProcess) -> None:
    answer = json.loads(run_bash(curl_command(f"/v1/models/{MODEL}/feedback"), server))
    # the example's request ids are placeholders this server never issued: both items come back unknown
    assert answer["unknown"] == 2 and [r["status"] for r in answer["results"]] == ["unknown", "unknown"]


def test_admin_reload_example_reloads(server: ServerProcess) -> None:
    answer = json.loads(run_bash(curl_command(f"/admin/models/{MODEL}/reload"), server))
    assert answer["model"] == MODEL and answer["path"].endswith(f"bundles/{MODEL}-v2")


def test_tritonclient_example_runs(server: ServerProcess) -> None:
    [snippet] = [b for b in fenced("python") if "tritonclient" in b]
    done = subprocess.run([sys.executable, "-c", snippet.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # print(labels, exits, target_met, reason) for 8 images: label bytes, exit indices, booleans, reason bytes
    assert done.stdout.count("b'") == 16 and re.search(r"\] \[[0-3 ]+\] \[ ?(True|False)", done.stdout), done.stdout
    assert done.stdout.count("b'out_of_distribution'") == 8  # random pixels: the input guard withholds every promise


def test_deploy_readme_traffic_snippet_runs(server: ServerProcess) -> None:
    [snippet] = [b for b in fenced("bash", (REPO / "deploy" / "README.md").read_text()) if "import httpx" in b]
    done = subprocess.run(["bash", "-c", snippet.replace("localhost:8000", f"127.0.0.1:{server.port}")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    metrics = httpx.get(f"{server.url}/metrics").text
    served = sum(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("exitserve_requests_total{") and 'status="200"' in line)
    assert served >= 100  # the snippet's 100 requests (and this module's others)


def test_client_extra_installs_what_the_client_examples_import() -> None:
    text = (REPO / "pyproject.toml").read_text()
    [client] = re.findall(r"^client = \[(.*)\]$", text, re.MULTILINE)
    assert "tritonclient[http]" in client and "openai" in client
    assert README.count('pip install -e ".[client]"') >= 2
