"""Lookup drafts (prompt lookup decoding): what `lookup_draft` proposes, and that the decoder keeps
only what the full model would have said (exact mode equals greedy; early mode's looked-up tokens
are the full model's tokens at their prefix)."""

from __future__ import annotations

import pytest
import torch
from llm_support import EXIT_LAYERS, random_prompts, tiny_parts

from exitserve.service.serving.generation.decoder import MultiExitDecoder, Sequence
from exitserve.service.serving.generation.lookup import lookup_draft
from exitserve.service.serving.generation.runners import RUNNERS

LAST_EXIT = len(EXIT_LAYERS) - 1


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def test_the_tokens_after_the_latest_earlier_occurrence_of_the_tail():
    tokens = [5, 6, 7, 1, 5, 6, 8, 2, 9, 5, 6]
    assert lookup_draft(tokens, 8) == [8, 2, 9, 5, 6]  # "5 6" last occurred before "8 2 9 5 6"
    assert lookup_draft(tokens, 2) == [8, 2]
    assert lookup_draft(tokens, 0) == []


def test_a_longer_match_wins_over_a_later_shorter_one():
    tokens = [1, 2, 3, 40, 41, 9, 2, 3, 50, 1, 2, 3]
    assert lookup_draft(tokens, 2, max_ngram=3) == [40, 41]  # "1 2 3", not the later "2 3"
    assert lookup_draft(tokens, 2, max_ngram=2) == [50, 1]


def test_no_draft_without_an_earlier_match_of_two_tokens():
    assert lookup_draft([1, 2, 3, 4, 5, 3], 4) == []  # "5 3" never occurred; one token is not enough
    assert lookup_draft([7, 7], 4) == []
    assert lookup_draft([1, 2, 1, 2], 4, max_ngram=1) == []
    assert lookup_draft([7, 7, 7], 4) == [7]  # overlapping occurrences count




def looping_prompts(count: int, seed: int = 21) -> list[list[int]]:
    """Random prompts that repeat themselves, so lookup finds matches from the first step."""
    return [p[:8] * 3 for p in random_prompts(count, seed=seed)]


def decode(dec: MultiExitDecoder, prompt: list[int], new_tokens: int, **options) -> tuple[list, Sequence]:
    seq = dec.new_sequence(prompt, capacity=len(prompt) + new_tokens + options.get("max_draft", 8) + 2, **options)
    outs: list = []
    while len(outs) < new_tokens:
        assert len(seq.tokens) - seq.verified <= seq.max_draft  # drafts in flight stay within the capacity
        outs.extend(dec.step([seq])[0])
    return outs[:new_tokens], seq


def full_model_tokens(model, ids: list[int]) -> list[int]:
    """The full model's greedy token after every prefix of `ids`, teacher-forced."""
    logits, _ = model(torch.tensor(ids))
    return logits.argmax(-1).tolist()


@pytest.mark.parametrize("runner", RUNNERS)
def test_exact_mode_with_lookup_drafts_equals_full_greedy(parts, runner):
    model, heads, calibration = parts
    dec = MultiExitDecoder(model, heads, EXIT_LAYERS, calibration, runner=runner)
    plain = MultiExitDecoder(model, heads, EXIT_LAYERS, calibration, runner=runner, lookup_ngram=0)
    looked_up = kept = 0
    for prompt in looping_prompts(6) + random_prompts(6, seed=22):
        full, _ = decode(dec, prompt, 24, mode="full")
        for options in ({"delta": 0.15, "policy": "confidence", "max_draft": 5}, {"delta": 1.0, "policy": "pcee"}):
            exact, seq = decode(dec, prompt, 24, mode="exact", **options)
            assert [t.token for t in exact] == [t.token for t in full]
            looked_up += seq.looked_up
            kept += seq.looked_up_accepted
        without, seq = decode(plain, prompt, 24, mode="exact", delta=0.15, policy="confidence")
        assert [t.token for t in without] == [t.token for t in full] and seq.looked_up == 0
    assert looked_up > 20 and 0 < kept < looked_up, (looked_up, kept)  # both outcomes occurred


@pytest.mark.parametrize("runner", RUNNERS)
def test_early_mode_keeps_only_the_full_models_tokens_from_lookup(parts, runner):
    model, heads, calibration = parts
    dec = MultiExitDecoder(model, heads, EXIT_LAYERS, calibration, runner=runner)
    kept = early = 0
    for prompt in looping_prompts(6, seed=23):
        outs, seq = decode(dec, prompt, 24, mode="early", delta=0.3, policy="pcee-lb-tail")
        ids = prompt + [t.token for t in outs]
        reference = full_model_tokens(model, ids[:-1])[len(prompt) - 1:]
        for t, full in zip(outs, reference, strict=True):
            if t.drafted or t.exit == LAST_EXIT:  # a kept lookup draft, or a full-depth token
                assert t.token == full and t.target_met
        kept += sum(t.drafted for t in outs)
        early += sum(t.exit < LAST_EXIT for t in outs)
        assert seq.looked_up_accepted == seq.accepted  # early mode's only drafts are lookup drafts
    assert kept > 0 and early > 0, (kept, early)


def test_no_lookup_when_off_in_full_mode_or_when_sampling(parts):
    model, heads, calibration = parts
    on = MultiExitDecoder(model, heads, EXIT_LAYERS, calibration)
    off = MultiExitDecoder(model, heads, EXIT_LAYERS, calibration, lookup_ngram=0)
    prompt = looping_prompts(1)[0]
    cases = ((on, {"mode": "exact", "delta": 1.0}, True), (off, {"mode": "exact", "delta": 1.0}, False),
             (off, {"mode": "early", "delta": 0.3}, False), (on, {"mode": "full"}, False),
             (on, {"mode": "early", "delta": 0.3, "temperature": 1.0, "generator": torch.Generator().manual_seed(0)},
              False))
    for dec, options, drafts in cases:
        seq = dec.new_sequence(prompt, capacity=64, **options)
        for _ in range(12):
            dec.step([seq])
        assert (seq.looked_up > 0) == drafts, options


@pytest.mark.parametrize("runner", RUNNERS)
def test_lookup_drafts_only_in_small_batches_and_exact_there_too(parts, runner):
    """By default only a sequence decoding alone drafts by lookup; allowed in a batch, drafts ride in the
    batched per-layer calls and exact mode still equals greedy for every sequence."""
    model, heads, calibration = parts
    prompts = looping_prompts(3, seed=24)

    def batch_decode(dec: MultiExitDecoder) -> tuple[list[list[int]], int]:
        seqs = [dec.new_sequence(p, capacity=len(p) + 40, mode="exact", delta=1.0) for p in prompts]
        outs: list[list[int]] = [[] for _ in prompts]
        while min(len(o) for o in outs) < 16:
            for o, gained in zip(outs, dec.step(seqs), strict=True):
                o.extend(t.token for t in gained)
        return [o[:16] for o in outs], sum(s.looked_up for s in seqs)

    alone, looked_up_alone = batch_decode(MultiExitDecoder(model, heads, EXIT_LAYERS, calibration, runner=runner))
    together, looked_up_together = batch_decode(
        MultiExitDecoder(model, heads, EXIT_LAYERS, calibration, runner=runner, lookup_max_batch=3))
    greedy = [[t.token for t in decode(MultiExitDecoder(model, heads, EXIT_LAYERS, calibration, runner=runner),
                                       p, 16, mode="full")[0]] for p in prompts]
    assert alone == together == greedy
    assert looked_up_alone == 0 and looked_up_together > 0
