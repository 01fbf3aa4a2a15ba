"""deploy/docker-compose.yml: valid against the compose-spec schema, and wired consistently with the
Prometheus config, the Grafana provisioning and the repository's files. (Docker does not run here.)"""

from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import PurePosixPath

import jsonschema
import pytest
from deploy_helpers import (
    COMPOSE,
    DASHBOARD,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    PROMETHEUS_CONFIG,
    REPO,
    load_yaml,
)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


def bind_mounts(service: dict) -> dict[str, str]:
    """container path -> host path (relative to the compose file) of the service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out[target] = source
    return out


def test_valid_against_compose_spec_schema(compose: dict) -> None:
    # The compose-spec JSON schema as vendored by check-jsonschema (no network needed).
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator_cls(schema, format_checker=validator_cls.FORMAT_CHECKER).iter_errors(compose)]
    assert errors == []


def test_services_and_ports(compose: dict) -> None:
    services = compose["services"]
    assert {"exitserve", "prometheus", "grafana"} <= services.keys()
    published = {name: [p.split(":")[0] for p in s.get("ports", [])] for name, s in services.items()}
    assert published["grafana"] == ["3000"] and published["exitserve"] == ["8000"]
    assert published["prometheus"] == ["9090"]


def test_exitserve_is_built_from_this_repo(compose: dict) -> None:
    service = compose["services"]["exitserve"]
    context = (COMPOSE.parent / service["build"]["context"]).resolve()
    assert context == REPO
    assert (context / service["build"]["dockerfile"]).is_file()
    env = service["environment"]
    assert env["EXITSERVE_HOST"] == "0.0.0.0"  # loopback inside a container is unreachable
    # the grace period must cover the drain (default 20 s) or in-flight requests are cut
    grace = int(re.fullmatch(r"(\d+)s", service["stop_grace_period"]).group(1))
    assert grace > float(env.get("EXITSERVE_DRAIN_TIMEOUT_S", 20))


def test_other_images_are_pinned(compose: dict) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"


def test_bind_mounts_name_files_that_exist(compose: dict) -> None:
    for name, service in compose["services"].items():
        for target, source in bind_mounts(service).items():
            assert (COMPOSE.parent / source).exists(), f"{name}: {source} -> {target} does not exist"


def test_prometheus_scrapes_the_exitserve_service(compose: dict) -> None:
    mounts = bind_mounts(compose["services"]["prometheus"])
    command = compose["services"]["prometheus"]["command"]
    config_path = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--config.file="))
    assert (COMPOSE.parent / mounts[config_path]).resolve() == PROMETHEUS_CONFIG
    config = load_yaml(PROMETHEUS_CONFIG)
    # rule files resolve next to the config inside the container too
    for rule_file in config["rule_files"]:
        in_container = str(PurePosixPath(config_path).parent / rule_file)
        assert in_container in mounts, f"{rule_file} is not mounted at {in_container}"
        assert (COMPOSE.parent / mounts[in_container]).resolve() == (PROMETHEUS_CONFIG.parent / rule_file).resolve()
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "exitserve"]
    [target] = [t for sc in job["static_configs"] for t in sc["targets"]]
    host, port = target.split(":")
    exitserve = compose["services"]["exitserve"]
    assert host == "exitserve" and port == exitserve["environment"]["EXITSERVE_PORT"]
    assert job["metrics_path"] == "/metrics"


def test_grafana_provisioning_is_mounted_and_consistent(compose: dict) -> None:
    mounts = bind_mounts(compose["services"]["grafana"])
    provisioning = COMPOSE.parent / mounts["/etc/grafana/provisioning"]
    assert (provisioning / "datasources" / DATASOURCES.name).resolve() == DATASOURCES
    assert (provisioning / "dashboards" / DASHBOARD_PROVIDERS.name).resolve() == DASHBOARD_PROVIDERS
    # the provider's path is where the dashboards folder is mounted
    [provider] = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    folder = provider["options"]["path"]
    assert (COMPOSE.parent / mounts[folder] / DASHBOARD.name).resolve() == DASHBOARD
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{folder}/{DASHBOARD.name}"
    # the datasource points at the compose service, on Prometheus' port
    [source] = load_yaml(DATASOURCES)["datasources"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
