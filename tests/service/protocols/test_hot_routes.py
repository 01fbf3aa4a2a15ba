"""Issue 16: inference POSTs reach their endpoints past FastAPI's router; everything else goes through it."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, Request, Response

from exitserve.service.protocols.hot_routes import HotRoutes


async def _fallback(scope, receive, send) -> None:  # the rest of the app
    raise AssertionError("hot routes passed on a request they should have answered")


def _routes() -> list:
    router = APIRouter()

    @router.post("/v1/models/{model}/predict")
    async def predict(model: str, request: Request) -> Response:
        return Response(f"v1 {model}")

    @router.post("/v2/models/{model}/infer")
    @router.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(model: str, request: Request, version: str | None = None) -> Response:
        return Response(f"v2 {model} {version}")

    return router.routes


@pytest.mark.parametrize(("path", "endpoint", "params"), [
    ("/v1/models/digits/predict", "predict", {"model": "digits"}),
    ("/v2/models/digits/infer", "infer", {"model": "digits"}),
    ("/v2/models/digits/versions/3/infer", "infer", {"model": "digits", "version": "3"}),
])
def test_inference_paths_match_their_endpoint(path: str, endpoint: str, params: dict) -> None:
    hot = HotRoutes(_fallback, _routes())
    match = hot._match(path)
    assert match is not None and match[0].__name__ == endpoint and match[1] == params


@pytest.mark.parametrize("path", [
    "/v1/models/digits/feedback", "/v1/models//predict", "/v2/models/digits/ready", "/v2/models/digits/versions//infer",
    "/v1/models/digits/predict/extra", "/v3/models/digits/infer", "/v1/completions", "/admin/models/digits/reload",
])
def test_other_paths_go_through_the_app(path: str) -> None:
    assert HotRoutes(_fallback, _routes())._match(path) is None


def test_missing_endpoint_fails_at_build() -> None:
    with pytest.raises(LookupError, match="no POST route"):
        HotRoutes(_fallback, [])
