"""Issue 16: inference POSTs reach their handlers past FastAPI's router; everything else goes through it."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from exitserve.service.protocols.hot_routes import HotRoutes, read_body


async def _fallback(scope, receive, send) -> None:  # the rest of the app
    raise AssertionError("hot routes passed on a request they should have answered")


async def predict(request: Request, body: bytes, model: str) -> Response:
    return Response(f"v1 {model} {body.decode()}")


async def infer(request: Request, body: bytes, model: str, version: str | None = None) -> Response:
    return Response(f"v2 {model} {version} {body.decode()}")


def _hot() -> HotRoutes:
    return HotRoutes(_fallback, v1_predict=predict, v2_infer=infer)


@pytest.mark.parametrize(("path", "endpoint", "params"), [
    ("/v1/models/digits/predict", "predict", {"model": "digits"}),
    ("/v2/models/digits/infer", "infer", {"model": "digits"}),
    ("/v2/models/digits/versions/3/infer", "infer", {"model": "digits", "version": "3"}),
])
def test_inference_paths_match_their_endpoint(path: str, endpoint: str, params: dict) -> None:
    match = _hot()._match(path)
    assert match is not None and match[0].__name__ == endpoint and match[1] == params


@pytest.mark.parametrize("path", [
    "/v1/models/digits/feedback", "/v1/models//predict", "/v2/models/digits/ready", "/v2/models/digits/versions//infer",
    "/v1/models/digits/predict/extra", "/v3/models/digits/infer", "/v1/completions", "/admin/models/digits/reload",
])
def test_other_paths_go_through_the_app(path: str) -> None:
    assert _hot()._match(path) is None


def _receiver(messages: list[dict]):
    async def receive() -> dict:
        return messages.pop(0)
    return receive


def test_a_body_in_several_messages_reaches_the_handler_whole() -> None:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    receive = _receiver([{"type": "http.request", "body": b"ab", "more_body": True},
                         {"type": "http.request", "body": b"c", "more_body": False}])
    scope = {"type": "http", "method": "POST", "path": "/v2/models/digits/versions/7/infer", "headers": [],
             "query_string": b""}
    asyncio.run(_hot()(scope, receive, send))
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"v2 digits 7 abc"


def test_a_client_gone_before_the_body_is_a_disconnect() -> None:
    receive = _receiver([{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.disconnect"}])
    with pytest.raises(ClientDisconnect):
        asyncio.run(read_body(receive))
