"""The token-level early-exit decoder on a tiny Llama-shaped model: exact mode, KV strategies, batching."""

from __future__ import annotations

import pytest
import torch
from llm_support import EXIT_LAYERS, random_prompts, tiny_calibration, tiny_heads, tiny_model, tiny_parts

from exitserve.service.serving.generation.decoder import MultiExitDecoder, Sequence
from exitserve.service.serving.generation.runners import RUNNERS

NEW_TOKENS = 20


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


@pytest.fixture(params=RUNNERS)
def runner(request) -> str:
    """Every test taking it runs on both runners: the torch modules and ONNX Runtime over the same weights."""
    return request.param


def decoder(parts, runner: str, kv_strategy: str = "recompute", lookup_ngram: int = 3) -> MultiExitDecoder:
    model, heads, calibration = parts
    return MultiExitDecoder(model, heads, EXIT_LAYERS, calibration, kv_strategy=kv_strategy, runner=runner,
                            lookup_ngram=lookup_ngram)


def generate(dec: MultiExitDecoder, prompts: list[list[int]], new_tokens: int = NEW_TOKENS, **options) -> tuple[list[list[int]], list[Sequence], list[list[int]]]:
    """Step every prompt together until each has `new_tokens` tokens; returns tokens, states, exits."""
    seqs = [dec.new_sequence(p, capacity=len(p) + new_tokens + 16, **options) for p in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    exits: list[list[int]] = [[] for _ in prompts]
    running = list(range(len(prompts)))
    while running:
        gained = dec.step([seqs[i] for i in running])
        for i, tokens in zip(running, gained, strict=True):
            outs[i].extend(t.token for t in tokens)
            exits[i].extend(t.exit for t in tokens)
        running = [i for i in running if len(outs[i]) < new_tokens]
    return [o[:new_tokens] for o in outs], seqs, [e[:new_tokens] for e in exits]


def reference_greedy(model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """Full greedy decoding by re-running the whole sequence each token (no cache at all)."""
    ids = list(prompt)
    for _ in range(new_tokens):
        logits, _ = model(torch.tensor(ids))
        ids.append(int(logits[-1].argmax()))
    return ids[len(prompt):]


def test_full_depth_equals_cacheless_greedy(parts, runner):
    prompts = random_prompts(6)
    tokens, _, exits = generate(decoder(parts, runner), prompts, mode="full")
    for prompt, got in zip(prompts, tokens, strict=True):
        assert got == reference_greedy(parts[0], prompt)
    assert all(e == len(EXIT_LAYERS) - 1 for row in exits for e in row)


def test_exact_mode_output_identical_to_full_greedy_on_many_prompts(parts, runner):
    dec = decoder(parts, runner)
    prompts = random_prompts(30, seed=11)
    full, _, _ = generate(dec, prompts, mode="full")
    # a low δ with the `confidence` policy drafts often, so both accepted and rejected drafts occur
    exact, seqs, _ = generate(dec, prompts, mode="exact", delta=0.15, policy="confidence", max_draft=6)
    assert exact == full
    drafted = sum(s.drafted for s in seqs)
    accepted = sum(s.accepted for s in seqs)
    assert drafted > 50 and 0 < accepted < drafted, (drafted, accepted)


def test_exact_mode_batched_equals_one_at_a_time(parts, runner):
    dec = decoder(parts, runner)
    prompts = random_prompts(4, seed=5)
    together, _, _ = generate(dec, prompts, mode="exact", delta=0.15, policy="confidence")
    alone = [generate(dec, [p], mode="exact", delta=0.15, policy="confidence")[0][0] for p in prompts]
    assert together == alone


def test_recompute_strategy_leaves_exact_kv_for_the_emitted_tokens(parts, runner):
    """Early mode emits early-exit tokens; the deep KV the next deep token computes for them equals
    what a full teacher-forced pass over the emitted sequence computes."""
    model = parts[0]
    dec = decoder(parts, runner, "recompute")
    prompt = random_prompts(1, seed=7)[0]
    tokens, (seq,), exits = generate(dec, [prompt], mode="early", delta=0.15, policy="confidence")
    assert any(e < len(EXIT_LAYERS) - 1 for e in exits[0]), "no token exited early"
    # bring every pending position to full depth: one more step that goes full depth
    seq.mode = "full"
    dec.step([seq])
    assert seq.pending == 0
    ids = torch.tensor(seq.tokens[: seq.fed])
    cache = model.new_cache(ids.shape[0])
    from exitserve.models.llm.llama import LayerSpan

    x, rotary = model.embed(ids), model.rotary()
    for index, layer in enumerate(model.layers):
        keys, values = cache[index]
        x = layer.run(x, [LayerSpan.starting_at((0, ids.shape[0]), 0, keys, values)], rotary)
        got_keys = seq.cache[index][0][:, : ids.shape[0]]
        assert torch.allclose(got_keys, keys, atol=1e-4), f"layer {index}"


def test_copy_strategy_fills_every_layer_at_once(parts, runner):
    dec = decoder(parts, runner, "copy")
    prompt = random_prompts(1, seed=7)[0]
    seqs = [dec.new_sequence(prompt, capacity=64, mode="early", delta=0.15, policy="confidence")]
    early = 0
    for _ in range(20):
        gained = dec.step(seqs)
        early += sum(t.exit < len(EXIT_LAYERS) - 1 for t in gained[0])
        assert seqs[0].pending == 0 and len(set(seqs[0].filled)) == 1
    assert early > 0


def test_delta_one_never_exits_early(parts, runner):
    dec = decoder(parts, runner)
    prompts = random_prompts(4, seed=9)
    tokens, _, exits = generate(dec, prompts, mode="early", delta=1.0, policy="pcee")
    full, _, _ = generate(dec, prompts, mode="full")
    assert tokens == full
    assert all(e == len(EXIT_LAYERS) - 1 for row in exits for e in row)


def test_sampling_is_reproducible_with_a_seed(parts, runner):
    dec = decoder(parts, runner)
    prompt = random_prompts(1, seed=4)
    runs = [generate(dec, prompt, mode="full", temperature=1.0, generator=torch.Generator().manual_seed(s))[0][0]
            for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


# --- an early exit after the final layer: a restricted-vocabulary head instead of the full LM head ---

FINAL_EXIT_LAYERS = [1, 5, 5]


@pytest.fixture(scope="module")
def final_exit_parts():
    model = tiny_model()
    heads = tiny_heads(model, exit_layers=FINAL_EXIT_LAYERS)
    return model, heads, tiny_calibration(model, heads, exit_layers=FINAL_EXIT_LAYERS)


def test_final_layer_exit_answers_the_full_models_token_within_its_vocabulary(final_exit_parts, runner):
    model, heads, calibration = final_exit_parts
    dec = MultiExitDecoder(model, heads, FINAL_EXIT_LAYERS, calibration, runner=runner)
    prompts = random_prompts(12, seed=21)
    tokens, seqs, exits = generate(dec, prompts, mode="early", delta=0.2, policy="confidence")
    answered = 0
    for prompt, got, where in zip(prompts, tokens, exits, strict=True):
        ids = list(prompt)
        for token, e in zip(got, where, strict=True):
            logits, _ = model(torch.tensor(ids))
            if e == 1:  # the final-layer exit: the full model's best token among the head's 64
                assert token == int(logits[-1][: heads.vocab_size].argmax())
                answered += 1
            ids.append(token)
    assert answered > 10, answered
    assert all(s.pending == 0 or s.filled[-1] <= s.fed for s in seqs)


def test_exact_mode_with_a_final_layer_exit_equals_full_greedy(final_exit_parts, runner):
    model, heads, calibration = final_exit_parts
    dec = MultiExitDecoder(model, heads, FINAL_EXIT_LAYERS, calibration, runner=runner)
    prompts = random_prompts(30, seed=13)
    full, _, _ = generate(dec, prompts, mode="full")
    exact, seqs, exact_exits = generate(dec, prompts, mode="exact", delta=0.15, policy="confidence", max_draft=6)
    assert exact == full
    # accepted drafts from the final-layer exit (verified from their stored final hidden states)
    assert sum(e == 1 for row in exact_exits for e in row) >= 5
    for prompt, expected in zip(prompts[:5], full[:5], strict=True):
        assert expected == reference_greedy(model, prompt)
    drafted = sum(s.drafted for s in seqs)
    accepted = sum(s.accepted for s in seqs)
    assert drafted > 50 and 0 < accepted < drafted, (drafted, accepted)
    batched, _, _ = generate(dec, prompts[:6], mode="exact", delta=0.15, policy="confidence")
    assert batched == full[:6]


def test_each_tokens_target_met_is_the_exit_rules_promise(parts):
    """Per token, the decoder reports what the exit rule promised: replayed teacher-forced on the
    generated text with `decide_all` (the recompute strategy keeps every lower layer's KV exact, so
    the exit layers see the same hidden states), exits and target_met agree token by token."""
    from exitserve.calibration import decide_all
    from exitserve.models.llm.heads import calibration_logits, one_hot_logits, vocab_index

    model, heads, calibration = parts
    dec = decoder(parts, "torch", lookup_ngram=0)  # lookup drafts answer some tokens at full depth
    checked = early = 0
    for prompt in random_prompts(6, seed=31):
        seq = dec.new_sequence(prompt, capacity=len(prompt) + 40, mode="early", delta=0.3, policy="pcee-lb-tail")
        outs = []
        while len(outs) < 16:
            outs.extend(dec.step([seq])[0])
        outs = outs[:16]
        ids = prompt + [t.token for t in outs]
        logits, hidden = model(torch.tensor(ids[:-1]), hidden_layers=EXIT_LAYERS[:-1])
        rows = slice(len(prompt) - 1, len(ids) - 1)
        with torch.no_grad():
            per_exit = [calibration_logits(heads.logits(k, h[rows]).numpy(), heads.vocab_size)
                        for k, h in enumerate(hidden)]
        full = logits[rows].argmax(-1).numpy()
        per_exit.append(one_hot_logits(vocab_index(heads.vocab.numpy(), model.config.vocab_size)[full],
                                       heads.vocab_size))
        replay = decide_all(calibration, "pcee-lb-tail", per_exit, 0.3)
        assert [t.exit for t in outs] == replay.exit_index.tolist()
        assert [t.target_met for t in outs] == replay.target_met.tolist()
        checked += len(outs)
        early += int((replay.exit_index < len(EXIT_LAYERS) - 1).sum())
    assert checked == 96 and early > 0


def test_an_exit_whose_drafts_are_rejected_stops_drafting(parts):
    """Exact mode counts, per sequence and exit, the drafts verification kept; below the exit's share
    of a step's compute it drafts no more (the output stays full greedy either way)."""
    dec = decoder(parts, "torch", lookup_ngram=0)
    prompts = random_prompts(8, seed=41)
    full, _, _ = generate(dec, prompts, mode="full")
    options = {"mode": "exact", "delta": 0.15, "policy": "confidence", "max_draft": 6}
    exact, seqs, _ = generate(dec, prompts, **options)
    assert exact == full
    judged = [sum(s.exit_judged[k] for s in seqs) for k in range(len(EXIT_LAYERS) - 1)]
    kept = [sum(s.exit_kept[k] for s in seqs) for k in range(len(EXIT_LAYERS) - 1)]
    assert all(0 <= k <= j for k, j in zip(kept, judged, strict=True)) and sum(judged) > 0
    # a sequence whose exit-0 drafts were all rejected: exit 0 drafts no more, the other exits still may
    for adaptive, drafts_from_exit_0 in ((True, False), (False, True)):
        dec.adaptive_drafts = adaptive
        drafted_at_0 = False
        for prompt in prompts:
            seq = dec.new_sequence(prompt, capacity=len(prompt) + 40, **options)
            seq.exit_judged[0] = 20
            while len(seq.tokens) < len(prompt) + 20:
                dec.step([seq])
                drafted_at_0 |= 0 in seq.draft_exits
        assert drafted_at_0 == drafts_from_exit_0
    dec.adaptive_drafts = True
