"""The one route table (protocols/routes.py): what the routers register, the edge and the hot routes match."""

from __future__ import annotations

import pytest

from exitserve.service.app import create_app
from exitserve.service.protocols import routes
from exitserve.service.protocols.edge import _route
from exitserve.service.settings import DEFAULT_BUNDLE, Settings


def test_every_model_route_the_app_registers_is_in_the_table_and_the_other_way_round() -> None:
    app = create_app(Settings(bundles=[DEFAULT_BUNDLE]))
    posted = {path for path, operations in app.openapi()["paths"].items() if "post" in operations}
    table = {r.path for r in routes.ROUTES}
    assert table <= posted  # every route of the table has a handler
    with_model = {p for p in posted if "{model}" in p}
    assert with_model <= table, with_model - table  # a model POST unknown to the edge would lose admission


@pytest.mark.parametrize("path, protocol, params, hot", [
    ("/v1/models/cifar/predict", "v1", {"model": "cifar"}, True),
    ("/v2/models/cifar/infer", "v2", {"model": "cifar"}, True),
    ("/v2/models/cifar/versions/3/infer", "v2", {"model": "cifar", "version": "3"}, True),
    ("/v1/models/cifar/feedback", "feedback", {"model": "cifar"}, False),
    ("/admin/models/cifar/reload", "admin", {"model": "cifar"}, False),
    ("/v1/completions", "openai", {}, False),
    ("/v1/chat/completions/", "openai", {}, False),  # clients add the slash; the model is in the body
])
def test_paths_match_their_route(path: str, protocol: str, params: dict, hot: bool) -> None:
    found = routes.match(path)
    assert found is not None and (found.route.protocol, found.params, found.route.hot) == (protocol, params, hot)
    assert _route(path) == (protocol, params.get("model", ""))


@pytest.mark.parametrize("path", [
    "/v1/models//predict", "/v1/models/cifar/predict/extra", "/v2/models/cifar/versions//infer", "/v1/models",
    "/v1/models/cifar", "/healthz", "/v3/models/cifar/infer", "/v2/models/cifar/ready",
])
def test_other_paths_are_no_model_route(path: str) -> None:
    assert routes.match(path) is None and _route(path) is None
