"""The Grafana dashboard and its provisioning: valid JSON, one provisioned datasource uid everywhere,
the panels the issue lists, and queries that honour the model variable."""

from __future__ import annotations

import re

import pytest
from deploy_helpers import (
    DASHBOARD,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    METRIC_NAME,
    dashboard,
    dashboard_exprs,
    dashboard_panels,
    load_yaml,
    template_queries,
)


@pytest.fixture(scope="module")
def board() -> dict:
    return dashboard()


@pytest.fixture(scope="module")
def provisioned_uids() -> set[str]:
    return {ds["uid"] for ds in load_yaml(DATASOURCES)["datasources"]}


def test_datasource_provisioning_has_a_fixed_uid() -> None:
    [source] = load_yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus"
    assert source["uid"] and source["url"] == "http://prometheus:9090"


def test_no_import_placeholders(board: dict) -> None:
    # File provisioning does not resolve ${DS_...}: such a dashboard shows "datasource not found".
    text = DASHBOARD.read_text()
    assert "${DS_" not in text and "__inputs" not in board


def test_every_panel_and_query_uses_a_provisioned_datasource(board: dict, provisioned_uids: set[str]) -> None:
    for panel in dashboard_panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] in provisioned_uids, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in provisioned_uids, panel["title"]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"]["uid"] in provisioned_uids, var["name"]


def test_panel_ids_ref_ids_and_layout(board: dict) -> None:
    panels = dashboard_panels(board)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine


def test_model_variable_and_every_query_filters_on_it(board: dict) -> None:
    [var] = [v for v in board["templating"]["list"] if v["name"] == "model"]
    assert var["type"] == "query" and var["multi"] and var["includeAll"]
    assert re.fullmatch(r"label_values\(exitserve_[a-z_]+, model\)", template_queries(board)["model"])
    for where, expr in dashboard_exprs(board).items():
        # every exitserve selector carries the variable, or the panel ignores the model picker
        for match in re.finditer(METRIC_NAME.pattern + r"(\{[^}]*\})?", expr):
            assert match.group(1) and 'model=~"$model"' in match.group(1), f"{where}: {match.group(0)}"


# The panel list, each as a pattern over panel titles and the metrics its queries read.
REQUIRED_PANELS = {
    "request rate and errors by status": r"by \([^)]*status[^)]*\) \(rate\(exitserve_requests_total",
    "latency p50/p95/p99": r"histogram_quantile\(0\.5,.*request_duration.*\n.*0\.95.*\n.*0\.99",
    "queue time": r"exitserve_queue_duration_seconds",
    "batch size": r"exitserve_batch_size",
    "exit share per exit over time": r"by \(exit\) \(rate\(exitserve_exits_total.*group_left",
    "mean compute fraction": r"exitserve_compute_fraction_sum.*/.*exitserve_compute_fraction_count",
    "requested delta vs estimated accuracy": r"exitserve_requested_delta(.|\n)*exitserve_estimated_accuracy",
    "target-missed rate": r"exitserve_target_missed_total",
    "per-segment time": r"by \(segment[^)]*\) \(rate\(exitserve_segment_duration_seconds",
    # issue 16: how full segment batches run (continuous batching refills them)
    "segment batch occupancy": r"exitserve_segment_occupancy_sum.*/.*exitserve_segment_occupancy_count",
    "model readiness": r"exitserve_model_ready",
    # issue 8: promise vs reality side by side, and the label-free check against its calibration reference
    "labelled accuracy vs promised": r"exitserve_feedback_total\{[^}]*correct(.|\n)*exitserve_feedback_estimate_sum",
    "shadow agreement vs calibration": r"by \(exit\) \(increase\(exitserve_shadow_total(.|\n)*exitserve_shadow_expected_agreement_sum",
    # issue 18: token generation
    "generated tokens per second": r"rate\(exitserve_generated_tokens_total",
    "time to first token p50/p99": r"histogram_quantile\(0\.5,.*time_to_first_token.*\n.*0\.99.*time_to_first_token",
    "inter-token latency p50/p99": r"histogram_quantile\(0\.5,.*inter_token_latency.*\n.*0\.99.*inter_token_latency",
    "token exits and compute fraction": r"by \(exit\) \(rate\(exitserve_token_exits_total(.|\n)*"
                                        r"exitserve_token_compute_fraction_sum.*/.*exitserve_token_compute_fraction_count",
    "draft acceptance": r"exitserve_draft_tokens_total\{[^}]*outcome=\"accepted\"[^}]*\}.*/.*exitserve_draft_tokens_total",
    "running and waiting sequences": r"exitserve_running_sequences(.|\n)*exitserve_waiting_sequences",
}


@pytest.mark.parametrize("what", REQUIRED_PANELS)
def test_required_panel_present(board: dict, what: str) -> None:
    pattern = re.compile(REQUIRED_PANELS[what])
    panels = [p for p in dashboard_panels(board) if p.get("targets")]
    assert any(pattern.search("\n".join(t["expr"] for t in p["targets"])) for p in panels), what


def test_dashboard_provider_loads_this_folder() -> None:
    [provider] = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    # the compose test checks that this container path is where deploy/grafana/dashboards is mounted
    assert provider["options"]["path"].startswith("/")
