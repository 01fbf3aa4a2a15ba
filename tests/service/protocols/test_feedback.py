"""POST /v1/models/{m}/feedback against a real server: scoring, what is refused and why, the metrics,
the feedback log, v2 decisions, hot reload and recalibration from the log (digits bundle)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import REPO, ServerProcess, running_server
from reliability_support import MODEL, metric, raw_tensor, v2_json_body

from exitserve.models.data import load_dataset

KEY = "feedback-s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN_KEY = "feedback-admin-s3cret"


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("feedback") / "feedback.jsonl"


@pytest.fixture(scope="module")
def monitored(digits_bundle: Path, log_path: Path):
    with running_server([digits_bundle], ["--api-key", KEY], env={
        "EXITSERVE_FEEDBACK_LOG": str(log_path), "EXITSERVE_SHADOW_FRACTION": "1.0", "EXITSERVE_ADMIN_API_KEY": ADMIN_KEY,
        "EXITSERVE_BUNDLE_ROOTS": str(log_path.parent.parent)}) as proc:
        yield proc


@pytest.fixture(scope="module")
def data():
    d = load_dataset("digits:test")
    return d.x, d.y


def predict(server: ServerProcess, x: np.ndarray, delta: float = 0.8, request_id: str | None = None) -> dict:
    headers = {**AUTH, **({"X-Request-Id": request_id} if request_id else {})}
    r = httpx.post(f"{server.url}/v1/models/{MODEL}/predict", json={"inputs": raw_tensor(x), "delta": delta},
                   headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def feedback(server: ServerProcess, items: object) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models/{MODEL}/feedback", content=json.dumps(items).encode(),
                      headers={**AUTH, "Content-Type": "application/json"}, timeout=30)


def scrape(server: ServerProcess) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=10).text


def test_scores_labels_by_name_or_index_and_counts_per_exit(monitored, data) -> None:
    x, y = data[0][:40], data[1][:40]
    before = scrape(monitored)
    answer = predict(monitored, x)
    rid, preds = answer["request_id"], answer["predictions"]
    labels = load_dataset("digits:test").labels
    items = [{"request_id": rid, "index": i, "label": labels[int(t)] if i % 2 else int(t)} for i, t in enumerate(y)]
    r = feedback(monitored, items)
    assert r.status_code == 200, r.text
    body = r.json()
    correct = [p["class_index"] == int(t) for p, t in zip(preds, y, strict=True)]
    assert body["scored"] == 40 and body["correct"] == sum(correct) and body["unknown"] == body["duplicate"] == 0
    assert [res["correct"] for res in body["results"]] == correct
    assert [res["exit"] for res in body["results"]] == [p["exit"] for p in preds]
    after = scrape(monitored)
    for k in range(3):
        mine = [c for c, p in zip(correct, preds, strict=True) if p["exit"] == k]
        for outcome, want in (("correct", sum(mine)), ("incorrect", len(mine) - sum(mine))):
            got = metric(after, "exitserve_feedback_total", model=MODEL, exit=str(k), outcome=outcome) \
                - metric(before, "exitserve_feedback_total", model=MODEL, exit=str(k), outcome=outcome)
            assert got == want, (k, outcome)
        promised = sum(p["estimated_accuracy"] for p in preds if p["exit"] == k)
        got = metric(after, "exitserve_feedback_estimate_sum", model=MODEL, exit=str(k)) \
            - metric(before, "exitserve_feedback_estimate_sum", model=MODEL, exit=str(k))
        assert got == pytest.approx(promised, abs=1e-4)


def test_unknown_and_duplicate_items_are_answered_and_counted_not_refused(monitored, data) -> None:
    rid = predict(monitored, data[0][:2])["request_id"]
    before = scrape(monitored)
    r = feedback(monitored, [{"request_id": rid, "index": 0, "label": 1}, {"request_id": rid, "index": 0, "label": 1},
                             {"request_id": "never-seen", "index": 0, "label": 1}])
    assert r.status_code == 200, r.text
    assert [res["status"] for res in r.json()["results"]] == ["scored", "duplicate", "unknown"]
    after = scrape(monitored)
    for reason in ("unknown", "duplicate"):
        assert metric(after, "exitserve_feedback_unmatched_total", model=MODEL, reason=reason) \
            - metric(before, "exitserve_feedback_unmatched_total", model=MODEL, reason=reason) == 1


@pytest.mark.parametrize(("items", "message"), [
    ({"request_id": "a"}, "body: must be a JSON array"),
    ([], "body: empty array"),
    ([{"request_id": "a", "index": 0}], "[0].label: Field required"),
    ([{"request_id": "a", "index": 0, "label": 1, "extra": 2}], "[0].extra: unknown field"),
    ([{"request_id": "", "index": 0, "label": 1}], "[0].request_id: String should have at least 1 character"),
    ([{"request_id": "a", "index": -1, "label": 1}], "[0].index: Input should be greater than or equal to 0"),
    ([{"request_id": "a", "index": True, "label": 1}], "[0].index: Input should be a valid integer"),
    ([{"request_id": "a", "index": 0, "label": "ten"}], "[0].label: 'ten' is not a class of model 'digits'"),
    ([{"request_id": "a", "index": 0, "label": 10}], "[0].label: class index 10 outside [0, 10)"),
    ([{"request_id": "a", "index": 0, "label": 1.5}], "[0].label: Input should be a valid"),
])
def test_bad_feedback_is_a_400_naming_the_item(monitored, items, message) -> None:
    r = feedback(monitored, items)
    assert r.status_code == 400 and message in r.json()["error"], r.text


def test_an_index_past_a_known_request_refuses_the_call_and_scores_nothing(monitored, data) -> None:
    rid = predict(monitored, data[0][:3])["request_id"]
    r = feedback(monitored, [{"request_id": rid, "index": 0, "label": 1}, {"request_id": rid, "index": 3, "label": 1}])
    assert r.status_code == 400 and "[1].index: 3 is out of range" in r.json()["error"]
    assert feedback(monitored, [{"request_id": rid, "index": 0, "label": 1}]).json()["scored"] == 1
    assert httpx.post(f"{monitored.url}/v1/models/nope/feedback", json=[], headers=AUTH).status_code == 404
    bad_json = httpx.post(f"{monitored.url}/v1/models/{MODEL}/feedback", content=b"[{",
                          headers={**AUTH, "Content-Type": "application/json"})
    assert bad_json.status_code == 400 and "invalid JSON" in bad_json.json()["error"]
    # A web page can post text/plain cross-origin without a CORS preflight: JSON routes refuse it.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
        plain = httpx.post(f"{monitored.url}/v1/models/{MODEL}/feedback", headers=headers,
                           content=json.dumps([{"request_id": rid, "index": 1, "label": 1}]).encode())
        assert plain.status_code == 415 and "application/json" in plain.json()["error"]
    assert feedback(monitored, [{"request_id": rid, "index": 1, "label": 1}]).json()["scored"] == 1


def test_v2_decisions_are_recorded_under_the_x_request_id(monitored, data) -> None:
    x, y = data[0][:5], data[1][:5]
    r = httpx.post(f"{monitored.url}/v2/models/{MODEL}/infer", json=v2_json_body(x, np.full(5, 0.8)),
                   headers={**AUTH, "X-Request-Id": "my-v2-call"}, timeout=30)
    assert r.status_code == 200 and r.headers["x-request-id"] == "my-v2-call"
    exits = next(o for o in r.json()["outputs"] if o["name"] == "exit")["data"]
    body = feedback(monitored, [{"request_id": "my-v2-call", "index": i, "label": int(t)} for i, t in enumerate(y)]).json()
    assert body["scored"] == 5 and [res["exit"] for res in body["results"]] == exits


def test_shadow_agreement_is_counted_for_early_exits(monitored, data) -> None:
    before = scrape(monitored)
    preds = predict(monitored, data[0][:60], delta=0.6)["predictions"]
    after = scrape(monitored)
    early = [p for p in preds if p["exit"] < 2]
    assert early
    shadowed = sum(metric(after, "exitserve_shadow_total", model=MODEL, exit=str(k), outcome=o)
                   - metric(before, "exitserve_shadow_total", model=MODEL, exit=str(k), outcome=o)
                   for k in (0, 1) for o in ("agree", "disagree"))
    assert shadowed == len(early)  # fraction 1.0: every early exit, and nothing else
    expected = sum(metric(after, "exitserve_shadow_expected_agreement_count", model=MODEL, exit=str(k))
                   - metric(before, "exitserve_shadow_expected_agreement_count", model=MODEL, exit=str(k)) for k in (0, 1))
    assert expected == len(early)
    for k in (0, 1):
        assert 0 < metric(after, "exitserve_calibration_agreement", model=MODEL, exit=str(k)) <= 1


def test_the_log_joins_decisions_with_labels_and_recalibration_reads_it(monitored, data, log_path: Path,
                                                                        digits_bundle: Path, tmp_path: Path) -> None:
    x, y = data[0][100:300], data[1][100:300]
    answer = predict(monitored, x, delta=0.9, request_id="for-the-log")
    assert feedback(monitored, [{"request_id": "for-the-log", "index": i, "label": int(t)}
                                for i, t in enumerate(y)]).json()["scored"] == 200
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    mine = [line for line in lines if line["request_id"] == "for-the-log"]
    assert len(mine) == 200 and all(line["model"] == MODEL and line["delta"] == 0.9 for line in mine)
    for line, p, t in zip(sorted(mine, key=lambda e: e["index"]), answer["predictions"], y, strict=True):
        assert line["exit"] == p["exit"] and line["prediction"] == p["class_index"] and line["label"] == int(t)
        # every exit it ran through; shadowed (fraction 1.0) early exits ran through all three
        assert len(line["exits"]) == (3 if p["exit"] < 2 else p["exit"] + 1)
        assert line["exits"][p["exit"]][2] == p["class_index"]
        assert (line["shadow"] is None) == (p["exit"] == 2)

    out = tmp_path / "digits-v2"
    done = subprocess.run([sys.executable, "-m", "exitserve.service.cli", "calibrate", str(digits_bundle), "--from-feedback",
                           str(log_path), "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"tables recounted from {len(lines)} labelled samples" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == "2" and manifest["created_by"]["extra"]["recalibrated"]["feedback_samples"] == len(lines)
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["validation_size"] == len(lines) and calibration["data_fingerprint"].startswith("feedback:")

    r = httpx.post(f"{monitored.url}/admin/models/{MODEL}/reload", json={"path": str(out)},
                   headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    assert r.status_code == 200 and r.json()["version"] == "2", r.text
    # decisions answered by the old model can still be labelled after the swap
    assert feedback(monitored, [{"request_id": "for-the-log", "index": 0, "label": 1}]).json()["results"][0]["status"] == "duplicate"
    rid = predict(monitored, data[0][:4])["request_id"]
    assert feedback(monitored, [{"request_id": rid, "index": 3, "label": 1}]).json()["scored"] == 1


def test_calibrate_from_feedback_refuses_a_log_without_usable_lines(digits_bundle: Path, tmp_path: Path) -> None:
    log = tmp_path / "other.jsonl"
    log.write_text(json.dumps({"v": 1, "model": "someone-else"}) + "\nnot json\n")
    done = subprocess.run([sys.executable, "-m", "exitserve.service.cli", "calibrate", str(digits_bundle), "--from-feedback",
                           str(log), "--out", str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert "no usable feedback for model 'digits'" in done.stderr and "1 other model, 1 not JSON" in done.stderr
    assert not (tmp_path / "x").exists()


def test_feedback_is_refused_when_switched_off(digits_bundle: Path) -> None:
    proc = ServerProcess([digits_bundle], env={"EXITSERVE_FEEDBACK_CAPACITY": "0"})
    try:
        proc.wait_ready()
        r = httpx.post(f"{proc.url}/v1/models/{MODEL}/feedback", json=[{"request_id": "a", "index": 0, "label": 1}])
        assert r.status_code == 409 and "EXITSERVE_FEEDBACK_CAPACITY=0" in r.json()["error"]
    finally:
        proc.stop()


def test_v2_decisions_are_recorded_under_the_oip_request_id_when_given(monitored, data) -> None:
    x, y = data[0][:3], data[1][:3]
    payload = {**v2_json_body(x, np.full(3, 0.8)), "id": "oip-call-7"}
    r = httpx.post(f"{monitored.url}/v2/models/{MODEL}/infer", json=payload, headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["id"] == "oip-call-7"
    body = feedback(monitored, [{"request_id": "oip-call-7", "index": i, "label": int(t)} for i, t in enumerate(y)]).json()
    assert body["scored"] == 3


def test_labels_are_never_lost_when_the_log_cannot_be_written(digits_bundle: Path, tmp_path: Path, data) -> None:
    """Disk full (the log is a link to /dev/full): feedback is a 503 + Retry-After and nothing is scored;
    the same items sent again once the log is writable are scored (not "duplicate"); a rotated log is
    reopened at its path, on the next write and on SIGHUP."""
    import os
    import signal
    import time

    log = tmp_path / "feedback.jsonl"
    log.symlink_to("/dev/full")
    x, y = data[0][:3], data[1][:3]
    with running_server([digits_bundle], env={"EXITSERVE_FEEDBACK_LOG": str(log)}) as proc:
        rid = predict(proc, x)["request_id"]
        items = [{"request_id": rid, "index": i, "label": int(t)} for i, t in enumerate(y)]
        for _ in range(2):  # a retry while the disk is still full is refused the same way, not "duplicate"
            r = feedback(proc, items)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] and "send the feedback again" in r.json()["error"]
        text = scrape(proc)
        assert metric(text, "exitserve_feedback_total", model=MODEL) == 0
        assert metric(text, "exitserve_requests_total", model=MODEL, protocol="feedback", status="503") == 2
        log.unlink()  # space freed: the log is a plain file again
        r = feedback(proc, items)
        assert r.status_code == 200 and r.json()["scored"] == 3, r.text
        assert [json.loads(line)["index"] for line in log.read_text().splitlines()] == [0, 1, 2]
        assert feedback(proc, items).json()["duplicate"] == 3  # now scored, a retry is a duplicate

        # logrotate moves the file away: the next write goes to a new file at the path
        log.rename(tmp_path / "feedback.jsonl.1")
        rid = predict(proc, x[:1])["request_id"]
        assert feedback(proc, [{"request_id": rid, "index": 0, "label": int(y[0])}]).json()["scored"] == 1
        assert len(log.read_text().splitlines()) == 1
        assert len((tmp_path / "feedback.jsonl.1").read_text().splitlines()) == 3
        # ... and SIGHUP (logrotate's postrotate) reopens it too
        log.rename(tmp_path / "feedback.jsonl.2")
        os.kill(proc.process.pid, signal.SIGHUP)
        time.sleep(0.5)
        rid = predict(proc, x[:1])["request_id"]
        assert feedback(proc, [{"request_id": rid, "index": 0, "label": int(y[0])}]).json()["scored"] == 1
        assert len(log.read_text().splitlines()) == 1
        assert "unhandled error" not in proc.logs()


def test_a_utf8_request_id_is_kept_exactly_and_feedback_finds_it(monitored, data) -> None:
    request_id = "zamówienie-№42-✓"
    r = httpx.post(f"{monitored.url}/v1/models/{MODEL}/predict", json={"inputs": raw_tensor(data[0][:2])},
                   headers={**AUTH, "X-Request-Id": request_id.encode()}, timeout=30)
    assert r.status_code == 200 and r.json()["request_id"] == request_id
    assert dict(r.headers.raw)[b"x-request-id"] == request_id.encode()  # not re-decoded as Latin-1
    body = feedback(monitored, [{"request_id": request_id, "index": 1, "label": int(data[1][1])}]).json()
    assert body["scored"] == 1
    too_long = httpx.post(f"{monitored.url}/v1/models/{MODEL}/predict", json={"inputs": raw_tensor(data[0][:1])},
                          headers={**AUTH, "X-Request-Id": "z" * 200}, timeout=30)
    assert too_long.status_code == 400 and "exceed the limit of 128" in too_long.json()["error"]
    not_utf8 = httpx.post(f"{monitored.url}/v1/models/{MODEL}/predict", json={"inputs": raw_tensor(data[0][:1])},
                          headers={**AUTH, "X-Request-Id": b"caf\xe9"}, timeout=30)  # Latin-1, not UTF-8
    assert not_utf8.status_code == 400 and "UTF-8" in not_utf8.json()["error"]


def test_feedback_bodies_are_limited_by_the_item_limit(monitored) -> None:  # noqa: ANN001
    """The body limit comes from the item limit (a few MiB, not EXITSERVE_MAX_BODY_BYTES), and bodies of
    more than MAX_ITEMS objects or of a long array of anything are refused before they are parsed."""
    from exitserve.service.protocols.feedback import MAX_ITEMS

    url = f"{monitored.url}/v1/models/{MODEL}/feedback"
    headers = {**AUTH, "Content-Type": "application/json"}
    big = httpx.post(url, content=b"[" + b"1," * (8 << 20) + b"1]", headers=headers, timeout=30)
    assert big.status_code == 413 and "exceeds the limit" in big.json()["error"]
    for body in (b"[" + b"{}," * MAX_ITEMS + b"{}]", b"[" + b"1," * (5 * MAX_ITEMS) + b"1]"):
        refused = httpx.post(url, content=body, headers=headers, timeout=30)
        assert refused.status_code == 413 and f"limit of {MAX_ITEMS} items" in refused.json()["error"]
