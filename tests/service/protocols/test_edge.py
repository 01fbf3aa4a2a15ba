"""The edge middleware in process: every response of a model route counted and logged (a 500 from a
bug too), request ids kept exactly or refused, allowed hosts."""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI, Request, Response
from starlette.testclient import TestClient

from exitserve.service.monitoring.metrics import Metrics
from exitserve.service.protocols.edge import EdgeMiddleware
from exitserve.service.protocols.errors import install_error_handlers
from exitserve.service.serving.repository import ModelRepository
from exitserve.service.settings import Settings


def _app(settings: Settings) -> tuple[FastAPI, Metrics]:
    metrics = Metrics()
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/models/{model}/predict")
    async def predict(model: str, request: Request) -> Response:
        if model == "bug":
            raise RuntimeError("a bug")
        return Response(request.state.request_id, media_type="text/plain")

    app.add_middleware(EdgeMiddleware, settings=settings, metrics=metrics, repository=ModelRepository(settings, metrics))
    return app, metrics


def _count(metrics: Metrics, status: str) -> float:
    return metrics.registry.get_sample_value(
        "exitserve_requests_total", {"model": "unknown", "protocol": "v1", "status": status}) or 0.0


def test_a_500_is_counted_and_logged_as_a_request(caplog: pytest.LogCaptureFixture) -> None:
    app, metrics = _app(Settings())
    with caplog.at_level(logging.INFO, logger="exitserve.http"), TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/v1/models/bug/predict", json={})
    assert r.status_code == 500 and r.json() == {"error": "internal server error"}
    assert _count(metrics, "500") == 1
    assert [rec.levelname for rec in caplog.records if rec.getMessage() == "request"] == ["ERROR"]


def test_request_ids_are_kept_exactly_or_refused() -> None:
    app, metrics = _app(Settings())
    with TestClient(app) as client:
        # (UTF-8 ids echoed byte for byte: test_feedback.py, through a real server and HTTP client.)
        for bad, why in ((b"x" * 129, "129 characters exceed the limit of 128"), (b"a\tb", "control characters")):
            r = client.post("/v1/models/m/predict", json={}, headers={"X-Request-Id": bad})
            assert r.status_code == 400 and why in r.json()["error"]
        r = client.post("/v1/models/m/predict", json={}, headers={"X-Request-Id": b"y" * 128})
        assert r.status_code == 200 and r.text == "y" * 128  # at the limit: kept whole
    assert _count(metrics, "400") == 2


def test_allowed_hosts() -> None:
    app, _ = _app(Settings(allowed_hosts="api.example.com,localhost"))  # type: ignore[arg-type]
    with TestClient(app, base_url="http://api.example.com:8000") as client:
        assert client.post("/v1/models/m/predict", json={}).status_code == 200
        r = client.post("/v1/models/m/predict", json={}, headers={"Host": "evil.example"})
        assert r.status_code == 400 and "Host" in r.json()["error"]


def test_a_client_that_hangs_up_while_queued_is_dropped_not_computed(digits_bundle) -> None:
    """The client-gone watch starts WATCH_AFTER_S after the body (issue 16: a lone request answered
    sooner never pays for it) and still catches a client that leaves while its request waits: the
    answer is a 499 long before the batch would close, and the engine never computes the request."""
    import asyncio
    import time

    import numpy as np
    import orjson

    from exitserve.service.app import create_app
    from exitserve.service.protocols.edge import WATCH_AFTER_S

    app = create_app(Settings(bundles=[digits_bundle], max_queue_delay_ms=400, threads=1))
    name = "digits"
    body = orjson.dumps({"inputs": np.zeros((1, 1, 8, 8)).tolist()})
    sent: list[dict] = []

    async def run() -> float:
        async with app.router.lifespan_context(app):
            while not app.state.repository.models[name].ready:
                await asyncio.sleep(0.05)
            messages = [{"type": "http.disconnect"}, {"type": "http.request", "body": body, "more_body": False}]

            async def receive() -> dict:
                return messages.pop()  # the body, then at once the client is gone

            async def send(message: dict) -> None:
                sent.append(message)

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "path": f"/v1/models/{name}/predict", "raw_path": b"", "query_string": b"", "root_path": "",
                     "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                     "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "scheme": "http"}
            started = time.perf_counter()
            await app(scope, receive, send)
            seconds = time.perf_counter() - started
            await asyncio.sleep(0.6)  # past the batch deadline: had it been computed, its exit would be counted
            return seconds

    seconds = asyncio.run(run())
    assert sent[0]["status"] == 499
    assert WATCH_AFTER_S <= seconds < 0.3
    registry = app.state.metrics.registry
    assert not any(s.value for m in registry.collect() if m.name == "exitserve_exits" for s in m.samples
                   if s.name == "exitserve_exits_total")


def test_refusals_are_info_lines_with_a_rate_limited_warning(caplog: pytest.LogCaptureFixture) -> None:
    """503s under overload are expected: each request line at info, and one warning per interval that
    counts them (the tail of a burst too, from a timer), never an error line."""
    import asyncio

    from exitserve.service.protocols.edge import RefusalSummary

    async def burst() -> None:
        summary = RefusalSummary(interval_s=0.05)
        for _ in range(300):
            summary.count(503)
        summary.count(504)
        await asyncio.sleep(0.2)

    with caplog.at_level(logging.INFO, logger="exitserve.http"):
        asyncio.run(burst())
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert [w.refused for w in warnings] == [{"503": 1}, {"503": 299, "504": 1}]  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
