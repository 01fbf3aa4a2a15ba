"""Every decode path is total (issue 30): random bytes and random Unicode, lone surrogates included,
put into any field (or key) of valid v1, v2 (JSON and binary), feedback and OpenAI bodies, always
get an answer below 500 with an error message — never a 500 and never a logged traceback.

Hypothesis mutates valid bodies one to three times; the bodies are written as JSON with or without
`ensure_ascii` (a lone surrogate is then an escape, or invalid UTF-8 bytes), sometimes with random
bytes spliced in. `benchmarks/fuzz_bodies.py` sends the same bodies 100,000 times."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import running_server
from fuzz_support import ROUTES, body_for, fuzzed_bodies
from hypothesis import HealthCheck, given, settings
from llm_support import write_tiny_generation_bundle

FUZZ = settings(max_examples=int(os.environ.get("EXITSERVE_FUZZ_EXAMPLES", "120")), deadline=None,
                derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                         HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def server(digits_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    llm = write_tiny_generation_bundle(tmp_path_factory.mktemp("llm") / "tiny-llm")
    with running_server([digits_bundle, llm]) as proc:
        yield proc
        logs = proc.logs()
        assert "unhandled error" not in logs and "Traceback" not in logs


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:  # noqa: ANN001
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _check(client: httpx.Client, route: str, content: bytes, headers: dict[str, str]) -> None:
    response = client.post(ROUTES[route], content=content, headers=headers)
    assert response.status_code < 500, (route, content[:300], response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error, str | dict) and error


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_the_unmutated_bodies_are_answered(client: httpx.Client, route: str) -> None:
    content, headers = body_for(route)
    response = client.post(ROUTES[route], content=content, headers=headers)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("escaped", [True, False])
@pytest.mark.parametrize("value", ["\ud800", "a\udfffb", "\udbff\udbff"])
def test_a_lone_surrogate_in_a_v2_bytes_element_is_a_400(client: httpx.Client, value: str, escaped: bool) -> None:
    """As a JSON escape ("\\ud800") or as the bytes a lenient encoder writes for it (ED A0 80)."""
    import json

    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [value]}]}
    content = json.dumps(body, ensure_ascii=escaped).encode("utf-8", "surrogatepass")
    response = client.post(ROUTES["v2-json"], content=content)
    assert response.status_code == 400 and "UTF-8" in response.json()["error"], response.text


@FUZZ
@given(case=fuzzed_bodies("v1"))
def test_fuzz_v1(client: httpx.Client, case: tuple[str, bytes, dict[str, str]]) -> None:
    _check(client, *case)


@FUZZ
@given(case=fuzzed_bodies("v2-json"))
def test_fuzz_v2_json(client: httpx.Client, case: tuple[str, bytes, dict[str, str]]) -> None:
    _check(client, *case)


@FUZZ
@given(case=fuzzed_bodies("v2-binary"))
def test_fuzz_v2_binary(client: httpx.Client, case: tuple[str, bytes, dict[str, str]]) -> None:
    _check(client, *case)


@FUZZ
@given(case=fuzzed_bodies("feedback"))
def test_fuzz_feedback(client: httpx.Client, case: tuple[str, bytes, dict[str, str]]) -> None:
    _check(client, *case)


@FUZZ
@given(case=fuzzed_bodies("completions") | fuzzed_bodies("chat"))
def test_fuzz_openai(client: httpx.Client, case: tuple[str, bytes, dict[str, str]]) -> None:
    _check(client, *case)
