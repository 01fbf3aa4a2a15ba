"""Serving a text bundle: tokenised by the server, padded per batch, compacted with its own mask.

A real `exitserve serve` process on the real (2-layer) MiniLM bundle from `text_bundle`, real
SST-2 sentences (the committed fixture), and the real `tritonclient` for the Open Inference Protocol BYTES input.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from exitserve.models.data import load_dataset
from tests.conftest import FIXTURE_DATA, ServerProcess, running_server

MODEL = "sst2-tiny"
V1 = f"/v1/models/{MODEL}/predict"
DELTA = 0.9


@pytest.fixture(scope="module")
def text_server(text_bundle: Path) -> Iterator[ServerProcess]:
    # A queue delay long enough that concurrent requests share a batch (and its padding).
    with running_server([text_bundle], ["--max-batch-size", "64", "--max-queue-delay-ms", "30"]) as proc:
        yield proc


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    """24 SST-2 test sentences from the shortest to the longest: very different token counts."""
    texts = [str(t) for t in load_dataset("sst2:test", root=FIXTURE_DATA).x]
    order = np.argsort([len(t) for t in texts])
    return [texts[i] for i in order[:: len(order) // 24][:24]]


def predict(url: str, texts: list[str], delta: float = DELTA) -> list[dict]:
    response = httpx.post(url + V1, json={"texts": texts, "delta": delta}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def batch_size_totals(url: str) -> tuple[float, float]:
    """(samples, batches) run so far, from the batch-size histogram's sum and count."""
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(("exitserve_batch_size_sum", "exitserve_batch_size_count")):
            values[line.split("{")[0]] = float(line.split()[-1])
    return values["exitserve_batch_size_sum"], values["exitserve_batch_size_count"]


def assert_same_answers(got: list[dict], want: list[dict]) -> None:
    assert [(p["class_index"], p["exit"], p["target_met"]) for p in got] == [(p["class_index"], p["exit"], p["target_met"]) for p in want]
    np.testing.assert_allclose([p["estimated_accuracy"] for p in got], [p["estimated_accuracy"] for p in want], atol=1e-6)


def test_alone_mixed_and_batched_across_requests_give_the_same_answers(text_server: ServerProcess, sentences: list[str]) -> None:
    # A target at which some samples leave at the first exit and the rest go on, so that the batch
    # is compacted mid-way (which δ does that depends on the small model's calibration).
    for delta in (0.9, 0.85, 0.8, 0.75, 0.7, 0.65):
        alone = [predict(text_server.url, [text], delta)[0] for text in sentences]
        if {p["exit"] for p in alone} == {0, 1}:
            break
    assert {p["exit"] for p in alone} == {0, 1}
    assert_same_answers(predict(text_server.url, sentences, delta), alone)
    assert_same_answers(predict(text_server.url, sentences[::-1], delta), alone[::-1])

    async def concurrently() -> list[dict]:
        async with httpx.AsyncClient(base_url=text_server.url, timeout=30) as client:
            responses = await asyncio.gather(*[client.post(V1, json={"texts": [t], "delta": delta}) for t in sentences])
        return [r.json()["predictions"][0] for r in responses]

    before = batch_size_totals(text_server.url)
    assert_same_answers(asyncio.run(concurrently()), alone)
    after = batch_size_totals(text_server.url)
    samples, batches = after[0] - before[0], after[1] - before[1]
    assert samples == len(sentences)
    assert batches < samples, "every one-text request ran alone: nothing was padded across requests"


def test_shortest_and_longest_inputs(text_server: ServerProcess) -> None:
    one_token = httpx.post(text_server.url + V1, json={"inputs": [[101]]})
    assert one_token.status_code == 200, one_token.text
    empty_text = predict(text_server.url, [""])  # [CLS] [SEP]
    assert empty_text[0]["label"] in ("negative", "positive")
    longest = "word " * 254  # 254 word pieces + [CLS] + [SEP] = the 256-token limit
    assert predict(text_server.url, [longest, "short"])[0]["label"] in ("negative", "positive")


@pytest.mark.parametrize(("body", "message"), [
    ({"texts": ["word " * 255]}, "257 tokens exceed the model's limit of 256"),
    ({"inputs": [[101] * 257]}, "sequence length 257 exceeds the model's limit of 256"),
    ({"inputs": [[101, 30522]]}, "token ids must be in [0, 30522)"),
    ({"inputs": [[101, -1]]}, "token ids must be in [0, 30522)"),
    ({"inputs": [[0, 0]]}, "at least one non-padding token"),
    ({"inputs": [[101.5]]}, "takes integers (token ids)"),
    ({"texts": "one string"}, "texts: Input should be a valid list"),
    ({"texts": []}, "non-empty list of strings"),
    ({"texts": ["fine", 3]}, "texts[1]: Input should be a valid string"),
    ({"texts": ["a"], "inputs": [[101]]}, "either 'inputs' or 'texts'"),
])
def test_bad_text_input_is_a_clear_400(text_server: ServerProcess, body: dict, message: str) -> None:
    response = httpx.post(text_server.url + V1, json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_texts_to_an_image_model_are_refused(server: ServerProcess) -> None:
    response = httpx.post(server.url + "/v1/models/digits/predict", json={"texts": ["hello"]})
    assert response.status_code == 400
    assert "takes tensors, not texts" in response.json()["error"]


def test_open_inference_protocol_bytes_input_with_tritonclient(text_server: ServerProcess, sentences: list[str]) -> None:
    client = triton.InferenceServerClient(text_server.url.removeprefix("http://"))
    metadata = client.get_model_metadata(MODEL)
    assert metadata["inputs"][0] == {"name": "text", "datatype": "BYTES", "shape": [-1]}
    text = triton.InferInput("text", [len(sentences)], "BYTES")
    text.set_data_from_numpy(np.array([s.encode() for s in sentences], dtype=object), binary_data=True)
    result = client.infer(MODEL, [text], parameters={"delta": DELTA},
                          outputs=[triton.InferRequestedOutput(n) for n in ("class_index", "exit", "estimated_accuracy")])
    v1 = predict(text_server.url, sentences)
    assert result.as_numpy("class_index").tolist() == [p["class_index"] for p in v1]
    assert result.as_numpy("exit").tolist() == [p["exit"] for p in v1]
    np.testing.assert_allclose(result.as_numpy("estimated_accuracy"), [p["estimated_accuracy"] for p in v1], atol=1e-6)


def test_open_inference_protocol_refuses_bad_text(text_server: ServerProcess) -> None:
    url = f"{text_server.url}/v2/models/{MODEL}/infer"
    both = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]},
                       {"name": "input_ids", "shape": [1, 1], "datatype": "INT64", "data": [101]}]}
    assert "exactly one of" in httpx.post(url, json=both).json()["error"]
    too_long = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["word " * 300]}]}
    response = httpx.post(url, json=too_long)
    assert response.status_code == 400 and "exceed the model's limit" in response.json()["error"]
    ids = {"inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [101, 2307, 102]}]}
    assert httpx.post(url, json=ids).status_code == 200
    column = {"inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": ["good", "bad"]}]}
    assert httpx.post(url, json=column).status_code == 200  # [batch, 1], Triton's usual text shape
    square = {"inputs": [{"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": ["good", "bad"]}]}
    response = httpx.post(url, json=square)
    assert response.status_code == 400 and "shape [batch] or [batch, 1]" in response.json()["error"]
    not_utf8 = b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]}'
    response = httpx.post(url, content=not_utf8 + b"\x02\x00\x00\x00\xff\xfe",
                          headers={"Inference-Header-Content-Length": str(len(not_utf8))})
    assert response.status_code == 400 and "not valid UTF-8" in response.json()["error"]


def test_length_sorted_pieces_give_the_same_answers_as_one_padded_batch(text_bundle: Path, sentences: list[str]) -> None:
    from exitserve.calibration import Calibration
    from exitserve.models.bundle import load_bundle
    from exitserve.service.runners.onnx_runtime import OnnxRunner
    from exitserve.service.serving.engine import ExitEngine
    from exitserve.service.serving.text_input import TextTokenizer

    bundle = load_bundle(text_bundle, require_calibration=True)
    runner = OnnxRunner(bundle)
    calibration = Calibration.from_dict(bundle.calibration, num_exits=bundle.manifest.num_exits)
    ids = TextTokenizer(bundle).encode(sentences)
    deltas, policies = np.full(len(ids), DELTA), np.full(len(ids), "pcee-lb-cond", dtype=object)
    reported: list[int] = []
    whole = ExitEngine(runner, calibration, token_budget=10**9).run(ids, deltas, policies)
    small_budget = ExitEngine(runner, calibration, token_budget=64)
    assert len(small_budget._chunks(ids)) > 3
    pieces = small_budget.run(ids, deltas, policies, on_exit=lambda rows, _: reported.extend(rows.tolist()))
    assert sorted(reported) == list(range(len(ids)))  # every sample answered once
    np.testing.assert_array_equal(pieces.class_index, whole.class_index)
    np.testing.assert_array_equal(pieces.exit_index, whole.exit_index)
    np.testing.assert_allclose(pieces.estimate, whole.estimate, atol=1e-6)


def test_empty_token_sequences_are_a_400_not_a_failed_batch(text_server: ServerProcess) -> None:
    """Token ids of length 0 passed every range check and failed in the engine (a 500)."""
    for inputs in ({"b64": "", "dtype": "int64", "shape": [2, 0]}, [[], []]):
        response = httpx.post(text_server.url + V1, json={"inputs": inputs}, timeout=30)
        assert response.status_code == 400 and "length >= 1" in response.json()["error"], response.text
    assert predict(text_server.url, ["still fine"])[0]["label"]
