"""benchmarks/drift_shift.py: its bridge to promtool (scraped counters become a unit test of the
ExitserveShadowAgreementDrop expression in rules.yml, which passes where the counts computed in
Python say the alert holds, and fails when told otherwise), and issue 26's goal on a real server:
severity-3 shifted streams and MNIST-as-CIFAR set the label-free alert off within 2,000 requests,
a clean stream of 2,000 does not."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import httpx
import pytest
from conftest import running_server

from exitserve.service.settings import DEFAULT_BUNDLE

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # scripts, not a package

import drift_shift  # noqa: E402

needs_cifar = pytest.mark.needs_data("cifar10", "mnist")  # a one-line skip without the data, a failure in CI with it
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None and not os.environ.get("CI"),
                                    reason="promtool not installed (Debian package prometheus; .ci/run installs it)")


def scrape(n: float, agree0: float, agree1: float) -> dict:
    """Counters after n shadowed samples at each of exits 0 and 1, expected agreement 0.9 at both."""
    out = {}
    for k, agree in (("0", agree0), ("1", agree1)):
        out[("exitserve_shadow_expected_agreement_count", k, "")] = n
        out[("exitserve_shadow_expected_agreement_sum", k, "")] = 0.9 * n
        out[("exitserve_shadow_total", k, "agree")] = agree
        out[("exitserve_shadow_total", k, "disagree")] = n - agree
    return out


def stream(fired_after: int | None) -> dict:
    # exit 0 agrees 80 % (gap 0.10), exit 1 89 % (gap 0.01): only exit 0 crosses, once n >= 200
    scrapes = [(0, {})] + [(n, scrape(n, 0.8 * n, 0.89 * n)) for n in (100, 150, 200, 250)]
    return {"stream": "toy", "delta": 0.9, "shadow_fired_after": fired_after, "_scrapes": scrapes}


def test_thresholds_come_from_rules_yml() -> None:
    margin, minimum = drift_shift.shadow_thresholds()
    assert 0 < margin < 0.5 and minimum >= 50
    gaps = drift_shift.shadow_gaps(scrape(200, 160, 178), ["0", "1"])
    assert gaps["0"] == pytest.approx((0.1, 200)) and gaps["1"] == pytest.approx((0.01, 200))


@needs_promtool
def test_promtool_agrees_with_the_python_counts() -> None:
    done = drift_shift.promtool_tests([stream(200)], ["0", "1"], scrape_every=50)
    assert done["ran"] and done["passed"], done["output"]


@needs_promtool
def test_promtool_refuses_counts_that_differ_from_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    # Python told the margin is 0.2 expects silence; the rule's own 0.05 fires on exit 0.
    monkeypatch.setattr(drift_shift, "shadow_thresholds", lambda: (0.2, 200.0))
    done = drift_shift.promtool_tests([stream(None)], ["0", "1"], scrape_every=50)
    assert done["ran"] and not done["passed"], done["output"]
    assert any("exit=\"0\"" in line or 'exit="0"' in line for line in done["output"]), done["output"]


@needs_cifar
def test_shifted_streams_fire_the_shadow_alert_within_2000_requests() -> None:
    """One image a request at the default δ 0.9, shadow fraction 1; the three streams that fire
    soonest and latest in BENCHMARKS.md ("Shifted streams") besides the clean control."""
    data = drift_shift.streams(2000, seed=0)
    exits = ["0", "1", "2"]
    with running_server([DEFAULT_BUNDLE], env={"EXITSERVE_SHADOW_FRACTION": "1.0"}) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        results = [{"stream": name, "delta": 0.9, **drift_shift.run_stream(client, data[name], 0.9, 2000, 10, exits)}
                   for name in ("clean", "pixelate-3", "gaussian-noise-3", "mnist")]
    clean, *shifted = results
    print("\n" + ", ".join(f"{r['stream']}: {r['shadow_fired_after']}" for r in results))
    assert clean["requests"] == 2000 and clean["shadow_fired_after"] is None
    for r in shifted:
        assert r["shadow_fired_after"] is not None and r["shadow_fired_after"] <= 2000, r
        assert "0" in r["shadow_fired_exits"]  # the first exit shows the shift; the last early exit barely moves
    if shutil.which("promtool"):
        done = drift_shift.promtool_tests(results, exits, scrape_every=10)
        assert done["passed"], done["output"]
