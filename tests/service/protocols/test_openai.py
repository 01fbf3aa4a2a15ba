"""The OpenAI-compatible endpoints, driven by the real `openai` client against a real `exitserve serve`
of a tiny generation bundle (random Llama-shaped decoder, character tokenizer, heads and tables)."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest
from llm_support import FUSABLE, write_tiny_generation_bundle

from tests.conftest import running_server

PROMPTS = ["hello", "The quick brown fox", "0123", "abc abc abc", "Zebra!", "~", "a b c d e f", "What is it?"]


@pytest.fixture(scope="module")
def llm_bundle(tmp_path_factory):
    return write_tiny_generation_bundle(tmp_path_factory.mktemp("llm") / "tiny-llm")


@pytest.fixture(scope="module")
def llm_server(llm_bundle):
    with running_server([llm_bundle]) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(llm_server):
    return openai.OpenAI(base_url=f"{llm_server.url}/v1", api_key="unused", max_retries=0)


def complete(client, prompt: str, **kwargs):
    return client.completions.create(model="tiny-llm", prompt=prompt, **kwargs)


def test_completion_greedy_with_exit_extension(client):
    r = complete(client, "hello", max_tokens=20, temperature=0, extra_body={"delta": 0.5, "policy": "confidence"})
    ext = r.model_extra["exitserve"]
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == len(ext["exits"]) > 0
    assert len(r.choices[0].text) == len(ext["exits"])  # one character per token
    assert all(0 <= e < 3 for e in ext["exits"]) and ext["num_layers"] == 6
    assert set(ext["exit_layers"]) <= {2, 4, 6}
    assert 0.0 < ext["mean_compute_fraction"] <= 1.0 and ext["mode"] == "early"
    # the confidence baseline exits without a guarded promise; the full model's own tokens are promised
    assert len(ext["target_met"]) == len(ext["exits"]) and ext["weights"] == "float32"
    assert all(met for met, e in zip(ext["target_met"], ext["exits"], strict=True) if e == 2)


def test_exact_mode_equals_full_depth_through_the_api(client):
    drafted = 0
    for prompt in PROMPTS:
        full = complete(client, prompt, max_tokens=24, temperature=0, extra_body={"policy": "full"})
        exact = complete(client, prompt, max_tokens=24, temperature=0, extra_body={"delta": 1})
        assert exact.choices[0].text == full.choices[0].text
        assert exact.model_extra["exitserve"]["mode"] == "exact"
        # a low draft threshold drafts (and rejects) often: still the full model's text
        eager = complete(client, prompt, max_tokens=24, temperature=0, extra_body={"policy": "exact", "delta": 0.2})
        assert eager.choices[0].text == full.choices[0].text
        ext = eager.model_extra["exitserve"]
        drafted += ext["drafted"]
        # drafts count only as far as the answer goes: no accepted draft past its end or its token limit
        assert ext["accepted"] <= min(ext["drafted"], eager.usage.completion_tokens)
        short = complete(client, prompt, max_tokens=3, temperature=0, extra_body={"policy": "exact", "delta": 0.2})
        assert short.model_extra["exitserve"]["accepted"] <= short.usage.completion_tokens <= 3
        assert all(e == 2 for e in full.model_extra["exitserve"]["exits"])
    assert drafted > 0


def test_streaming_gives_the_same_text(client):
    kwargs = dict(max_tokens=30, temperature=0, extra_body={"delta": 0.5, "policy": "confidence"})
    whole = complete(client, "The quick brown fox", **kwargs).choices[0].text
    chunks = list(complete(client, "The quick brown fox", stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and "exitserve" in finals[0].model_extra
    assert chunks[-1].usage.completion_tokens == 30


def test_chat_completion_and_stream(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="tiny-llm", messages=messages, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model="tiny-llm", messages=messages, max_tokens=12, temperature=0,
                                              stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == r.choices[0].message.content
    # "<system>be brief<|end|><user>hi<|end|><assistant>": the template rendered, special token included
    assert r.usage.prompt_tokens == len("<system>be brief") + 1 + len("<user>hi") + 1 + len("<assistant>")


def test_stop_string_cuts_the_text(client):
    base = complete(client, "abc abc abc", max_tokens=30, temperature=0, extra_body={"policy": "full"}).choices[0].text
    stop = base[5:7]
    cut = complete(client, "abc abc abc", max_tokens=30, temperature=0, stop=[stop], extra_body={"policy": "full"})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == base[: base.find(stop)]


def test_seeded_sampling_is_reproducible(client):
    runs = [complete(client, "hello", max_tokens=16, temperature=1.0, seed=s, extra_body={"policy": "full"}).choices[0].text
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=5000), "max_tokens"),
    (dict(prompt="x" * 300, max_tokens=4), "context limit"),
    (dict(temperature=0.7, extra_body={"delta": 1}), "temperature"),
    (dict(extra_body={"policy": "nope"}), "policy"),
    (dict(extra_body={"delta": 1.5}), "delta"),
    (dict(extra_body={"delta": "0.9"}), "delta"),  # a string is not a target (v1's rule)
    (dict(extra_body={"delta": True}), "delta"),  # nor a boolean: it used to mean exact mode silently
    (dict(top_p=0.5), "top_p"),
])
def test_bad_requests_are_400_with_a_reason(client, kwargs, message):
    kwargs = {"prompt": "hello", "max_tokens": 4, "temperature": 0, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny-llm", **kwargs)
    assert message in str(info.value)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)


def _metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_generation_metrics_exist_and_count(llm_server, client):
    before = _metric(llm_server.url, "exitserve_generated_tokens_total")
    complete(client, "hello", max_tokens=7, temperature=0, extra_body={"policy": "full"})
    assert _metric(llm_server.url, "exitserve_generated_tokens_total") == before + 7
    text = httpx.get(f"{llm_server.url}/metrics").text
    for name in ("exitserve_time_to_first_token_seconds_bucket", "exitserve_inter_token_latency_seconds_bucket",
                 "exitserve_token_exit_depth_bucket", "exitserve_token_compute_fraction_bucket",
                 "exitserve_draft_tokens_total", "exitserve_running_sequences", "exitserve_waiting_sequences"):
        assert name in text, name


def test_client_disconnect_stops_generation(llm_server):
    before = _metric(llm_server.url, "exitserve_cancelled_sequences_total")
    body = {"model": "tiny-llm", "prompt": "hello", "max_tokens": 200, "temperature": 0, "stream": True,
            "policy": "full"}
    with httpx.stream("POST", f"{llm_server.url}/v1/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _metric(llm_server.url, "exitserve_cancelled_sequences_total") <= before:
        time.sleep(0.1)
    assert _metric(llm_server.url, "exitserve_cancelled_sequences_total") == before + 1
    assert _metric(llm_server.url, "exitserve_running_sequences") == 0


def test_full_queue_answers_503_with_retry_after(llm_bundle):
    with running_server([llm_bundle], ["--queue-limit", "1", "--max-batch-size", "1"]) as proc:
        body = {"model": "tiny-llm", "prompt": "hello", "max_tokens": 150, "temperature": 0, "policy": "full"}

        def post():
            return httpx.post(f"{proc.url}/v1/completions", json=body, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: post(), range(6)))
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and 503 in codes, codes
        refused = next(r for r in responses if r.status_code == 503)
        assert refused.headers["retry-after"] == "1" and "overloaded" in refused.json()["error"]["message"]


def _requests(url: str, **labels: str) -> float:
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
               if line.startswith("exitserve_requests_total{") and all(w in line for w in wanted))


def test_openai_routes_count_in_requests_total(llm_server, client):
    url = llm_server.url
    ok = {"model": "tiny-llm", "protocol": "openai", "status": "200"}
    before_ok, before_400 = _requests(url, **ok), _requests(url, model="tiny-llm", protocol="openai", status="400")
    before_404 = _requests(url, model="unknown", protocol="openai", status="404")
    complete(client, "hello", max_tokens=3, temperature=0, extra_body={"policy": "full"})
    list(client.completions.create(model="tiny-llm", prompt="hi", max_tokens=3, temperature=0, stream=True))
    client.chat.completions.create(model="tiny-llm", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                   temperature=0)
    with pytest.raises(openai.BadRequestError):
        complete(client, "hello", max_tokens=5000)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hello", max_tokens=3)
    assert _requests(url, **ok) == before_ok + 3
    assert _requests(url, model="tiny-llm", protocol="openai", status="400") == before_400 + 1
    # an unknown model name is not a label value (clients cannot grow the series without bound)
    assert _requests(url, model="unknown", protocol="openai", status="404") == before_404 + 1
    assert _requests(url, model="no-such-model") == 0


def test_eos_ids_and_endoftext_end_a_generation(tmp_path):
    """The bundle's eos id and the tokenizer's <|endoftext|> (no eos id) both end a generation with "stop"."""
    from llm_support import END_ID, tiny_model

    from exitserve.service.serving.generation.decoder import MultiExitDecoder

    model = tiny_model()
    decoder = MultiExitDecoder(model, None, [model.config.num_layers - 1], None)
    prompt = [ord(c) - 32 for c in "The quick brown fox"]
    seq = decoder.new_sequence(prompt, capacity=64, mode="full")
    greedy: list[int] = []
    while len(greedy) < 12:
        greedy.extend(t.token for t in decoder.step([seq])[0])
    # the first greedy token that is not the eos id and has not been generated before: it becomes <|endoftext|>
    at = next(i for i, t in enumerate(greedy) if i >= 2 and t != END_ID and t not in greedy[:i])
    assert END_ID not in greedy[:at]
    bundle = write_tiny_generation_bundle(tmp_path / "eot", end_of_text=greedy[at])
    with running_server([bundle]) as proc:
        own = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0)
        r = own.completions.create(model="tiny-llm", prompt="The quick brown fox", max_tokens=12, temperature=0,
                                   extra_body={"policy": "full"})
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].text == "".join(chr(t + 32) for t in greedy[:at])
        assert r.usage.completion_tokens == at  # as OpenAI counts: the end token is neither text nor counted
        streamed = own.completions.create(model="tiny-llm", prompt="The quick brown fox", max_tokens=12, temperature=0, stream=True,
                                          extra_body={"policy": "full"})
        chunks = list(streamed)
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_the_torch_runner_serves_the_same_greedy_text(client, llm_bundle):
    """`--generation-runner torch` (the modules themselves) and the default ONNX Runtime runner answer
    the same full-depth and exact-mode text."""
    with running_server([llm_bundle], ["--generation-runner", "torch"]) as proc:
        other = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0)
        for prompt in PROMPTS[:4]:
            for extra in ({"policy": "full"}, {"delta": 1}):
                ours = complete(client, prompt, max_tokens=16, temperature=0, extra_body=extra).choices[0].text
                theirs = complete(other, prompt, max_tokens=16, temperature=0, extra_body=extra).choices[0].text
                assert theirs == ours, (prompt, extra)


def test_the_openai_client_lists_the_served_models(client):
    """GET /v1/models answers in OpenAI's shape too (issue 28: it listed nothing for language models)."""
    listed = client.models.list()
    assert [m.id for m in listed.data] == ["tiny-llm"] and listed.data[0].owned_by == "exitserve"


def test_int4_weights_serve_and_int8_activations_refuse_exact_mode(llm_bundle):
    """--generation-weights int4 serves, exact mode exact to int4's greedy text; with int8 activations
    (one row and several round differently) exact mode is a 400 that says why."""
    with running_server([llm_bundle], ["--generation-weights", "int4"]) as proc:
        own = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0)
        full = own.completions.create(model="tiny-llm", prompt="abc abc", max_tokens=16, temperature=0,
                                      extra_body={"policy": "full"})
        exact = own.completions.create(model="tiny-llm", prompt="abc abc", max_tokens=16, temperature=0,
                                       extra_body={"delta": 1})
        assert exact.choices[0].text == full.choices[0].text
        assert full.model_extra["exitserve"]["weights"] == "int4"
    with running_server([llm_bundle], ["--generation-weights", "int4", "--generation-int8-activations"]) as proc:
        own = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0)
        early = own.completions.create(model="tiny-llm", prompt="abc abc", max_tokens=8, temperature=0,
                                       extra_body={"delta": 0.5})
        assert early.model_extra["exitserve"]["activations"] == "int8"
        with pytest.raises(openai.BadRequestError, match="int8 activations"):
            own.completions.create(model="tiny-llm", prompt="abc abc", max_tokens=8, temperature=0,
                                   extra_body={"delta": 1})


def test_fused_segments_answer_what_layer_by_layer_answers(tmp_path):
    """The default (fused segments, one call per stretch between exits) and --no-generation-fused-segments
    give the same text at full depth, early exit and exact mode, through the API."""
    bundle = write_tiny_generation_bundle(tmp_path / "tiny-llm", config=FUSABLE)
    texts = []
    for flags in ([], ["--no-generation-fused-segments"]):
        with running_server([bundle], flags) as proc:
            own = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0)
            texts.append([own.completions.create(model="tiny-llm", prompt=prompt, max_tokens=24, temperature=0,
                                                 extra_body=body).choices[0].text
                          for prompt in ("abc abc", "hello") for body in ({"policy": "full"}, {"delta": 0.5},
                                                                           {"delta": 1})])
    assert texts[0] == texts[1]
    assert texts[0][0] == texts[0][2] and texts[0][3] == texts[0][5]  # exact mode: full depth's text


def test_streams_in_the_kv_pool_answer_what_caches_of_their_own_answer(tmp_path):
    """Concurrent requests decode together: with the KV pool (default) their segments run as batches,
    with --no-generation-kv-pool layer by layer; the texts are the same, at full depth and early exit
    (no lookup drafts: they go to a sequence when it decodes alone, which timing decides here)."""
    from concurrent.futures import ThreadPoolExecutor

    bundle = write_tiny_generation_bundle(tmp_path / "tiny-llm", config=FUSABLE)
    prompts = ["abc abc", "hello", "0123", "xyz", "The cat", "qq", "a", "zebra"]
    texts = []
    for flags in ([], ["--no-generation-kv-pool"]):
        with running_server([bundle], ["--generation-lookup-ngram", "0", *flags]) as proc:
            own = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0)

            def ask(prompt: str, body: dict, client=own) -> str:
                return client.completions.create(model="tiny-llm", prompt=prompt, max_tokens=24, temperature=0,
                                                 extra_body=body).choices[0].text

            with ThreadPoolExecutor(len(prompts)) as pool:
                texts.append([list(pool.map(ask, prompts, [body] * len(prompts)))
                              for body in ({"policy": "full"}, {"delta": 0.5})])
    assert texts[0] == texts[1]


def test_an_answer_given_before_drafts_the_same_answer_again(llm_bundle):
    """The server keeps its finished answers (--generation-lookup-history): asked again, the model's own
    earlier answer is drafted and kept; with the history off, the second answer costs what the first did."""
    accepted = []
    for flags in ([], ["--generation-lookup-history", "0"]):
        with running_server([llm_bundle], flags) as proc:
            own = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0)
            answers = [own.completions.create(model="tiny-llm", prompt="Kq7!", max_tokens=24, temperature=0,
                                              extra_body={"delta": 1}) for _ in range(2)]
            assert answers[0].choices[0].text == answers[1].choices[0].text
            accepted.append([a.model_extra["exitserve"]["accepted"] for a in answers])
    (first, again), (first_off, again_off) = accepted
    assert again > first and again_off == first_off, accepted


def test_lookup_drafts_are_counted_and_can_be_turned_off(llm_bundle):
    """Early mode's only drafts are lookup drafts: a repetitive prompt gets some by default, none with
    --generation-lookup-ngram 0; exact mode's text is the full model's either way."""
    drafted, texts = [], []
    for flags in ([], ["--generation-lookup-ngram", "0"]):
        with running_server([llm_bundle], flags) as proc:
            own = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0)

            def ask(prompt: str, body: dict, client=own):
                return client.completions.create(model="tiny-llm", prompt=prompt, max_tokens=24, temperature=0,
                                                 extra_body=body)

            prompts = ("abc abc abc abc", "hello hello hello", "0123012301230123")
            drafted.append(sum(ask(p, {"delta": 0.99}).model_extra["exitserve"]["drafted"] for p in prompts))
            texts.append([(ask(p, {"policy": "full"}).choices[0].text, ask(p, {"delta": 1}).choices[0].text)
                          for p in prompts])
    assert drafted[0] > 0 and drafted[1] == 0, drafted
    assert all(full == exact for full, exact in texts[0] + texts[1]) and texts[0] == texts[1]
