"""Lookup drafts (prompt lookup decoding, and the history of earlier answers): what `lookup_draft` and
`AnswerHistory` propose, and that the decoder keeps only what the full model would have said (exact
mode equals greedy; early mode's looked-up tokens are the full model's tokens at their prefix)."""

from __future__ import annotations

import pytest
import torch
from llm_support import EXIT_LAYERS, random_prompts, tiny_parts

from exitserve.service.serving.generation.decoder import MultiExitDecoder, Sequence, lookup_length
from exitserve.service.serving.generation.lookup import AnswerHistory, lookup_draft
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


def test_the_history_drafts_what_earlier_answers_agree_follows_the_tail():
    history = AnswerHistory(100)
    for answer in ([1, 2, 3, 4, 5, 6], [9, 2, 3, 4, 7, 8], [5, 2, 3, 4, 5, 6, 1]):
        history.add(answer)
    assert history.draft([0, 2, 3], 5) == [4]  # all three go on with 4, then two of three with 5: too few
    assert history.draft([0, 4, 5], 5) == [6]  # both go on with 6; after it one answer ends
    assert history.draft([0, 3, 4], 5) == []  # 5, 7, 5: no agreement of 0.7
    assert history.draft([0, 8, 9], 5) == [] and history.draft([0, 2, 3], 0) == []
    unanimous = AnswerHistory(100, agreement=0.5)
    for answer in ([1, 2, 3, 4, 5, 6], [9, 2, 3, 4, 5, 7]):
        unanimous.add(answer)
    assert unanimous.draft([2, 3], 8) == [4, 5, 6]  # half is enough here; past 5 they part (6 and 7: a tie)


def test_the_longest_tail_that_occurred_in_the_history_wins():
    history = AnswerHistory(100)
    history.add([1, 2, 3, 40, 41])
    history.add([8, 2, 3, 50, 51])
    assert history.draft([1, 2, 3], 2) == [40, 41]  # "1 2 3" occurred once: its continuation
    assert history.draft([7, 2, 3], 2) == []  # "2 3" is followed by 40 and 50: no agreement


def test_the_history_forgets_its_oldest_answers_beyond_its_capacity():
    history = AnswerHistory(10)
    history.add([1, 2, 3, 4, 5, 6])
    assert history.draft([1, 2], 3) == [3, 4, 5]
    history.add([7, 8, 9, 10, 11])  # 11 tokens: the first answer goes
    assert len(history) == 1 and history.tokens == 5
    assert history.draft([1, 2], 3) == [] and history.draft([7, 8], 3) == [9, 10, 11]
    for start in range(0, 4000, 5):  # many answers: the index holds only what is kept
        history.add(list(range(start, start + 5)))
    assert history.tokens <= 10 and len(history._index) <= 2 * 10
    off = AnswerHistory(0)
    off.add([1, 2, 3, 4])
    assert len(off) == 0 and off.draft([1, 2], 3) == []


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


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_request_like_an_earlier_one_drafts_from_its_answer_and_stays_exact(parts, runner):
    """Random prompts have no repeats of their own; the second time a prompt is asked, its answer so far
    matches the remembered answer, whose continuation is drafted and kept."""
    model, heads, calibration = parts
    dec = MultiExitDecoder(model, heads, EXIT_LAYERS, calibration, runner=runner, lookup_history=4096)
    kept = []
    for prompt in random_prompts(4, seed=25):
        first, seq = decode(dec, prompt, 24, mode="exact", delta=1.0)
        dec.remember(seq)
        again, seq = decode(dec, prompt, 24, mode="exact", delta=1.0)
        assert [t.token for t in again] == [t.token for t in first] == [t.token for t in
                                                                         decode(dec, prompt, 24, mode="full")[0]]
        kept.append(seq.looked_up_accepted)
    assert dec.history is not None and len(dec.history) == 4
    assert sum(kept) > 24, kept  # most of the second answers came as kept drafts


def test_the_scheduler_remembers_finished_answers(parts):
    import asyncio

    from prometheus_client import CollectorRegistry

    from exitserve.service.serving.generation.metrics import GenerationMetrics
    from exitserve.service.serving.generation.scheduler import Scheduler
    from exitserve.service.serving.generation.stream import GenerationParams

    model, heads, calibration = parts
    dec = MultiExitDecoder(model, heads, EXIT_LAYERS, calibration, lookup_history=4096)
    scheduler = Scheduler(dec, GenerationMetrics(CollectorRegistry(), "tiny", len(EXIT_LAYERS)))
    scheduler.start()

    async def answer(prompt: list[int]) -> list[int]:
        stream = scheduler.submit(GenerationParams(prompt=prompt, max_tokens=12, mode="exact", delta=1.0),
                                  asyncio.get_running_loop())
        tokens: list[int] = []
        while True:
            event = await asyncio.wait_for(stream.queue.get(), 30)
            tokens.extend(t.token for t in event.tokens)
            if event.finish_reason is not None:
                return tokens

    try:
        prompts = random_prompts(3, seed=26)
        answers = [asyncio.run(answer(p)) for p in prompts]
    finally:
        assert scheduler.close()
    assert dec.history is not None and len(dec.history) == 3
    assert dec.history.draft(answers[0][:4], 4) == answers[0][4:8]  # its own continuation, drafted


def test_lookup_drafts_are_as_long_as_pays_where_rows_cost():
    seq = Sequence(tokens=[1, 2, 3])
    assert lookup_length(seq, 8, row_cost=0.06) == 8  # float32 on a CPU: rows are nearly free
    assert 1 <= lookup_length(seq, 8, row_cost=0.5) <= 3  # int8 activations: a row costs half a step
    assert lookup_length(seq, 3, row_cost=0.0) == 3 and lookup_length(seq, 0, row_cost=0.0) == 0
    # 20 lookups, every first draft rejected: none pays where rows are dear; where a whole rejected
    # draft costs less than a step, the room (runs, when they come, are long)
    seq.lookup_events, seq.lookup_hits, seq.looked_up_judged, seq.looked_up_accepted = 20, 0, 20, 0
    assert lookup_length(seq, 8, row_cost=0.5) == 0 and lookup_length(seq, 8, row_cost=0.06) == 8
    assert lookup_length(seq, 8, row_cost=0.2) == 0  # 8 rows would cost 1.6 steps: the model decides
    # 20 lookups, 14 kept in runs (50 of 60 judged): dear rows still take a short draft
    seq.lookup_events, seq.lookup_hits, seq.looked_up_judged, seq.looked_up_accepted = 20, 14, 60, 50
    assert lookup_length(seq, 8, row_cost=0.5) == 2 and lookup_length(seq, 8, row_cost=0.06) == 8


def test_the_measured_row_cost_limits_lookup_drafts_and_exact_mode_stays_exact(parts):
    model, heads, calibration = parts
    dec = MultiExitDecoder(model, heads, EXIT_LAYERS, calibration)
    assert dec.row_cost is None
    assert dec.measure_row_cost(rows=4, repeats=2) >= 0.0 and dec.row_cost is not None
    prompt = looping_prompts(1, seed=27)[0]
    full = [t.token for t in decode(dec, prompt, 20, mode="full")[0]]
    free, seq = decode(dec, prompt, 20, mode="exact", delta=1.0)
    dec.row_cost = 10.0  # rows dearer than any draft can repay
    dear, dear_seq = decode(dec, prompt, 20, mode="exact", delta=1.0)
    assert [t.token for t in free] == [t.token for t in dear] == full
    assert dear_seq.looked_up == 0 < seq.looked_up


def test_a_sequence_whose_history_drafts_miss_stops_asking_the_history(parts):
    model, heads, calibration = parts
    dec = MultiExitDecoder(model, heads, EXIT_LAYERS, calibration, lookup_history=4096)
    assert dec.history is not None
    dec.history.add([40, 41, 42, 43, 44])
    for misses, drafts in ((0, [42, 43, 44]), (6, [42, 43, 44]), (7, [])):
        seq = dec.new_sequence([7, 40, 41], capacity=32, mode="exact", delta=1.0)
        seq.fed, seq.history_events = 2, misses  # one token to feed; `misses` history drafts rejected at once
        dec._draft_by_lookup(seq)
        assert seq.tokens[3:] == drafts and seq.from_history == bool(drafts), misses
