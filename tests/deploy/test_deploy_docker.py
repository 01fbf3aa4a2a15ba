"""Dockerfiles and .dockerignore, read statically (no Docker engine on these machines): non-root,
serving dependencies only, a health check, the default bundle baked in, a lean build context."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from deploy_helpers import (
    DOCKERFILE,
    DOCKERFILE_GPU,
    REPO,
    dockerignore_excludes,
    dockerignore_patterns,
    exec_form,
    parse_dockerfile,
)

from exitserve.service.settings import DEFAULT_BUNDLE

BOTH = pytest.mark.parametrize("path", [DOCKERFILE, DOCKERFILE_GPU], ids=["cpu", "gpu"])


def final_stage(path: Path):
    _, stages = parse_dockerfile(path)
    return stages[-1]


def pip_installs(path: Path) -> list[str]:
    _, stages = parse_dockerfile(path)
    return [m.group(1).strip() for s in stages for run in s.all("RUN") for m in re.finditer(r"pip install ([^&;]+)", run)]


@BOTH
def test_runs_as_a_non_root_user(path: Path) -> None:
    user = final_stage(path).last("USER")
    assert user is not None, "no USER: the server would run as root"
    name = user.split(":")[0]
    assert name not in {"0", "root"}


@BOTH
def test_healthcheck_probes_healthz_with_python(path: Path) -> None:
    check = final_stage(path).last("HEALTHCHECK")
    assert check is not None
    command = exec_form(check)
    assert command[0] in {"python", "python3"}  # slim images have no curl
    assert "/healthz" in command[-1]
    compile(command[-1], "HEALTHCHECK", "exec")


@BOTH
def test_entrypoint_and_listen_address(path: Path) -> None:
    stage = final_stage(path)
    assert exec_form(stage.last("ENTRYPOINT")) == ["exitserve", "serve"]
    env = stage.env()
    assert env["EXITSERVE_HOST"] == "0.0.0.0"
    assert stage.last("EXPOSE") == env["EXITSERVE_PORT"]


@BOTH
def test_default_bundle_is_installed_as_package_data(path: Path) -> None:
    _, stages = parse_dockerfile(path)
    default = DEFAULT_BUNDLE.relative_to(REPO).as_posix()
    copies = [c.split() for c in stages[0].all("COPY") if not c.startswith("--from")]
    # the build stage puts the bundle where pyproject.toml's package data finds it (exitserve.bundles) ...
    assert [default + "/", default + "/"] in [c[-2:] for c in copies]
    assert ["bundles/__init__.py", "bundles/"] in [c[-2:] for c in copies]
    assert (REPO / default / "manifest.json").is_file()
    # ... so the image needs no copy of its own and no argument: `exitserve serve` serves it
    assert final_stage(path).last("CMD") is None
    assert not [c for c in final_stage(path).all("COPY") if "bundles" in c]


def test_cpu_image_installs_only_the_cpu_extra() -> None:
    installs = pip_installs(DOCKERFILE)
    assert installs == ['".[cpu,redis]"']  # redis: the client for the optional shared decision store
    text = DOCKERFILE.read_text()
    assert "torch" not in " ".join(installs) and "train" not in " ".join(installs)
    assert "find_spec('torch')" in text  # the build fails if torch sneaks in through a dependency
    assert final_stage(DOCKERFILE).base.startswith("python:") and "slim" in final_stage(DOCKERFILE).base


def test_gpu_image_uses_cuda_and_onnxruntime_gpu() -> None:
    assert pip_installs(DOCKERFILE_GPU) == ['".[gpu]"']
    stage = final_stage(DOCKERFILE_GPU)
    assert stage.base.startswith("nvidia/cuda:") and "runtime" in stage.base and "cudnn" in stage.base
    assert stage.env()["EXITSERVE_PROVIDER"] == "cuda"


@BOTH
def test_build_context_keeps_what_the_build_copies(path: Path) -> None:
    patterns = dockerignore_patterns()
    _, stages = parse_dockerfile(path)
    for stage in stages:
        for copy in stage.all("COPY"):
            if copy.startswith("--from"):
                continue
            for source in copy.split()[:-1]:
                if source.startswith("--"):
                    continue
                top = source.strip("/").split("/")[0]
                assert not dockerignore_excludes(top, patterns), f"{source} is excluded by .dockerignore"
                if top != "bundles":  # the bundle has its own test
                    assert (REPO / top).exists(), source


@pytest.mark.parametrize("path", [".venv", ".git", "runs", "tests", ".pytest_cache", ".ruff_cache",
                                  ".hypothesis", "benchmarks", "deploy", "exitserve.egg-info", "data"])
def test_build_context_leaves_out(path: str) -> None:
    assert dockerignore_excludes(path, dockerignore_patterns())
