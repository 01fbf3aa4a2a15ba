"""Prometheus config and alert rules: promtool's own checks and unit tests, plus coverage of the rule set."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from deploy_helpers import PROMETHEUS_CONFIG, RULES, RULES_TEST, load_yaml, rule_exprs

PROMTOOL = shutil.which("promtool")
# Skipped only outside CI: .ci/run installs Debian's prometheus, so there a missing promtool must fail loudly.
needs_promtool = pytest.mark.skipif(PROMTOOL is None and not os.environ.get("CI"),
                                    reason="promtool not installed (Debian package prometheus; .ci/run installs it)")

# What the issue asks for, by alert name.
REQUIRED_ALERTS = {
    "ExitserveDown",  # service down
    "ExitserveHighErrorRatio",
    "ExitserveHighLatencyP99",
    "ExitserveQueueSaturated",
    "ExitserveTargetMissedRatioHigh",
    "ExitserveAccuracyBelowPromise",  # issue 8: labelled feedback below the promise
    "ExitserveShadowAgreementDrop",  # issue 8: label-free shadow agreement below calibration
    "ExitserveInputsUnlikeCalibration",  # issue 26: the input guard withholds far more than calibrated
}


def promtool(*args: str) -> subprocess.CompletedProcess:
    # cwd: promtool resolves rule_files relative to the file, but test output names are nicer from here
    return subprocess.run([PROMTOOL, *args], cwd=RULES.parent, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_check_config() -> None:
    result = promtool("check", "config", PROMETHEUS_CONFIG.name)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rule_exprs())} rules found" in result.stdout


@needs_promtool
def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", RULES_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_required_alerts_exist_with_severity_and_text() -> None:
    rules = [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]
    alerts = {rule["alert"]: rule for rule in rules if "alert" in rule}
    assert alerts.keys() >= REQUIRED_ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), name


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    """A rule whose tests only ever expect silence would pass with any expression."""
    alerts = {rule["alert"] for group in load_yaml(RULES)["groups"] for rule in group["rules"] if "alert" in rule}
    fires, quiet = set(), set()
    for case in load_yaml(RULES_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts - fires == set(), "alerts never expected to fire in rules_test.yml"
    assert alerts - quiet == set(), "alerts never expected to stay quiet in rules_test.yml"


def test_rules_select_the_job_the_scrape_config_defines() -> None:
    jobs = {job["job_name"] for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    assert "exitserve" in jobs
    for name, expr in rule_exprs().items():
        if "job=" in expr:
            assert 'job="exitserve"' in expr, name
    assert load_yaml(PROMETHEUS_CONFIG)["rule_files"] == [RULES.name]
