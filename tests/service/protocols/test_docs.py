"""/docs renders with no internet: the page and every asset it references come from the server itself."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import httpx

from exitserve.service.protocols.docs import ASSETS_URL


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


def test_docs_page_and_every_asset_come_from_the_server(server) -> None:
    page = httpx.get(f"{server.url}/docs", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert not re.search(r"https?://", page.text), "the page must not load anything from another host"
    parser = _References()
    parser.feed(page.text)
    assert {f"{ASSETS_URL}/swagger-ui-bundle.js", f"{ASSETS_URL}/swagger-ui.css"} <= set(parser.urls)
    spec_url = re.search(r"url: '([^']+)'", page.text).group(1)
    for url in [*parser.urls, spec_url]:
        assert url.startswith("/"), url
        asset = httpx.get(f"{server.url}{url}", timeout=10)
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url
    bundle_js = httpx.get(f"{server.url}{ASSETS_URL}/swagger-ui-bundle.js", timeout=10)
    assert "javascript" in bundle_js.headers["content-type"] and b"SwaggerUIBundle" in bundle_js.content
    assert httpx.get(f"{server.url}/openapi.json", timeout=10).json()["info"]["title"] == "exitserve"


def test_only_the_packaged_assets_are_served(server) -> None:
    for name in ("..%2F..%2Fpyproject.toml", "manifest.json", "..%2Fswagger-ui-bundle.js"):
        assert httpx.get(f"{server.url}{ASSETS_URL}/{name}", timeout=10).status_code == 404
    assert httpx.get(f"{server.url}/redoc", timeout=10).status_code == 404  # ReDoc would need a CDN
    assert httpx.get(f"{server.url}/docs/oauth2-redirect", timeout=10).status_code == 200
