"""Against a real `exitserve serve`: every metric the dashboard and the rules use is exposed; a real
Prometheus (Debian's) scrapes it with the compose scrape job, loads the rules, and answers every
dashboard query; the probes and the image's HEALTHCHECK hit routes that answer."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from deploy_helpers import (
    DOCKERFILE,
    K8S,
    Prometheus,
    dashboard_exprs,
    exec_form,
    grafana_to_promql,
    load_yaml_all,
    parse_dockerfile,
    referenced_metrics,
    rule_exprs,
    template_queries,
)
from prometheus_client.parser import text_string_to_metric_families

MODEL = "digits"
LLM = "tiny-llm"  # a generation bundle served beside it: the dashboard's language-model row
PROMETHEUS = shutil.which("prometheus")
# Skipped only outside CI: .ci/run installs Debian's prometheus, so there a missing binary must fail loudly.
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None and not os.environ.get("CI"),
                                      reason="prometheus not installed (Debian package; .ci/run installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive_traffic(url: str, bundle: Path, rounds: int = 1) -> None:
    """Requests that touch every metric: v1 and v2, several deltas, samples that miss their target
    (pcee-lb's lower bound is below 1, so delta 1.0 is never met), and one bad request."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    shape = [8, *manifest["input"]["shape"][1:]]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    with httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(rounds):
            for body in ({"inputs": x.tolist(), "delta": 0.6}, {"inputs": x.tolist(), "delta": 0.95},
                         {"inputs": x[:3].tolist(), "delta": 1.0, "policy": "pcee-lb"}):
                response = client.post(f"/v1/models/{MODEL}/predict", json=body)
                assert response.status_code == 200, response.text
            v2 = {"inputs": [{"name": manifest["input"]["name"], "shape": shape, "datatype": "FP32",
                              "data": x.ravel().tolist()}], "parameters": {"delta": 0.9}}
            response = client.post(f"/v2/models/{MODEL}/infer", json=v2)
            assert response.status_code == 200, response.text
            assert client.post(f"/v1/models/{MODEL}/predict", json={"inputs": [[1.0]]}).status_code == 400


@pytest.fixture(scope="module")
def llm_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llm_support import write_tiny_generation_bundle

    return write_tiny_generation_bundle(tmp_path_factory.mktemp("llm") / LLM)


@pytest.fixture(scope="module")
def server(digits_bundle: Path, llm_bundle: Path) -> Iterator:
    from tests.conftest import running_server

    with running_server([digits_bundle, llm_bundle], ["--max-batch-size", "16", "--max-queue-delay-ms", "2"]) as proc:
        yield proc


def drive_generation(url: str) -> None:
    """Generation requests that touch every generation metric: full depth, early exit, exact mode
    (a low draft threshold, so drafts are verified), a stream, a chat, and one bad request."""
    with httpx.Client(base_url=url, timeout=30) as client:
        for extra in ({"policy": "full"}, {"delta": 0.5, "policy": "confidence"}, {"policy": "exact", "delta": 0.2},
                      {"delta": 0.7, "stream": True}):
            body = {"model": LLM, "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0, **extra}
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
        chat = {"model": LLM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        assert client.post("/v1/completions", json={"model": LLM, "prompt": "x", "max_tokens": 10**6}).status_code == 400


@pytest.fixture(scope="module")
def exposed(server, digits_bundle: Path) -> set[str]:
    """Sample names on /metrics after traffic (histogram families show only _bucket/_sum/_count)."""
    drive_traffic(server.url, digits_bundle)
    drive_generation(server.url)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_metric_the_dashboard_and_rules_use_is_exposed(exposed: set[str]) -> None:
    uses = referenced_metrics()
    assert len(uses) >= 10  # the regex found the names at all
    missing = {name: sorted(where) for name, where in uses.items() if name not in exposed}
    assert missing == {}, f"referenced but not on /metrics: {json.dumps(missing, indent=1)}"


# --- a real Prometheus ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prometheus(server, digits_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"), server.url.removeprefix("http://"))
    try:
        prom.wait("prometheus not ready", lambda: httpx.get(f"{prom.url}/-/ready", timeout=1).status_code == 200)
        drive_traffic(server.url, digits_bundle)
        drive_generation(server.url)
        prom.wait("no exitserve_requests_total series", lambda: prom.query("exitserve_requests_total"))
        # more traffic after the first scrape, so rates over the window are not zero
        drive_traffic(server.url, digits_bundle)
        drive_generation(server.url)
        time.sleep(2.5)
        yield prom
    finally:
        prom.stop()


@needs_prometheus
def test_prometheus_scrapes_exitserve_series(prometheus: Prometheus) -> None:
    [target] = prometheus.api("targets")["activeTargets"]
    assert target["labels"]["job"] == "exitserve" and target["health"] == "up", target
    series = prometheus.query(f'sum by (protocol) (exitserve_requests_total{{job="exitserve", model="{MODEL}"}})')
    assert {s["metric"]["protocol"] for s in series} == {"v1", "v2"}


@needs_prometheus
def test_every_dashboard_query_returns_data(prometheus: Prometheus) -> None:
    # the model picker's "All": the classifier panels read digits, the language-model row tiny-llm
    empty = {where: expr for where, expr in dashboard_exprs().items()
             if not prometheus.query(grafana_to_promql(expr, f"{MODEL}|{LLM}"))}
    assert empty == {}, "dashboard queries with no data"


@needs_prometheus
def test_model_variable_lists_the_served_model(prometheus: Prometheus) -> None:
    query = template_queries()["model"]  # label_values(METRIC, model)
    metric = query[query.index("(") + 1:query.index(",")]
    assert prometheus.api("label/model/values", **{"match[]": metric}) == sorted([MODEL, LLM])


@needs_prometheus
def test_rules_load_and_evaluate_without_errors(prometheus: Prometheus) -> None:
    def evaluated() -> bool:
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        return len(rules) == len(rule_exprs()) and all(r["health"] == "ok" for r in rules)

    prometheus.wait("rules not all evaluated healthy", evaluated, timeout=20)
    firing = [a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"]
    assert firing == []


# --- probes and the image's health check ------------------------------------------------------------

def probe_paths() -> set[str]:
    paths = set()
    for path in K8S.rglob("*.yaml"):
        for doc in load_yaml_all(path):
            spec = doc.get("spec", {})
            pod = spec.get("template", {}).get("spec", {}) or spec.get("predictor", {})
            for c in pod.get("containers", []):
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    if probe in c:
                        paths.add(c[probe]["httpGet"]["path"])
    return paths


def test_every_probe_path_answers_when_ready(server) -> None:
    paths = probe_paths()
    assert {"/readyz", "/healthz", "/v2/health/ready"} <= paths
    for path in paths:
        assert httpx.get(f"{server.url}{path}", timeout=5).status_code == 200, path


def test_image_healthcheck_command_passes_and_fails(server) -> None:
    _, stages = parse_dockerfile(DOCKERFILE)
    command = exec_form(stages[-1].last("HEALTHCHECK"))
    command = [sys.executable, *command[1:]]
    ok = subprocess.run(command, env={"EXITSERVE_PORT": str(server.port)}, capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    down = subprocess.run(command, env={"EXITSERVE_PORT": str(free_port())}, capture_output=True, timeout=30)
    assert down.returncode != 0
