"""Shared by the deploy tests: where the files are, and how to read the PromQL and Dockerfiles in them."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "exitserve.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "exitserve.yml"
K8S = DEPLOY / "k8s"
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERFILE_GPU = REPO / "docker" / "Dockerfile.gpu"
DOCKERIGNORE = REPO / ".dockerignore"

# Metric names as PromQL sees them (exitserve_requests_total, ..._bucket), never label values:
# those sit inside quotes, and the lookbehind keeps `model:exitserve_x`-style names out.
METRIC_NAME = re.compile(r"(?<![\w:\"])exitserve_[a-z_]+")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def rule_exprs() -> dict[str, str]:
    """alert (or record) name -> PromQL expression, over every group of rules.yml."""
    return {rule.get("alert") or rule["record"]: rule["expr"]
            for group in load_yaml(RULES)["groups"] for rule in group["rules"]}


def dashboard_panels(board: dict | None = None) -> list[dict]:
    """Every panel, rows' collapsed children included."""
    board = board or dashboard()
    panels = []
    for panel in board["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_exprs(board: dict | None = None) -> dict[str, str]:
    """'panel title / refId' -> PromQL expression of that query."""
    return {f"{p['title']} / {t['refId']}": t["expr"]
            for p in dashboard_panels(board) for t in p.get("targets", []) if t.get("expr")}


def template_queries(board: dict | None = None) -> dict[str, str]:
    board = board or dashboard()
    out = {}
    for var in board.get("templating", {}).get("list", []):
        query = var.get("query")
        out[var["name"]] = query.get("query", "") if isinstance(query, dict) else (query or "")
    return out


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


def referenced_metrics() -> dict[str, set[str]]:
    """metric name -> where it is used (rules and dashboard)."""
    uses: dict[str, set[str]] = {}
    sources = {**{f"rule {k}": v for k, v in rule_exprs().items()},
               **{f"panel {k}": v for k, v in dashboard_exprs().items()},
               **{f"variable {k}": v for k, v in template_queries().items()}}
    for where, expr in sources.items():
        for name in metric_names(expr):
            uses.setdefault(name, set()).add(where)
    return uses


def grafana_to_promql(expr: str, model: str) -> str:
    """What Grafana sends for a dashboard query, with the model variable set to one model."""
    return expr.replace("$__rate_interval", "1m").replace("$model", model)


# --- Dockerfiles -------------------------------------------------------------------------------------

@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """ENV key=value pairs of this stage (the only ENV form used here)."""
        out = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                out[key] = value
        return out


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the build stages, each a list of (INSTRUCTION, arguments)."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            if keyword == "ARG":
                key, _, value = rest.partition("=")
                args[key] = value
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT (or HEALTHCHECK's CMD part)."""
    return json.loads(args[args.index("["):])


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule for one top-level path: the last matching pattern wins, `!` re-includes."""
    from fnmatch import fnmatchcase

    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern[1:] if negate else pattern
        pattern = pattern.strip("/").removeprefix("**/")
        if fnmatchcase(path, pattern):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


# --- a real Prometheus (Debian's), scraping a test server with the compose scrape job -----------------

PROMETHEUS = shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, tmp: Path, target: str):
        base = load_yaml(PROMETHEUS_CONFIG)
        [job] = [j for j in base["scrape_configs"] if j["job_name"] == "exitserve"]
        # the compose job, pointed at the test server; fast intervals so the test is short
        job = {**job, "static_configs": [{"targets": [target]}], "scrape_interval": "1s", "scrape_timeout": "1s"}
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(RULES)], "scrape_configs": [job]}
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = (tmp / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.log_path = tmp / "prometheus.log"

    def api(self, path: str, **params) -> dict:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def wait(self, what: str, ready, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if ready():
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{what} after {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
