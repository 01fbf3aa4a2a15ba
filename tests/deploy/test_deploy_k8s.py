"""deploy/k8s: built-in kinds validated by kubernetes-validate (offline schemas), custom resources
(ServiceMonitor, InferenceService, Kustomization) checked for the wiring that matters."""

from __future__ import annotations

import os
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml
from deploy_helpers import DOCKERFILE, K8S, load_yaml_all, parse_dockerfile

# Oldest schema kubernetes-validate ships and the newest: autoscaling/v2 and policy/v1 exist in both.
K8S_VERSIONS = ["1.25", kubernetes_validate.latest_version()]
CUSTOM_KINDS = {"ServiceMonitor", "InferenceService", "Kustomization"}


def manifests() -> dict[str, dict]:
    """'file:Kind' -> document, for every YAML file under deploy/k8s."""
    out = {}
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in load_yaml_all(path):
            out[f"{path.relative_to(K8S)}:{doc['kind']}"] = doc
    return out


def by_kind(kind: str) -> dict:
    [doc] = [d for d in manifests().values() if d["kind"] == kind]
    return doc


def container(deployment: dict) -> dict:
    [c] = deployment["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


BUILTIN = [k for k, d in manifests().items() if d["kind"] not in CUSTOM_KINDS]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_kinds_pass_kubernetes_validate(name: str, version: str) -> None:
    # strict: an unknown field (a typo such as `readinesProbe`) is an error, not silently ignored
    kubernetes_validate.validate(manifests()[name], version, strict=True)


def test_expected_resources_exist() -> None:
    kinds = {d["kind"] for d in manifests().values()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ServiceMonitor", "InferenceService",
            "Kustomization"} <= kinds


def test_deployment_probes_ports_and_resources() -> None:
    deployment = by_kind("Deployment")
    c = container(deployment)
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = env_of(c)
    assert port_names["http"] == int(env["EXITSERVE_PORT"])
    assert env["EXITSERVE_HOST"] == "0.0.0.0"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in port_names, probe
    assert {"cpu", "memory"} <= c["resources"]["requests"].keys()
    assert "memory" in c["resources"]["limits"]


def test_graceful_termination_outlasts_prestop_and_drain() -> None:
    deployment = by_kind("Deployment")
    c = container(deployment)
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = float(env_of(c).get("EXITSERVE_DRAIN_TIMEOUT_S", 20))
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pre_stop + drain


def test_pod_runs_as_the_images_non_root_user() -> None:
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    _, stages = parse_dockerfile(DOCKERFILE)
    uid = stages[-1].last("USER").split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == uid


def test_service_hpa_pdb_and_monitor_select_the_deployment() -> None:
    deployment, service = by_kind("Deployment"), by_kind("Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in container(deployment)["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert all(p["targetPort"] in container_ports for p in service_ports.values())

    hpa = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert by_kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    monitor = by_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"
    # Prometheus Operator names the job after the Service: the alert rules select job="exitserve"
    assert service["metadata"]["name"] == "exitserve" and "jobLabel" not in monitor["spec"]


def test_kserve_inference_service_speaks_v2() -> None:
    isvc = by_kind("InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    [c] = isvc["spec"]["predictor"]["containers"]
    env = env_of(c)
    assert c["name"] == "kserve-container"
    assert env["PROTOCOL"] == "v2"  # how KServe learns a custom predictor's protocol
    assert [p["containerPort"] for p in c["ports"]] == [int(env["EXITSERVE_PORT"])]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["image"] == container(by_kind("Deployment"))["image"]


def test_kustomization_lists_files_that_exist() -> None:
    kustomization = by_kind("Kustomization")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    # the KServe example is an alternative deployment, not part of the default one
    assert not any("inferenceservice" in r for r in kustomization["resources"])


@pytest.mark.skipif(shutil.which("kubectl") is None and not os.environ.get("CI"), reason="kubectl not installed (the machine image has it)")
def test_kustomize_build_renders_valid_manifests() -> None:
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert {d["kind"] for d in rendered} == {d["kind"] for d in manifests().values()} - {"Kustomization", "InferenceService"}
    for doc in rendered:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "exitserve"
        if doc["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
