"""The KV pool: slots handed out lowest first and back when a sequence is done; sequences in
consecutive slots run a fused segment as one batch (one row each) and decode what they decode alone."""

from __future__ import annotations

import asyncio
import gc

import pytest
from llm_support import EXIT_LAYERS, FUSABLE, random_prompts, tiny_calibration, tiny_heads, tiny_model
from prometheus_client import CollectorRegistry

from exitserve.service.serving.generation.decoder import MultiExitDecoder, Sequence
from exitserve.service.serving.generation.kv_pool import KVPool
from exitserve.service.serving.generation.metrics import GenerationMetrics
from exitserve.service.serving.generation.scheduler import Scheduler
from exitserve.service.serving.generation.stream import GenerationParams

NEW_TOKENS = 16


class Owner:
    """Something a slot can belong to (weakly referenced)."""


@pytest.fixture(scope="module")
def parts():
    model = tiny_model(config=FUSABLE)
    heads = tiny_heads(model)
    return model, heads, tiny_calibration(model, heads)


def pooled(parts, **options) -> MultiExitDecoder:
    """No lookup drafts: they go to sequences that decode alone, so early mode alone and in a batch would differ."""
    model, heads, calibration = parts
    return MultiExitDecoder(model, heads, EXIT_LAYERS, calibration, runner="onnxruntime", lookup_ngram=0, **options)


def segment_batches(decoder: MultiExitDecoder) -> list[int]:
    """Record the batch size of every fused segment call the decoder's runner makes."""
    sizes: list[int] = []
    run = decoder.runner.segment

    def recorded(first, last, x, starts, cache):
        sizes.append(len(starts))
        return run(first, last, x, starts, cache)

    decoder.runner.segment = recorded  # type: ignore[method-assign]
    return sizes


def decode(decoder: MultiExitDecoder, seqs: list[Sequence], steps_of: list[list[int]] | None = None) -> list[list[int]]:
    """Step the sequences (all together, or the index groups in `steps_of` in turn) until each has NEW_TOKENS."""
    outs: list[list[int]] = [[] for _ in seqs]
    groups = steps_of or [list(range(len(seqs)))]
    while any(len(o) < NEW_TOKENS for o in outs):
        for group in groups:
            running = [i for i in group if len(outs[i]) < NEW_TOKENS]
            if running:
                for i, gained in zip(running, decoder.step([seqs[i] for i in running]), strict=True):
                    outs[i].extend(t.token for t in gained)
    return [o[:NEW_TOKENS] for o in outs]


def alone(decoder: MultiExitDecoder, prompt: list[int], **options) -> list[int]:
    return decode(decoder, [decoder.new_sequence(prompt, len(prompt) + NEW_TOKENS + 16, **options)])[0]


def side_by_side(parts, prompts: list[list[int]], **options):
    """What each prompt decodes alone (no pool), and a pooled decoder that records its segment batches,
    with the prompts' sequences in slots 0, 1, ..."""
    want = [alone(pooled(parts, pool_slots=0), p, **options) for p in prompts]
    decoder = pooled(parts)
    sizes = segment_batches(decoder)
    seqs = [decoder.new_sequence(p, len(p) + NEW_TOKENS + 16, **options) for p in prompts]
    return want, decoder, sizes, seqs


def test_slots_go_lowest_first_and_come_back():
    pool = KVPool(FUSABLE, 3, 8)
    owners = [Owner() for _ in range(4)]
    assert [pool.acquire(o) for o in owners] == [0, 1, 2, None]
    pool.release(1)
    assert pool.acquire(owners[3]) == 1 and pool.in_use == 3
    pool.release(0)
    newer = Owner()
    assert pool.acquire(newer) == 0 and pool.owner(0) is newer
    del owners[0]  # slot 0's first owner: released already, its end frees nothing
    gc.collect()
    assert pool.in_use == 3 and pool.owner(0) is newer
    del owners[1]  # slot 2's owner, never released: its slot comes back when it is garbage
    gc.collect()
    assert pool.in_use == 2 and pool.acquire(Owner()) == 2


def test_a_slots_cache_and_a_batch_of_slots_are_views_of_the_pool():
    pool = KVPool(FUSABLE, 4, 10)
    keys, values = pool.cache(2)[3]
    assert keys.shape == (FUSABLE.num_kv_heads, 10, FUSABLE.head_dim) and keys.is_contiguous()
    keys[:, 4] = 7.0
    batch_keys, batch_values = pool.batch(1, 3)[3]
    assert batch_keys.shape == (3, FUSABLE.num_kv_heads, 10, FUSABLE.head_dim) and batch_values.is_contiguous()
    assert bool((batch_keys[1, :, 4] == 7.0).all())
    assert pool.batch(1, 3) is pool.batch(1, 3)  # the same views each step
    with pytest.raises(ValueError, match="at least one slot"):
        KVPool(FUSABLE, 0, 10)


@pytest.mark.parametrize("mode", ["full", "early"])
def test_sequences_in_the_pool_decode_as_one_batch_what_they_decode_alone(parts, mode):
    options = {"mode": mode} if mode == "full" else {"mode": mode, "delta": 0.15, "policy": "confidence"}
    assert pooled(parts, pool_slots=0).pool is None
    want, decoder, sizes, seqs = side_by_side(parts, random_prompts(6, seed=31), **options)
    assert [s.slot for s in seqs] == list(range(6))
    assert decode(decoder, seqs) == want
    assert max(sizes) == 6  # the decoding steps ran their segments as one batch


def test_a_gap_in_a_batch_writes_nothing_its_slots_sequence_reads(parts):
    """Slot 2's sequence steps on its own, every other step; the others' batches span its slot."""
    want, decoder, sizes, seqs = side_by_side(parts, random_prompts(5, seed=41))
    assert decode(decoder, seqs, steps_of=[[0, 1, 3, 4], [2]]) == want
    assert 5 in sizes  # four sequences and one gap ran as a batch of five


def test_a_full_pool_or_a_long_sequence_keeps_a_cache_of_its_own(parts):
    decoder = pooled(parts, pool_slots=2, pool_capacity=48)
    prompts = random_prompts(4, seed=51)
    seqs = [decoder.new_sequence(p, len(p) + NEW_TOKENS + 16) for p in prompts[:3]]
    long = decoder.new_sequence(prompts[3], 60)
    assert [s.slot for s in seqs] == [0, 1, None] and long.slot is None
    want = [alone(pooled(parts, pool_slots=0), p) for p in prompts]
    assert decode(decoder, [*seqs, long]) == want  # mixed: the layer-by-layer path
    decoder.release(seqs[0])
    assert decoder.pool is not None and decoder.pool.in_use == 1 and seqs[0].slot is None


def test_the_scheduler_gives_every_slot_back(parts):
    decoder = pooled(parts, pool_slots=4)
    scheduler = Scheduler(decoder, GenerationMetrics(CollectorRegistry(), "tiny", len(EXIT_LAYERS)), max_running=4)
    scheduler.start()

    async def run() -> list[str | None]:
        loop = asyncio.get_running_loop()
        streams = [scheduler.submit(GenerationParams(prompt=p, max_tokens=12, mode="full"), loop)
                   for p in random_prompts(6, seed=61)]
        await asyncio.wait_for(streams[0].queue.get(), 30)
        streams[0].cancelled.set()  # a client that went away during its answer
        finishes: list[str | None] = []
        for stream in streams[1:]:  # five streams through four slots: one waits for a slot to come back
            while (event := await asyncio.wait_for(stream.queue.get(), 30)).finish_reason is None:
                pass
            finishes.append(event.finish_reason)
        return finishes

    try:
        assert asyncio.run(run()) == ["length"] * 5
    finally:
        assert scheduler.close()
    assert decoder.pool is not None and decoder.pool.in_use == 0


def test_when_some_sequences_finish_the_rest_move_down_and_stay_one_batch(parts):
    want, decoder, sizes, seqs = side_by_side(parts, random_prompts(6, seed=71))
    outs: list[list[int]] = [[] for _ in seqs]
    for _ in range(4):
        for out, gained in zip(outs, decoder.step(seqs), strict=True):
            out.extend(t.token for t in gained)
    for done in (1, 3):  # finished: their slots come back, below sequences still running
        decoder.release(seqs[done])
    rest = [0, 2, 4, 5]
    sizes.clear()
    while min(len(outs[i]) for i in rest) < NEW_TOKENS:
        for i, gained in zip(rest, decoder.step([seqs[i] for i in rest]), strict=True):
            outs[i].extend(t.token for t in gained)
    assert sorted(seqs[i].slot for i in rest) == [0, 1, 2, 3]  # moved into the freed slots 1 and 3
    assert set(sizes) == {4}  # every segment ran as one batch, no gap
    assert [outs[i][:NEW_TOKENS] for i in rest] == [want[i] for i in rest]  # the moved caches are intact
