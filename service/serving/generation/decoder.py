"""Token-level early exit over a batch of sequences, one decoding step at a time (iteration-level batching).

Every sequence keeps a KV cache per layer and, per layer l, `filled[l]`: how many of its positions
have keys and values there. They always form a prefix, and `filled` never grows with depth.

Skipped layers' KV (`kv_strategy`):
- `recompute` (default; EE-LLM/FREE-style, exact KV): a token that exits at layer e leaves its
  hidden state behind; the next token of that sequence that goes deeper carries every such pending
  position through the layers they skipped, as extra rows of the same layer calls. Decoding is
  memory-bound, so extra rows cost little, and the cache always holds what the full model would
  compute for the tokens emitted.
- `copy` (CALM): the exited hidden state is copied up, and each deeper layer's keys and values for
  that position are computed from it right away (norm + K/V projections only). Cheaper per exit,
  but the deep KV is an approximation that later tokens attend to.

An early exit may also sit after the final layer: its restricted-vocabulary head answers a sure
token without the full LM head (at batch 1 that head costs as much as ~11 layers). Such a token's
KV is complete; in exact mode its draft is verified from its stored final hidden state, in the
same LM-head pass as the other drafts.

Modes per sequence: `full` (every layer), `early` (leave at the first exit whose calibrated
agreement estimate reaches δ, decided by `Calibration.step`), `exact` (self-speculative: the same
rule drafts tokens; a token that goes to the last layer verifies every pending draft in that pass;
the verified prefix is kept and the first mismatch replaced by the full model's token, so the
output equals full greedy decoding). Exact mode always uses the `recompute` strategy. An exit stops
drafting for a sequence once its drafts there are kept less often than the share of a step they
cost (`_drafts_pay`): on text the heads do not suit, exact mode then costs what full depth costs.

Lookup drafts (`lookup.py`, greedy `early` and `exact` modes): where the last tokens occurred
earlier in the sequence (or else, with `lookup_history`, in the answers of finished requests), the
tokens that followed them are appended as drafts and fed in one step,
which goes full depth and keeps the prefix the full model agrees with (`_verify`). They cost no
layer to make; the tokens kept are the full model's own, so they meet any δ.

Caches: with fused segments, sequences take slots of one KV pool (`kv_pool.py`), so a decoding
step of several sequences (one row each) runs a segment as one batched call; a sequence that finds
no free slot, or is longer than the pool's slots, keeps a cache of its own.

The decoder decides and keeps the caches; a runner (`runners.py`: ONNX Runtime graphs over the
weights, or the torch modules) computes layers and heads.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from exitserve.calibration import Calibration
from exitserve.calibration.document import Deltas
from exitserve.models.llm.heads import ExitHeads, calibration_logits
from exitserve.models.llm.llama import LayerSpan, LlamaModel
from exitserve.models.llm.precision import Precision
from exitserve.service.serving.generation.kv_pool import KVPool
from exitserve.service.serving.generation.lookup import DEFAULT_NGRAM, AnswerHistory, lookup_draft
from exitserve.service.serving.generation.runners import RunnerKind, make_runner
from exitserve.service.serving.generation.stream import MAX_DRAFT, Mode, TokenOut

KV_STRATEGIES = ("recompute", "copy")
DRAFT_PRIOR = 4  # exact mode: drafts counted as kept before any is verified (`_drafts_pay`)
# lookup drafts, (kept, judged) assumed before any is verified (`lookup_length`): of first drafts, and
# of drafts after a kept one (a repeated passage usually goes on)
LOOKUP_PRIOR_FIRST, LOOKUP_PRIOR_FOLLOWING = (3, 4), (9, 10)
# drafts from the answer history, (hits, tries) assumed before any; below HISTORY_MIN_HITS of its tries
# keeping the first draft, a sequence stops asking it (text unlike the history's: its drafts are rejected,
# and in early mode a step with drafts goes full depth instead of leaving early)
HISTORY_PRIOR, HISTORY_MIN_HITS = (2, 4), 0.2
POOL_CAPACITY = 2048  # positions a KV pool slot holds by default: longer sequences keep caches of their own


@dataclass
class Sequence:
    """One generation stream's decoding state. Tokens past `fed` are inputs not yet run."""

    tokens: list[int]
    prompt_length: int = 0  # tokens[:prompt_length] is the prompt
    mode: Mode = "full"
    delta: float = 0.9
    policy: str = "pcee"
    temperature: float = 0.0
    max_draft: int = MAX_DRAFT
    generator: torch.Generator | None = None
    fed: int = 0
    filled: list[int] = field(default_factory=list)
    cache: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    slot: int | None = None  # its cache's slot in the decoder's KV pool (None: a cache of its own)
    h_last: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # sized by new_sequence
    verified: int = 0  # tokens[:verified] are answered (exact mode: the full model's), later ones drafts
    draft_exits: list[int] = field(default_factory=list)  # exit index of each draft
    drafted: int = 0
    accepted: int = 0
    looked_up: int = 0  # of `drafted`, drafts from lookup (`lookup.py`), and of `accepted`, those kept
    looked_up_accepted: int = 0
    looked_up_judged: int = 0  # lookup drafts the verification judged: the kept ones and each first rejected
    lookup_events: int = 0  # verifications of lookup drafts, and those that kept at least the first
    lookup_hits: int = 0
    history_events: int = 0  # the same for drafts from the answer history
    history_hits: int = 0
    from_history: bool = False  # the lookup drafts in flight came from the answer history
    # exact mode, per early exit: its drafts the verification judged (kept, or the first rejected) and kept
    exit_judged: list[int] = field(default_factory=list)
    exit_kept: list[int] = field(default_factory=list)

    @property
    def pending(self) -> int:
        """Positions that have not been through every layer (exited early)."""
        return self.fed - self.filled[-1] if self.filled else 0


def lookup_length(seq: Sequence, room: int, row_cost: float) -> int:
    """How many lookup drafts pay for this sequence: the length L ≤ room that gets the most tokens per
    unit of work, (1 + kept(L)) / (1 + L · row_cost). Lookup drafts are kept in runs (a repeated passage
    is copied until it ends), so kept(L) = p (1 + q + ... + q^(L-1)): p, the sequence's rate of keeping
    the first draft, q of keeping the next once one was kept (counted from `LOOKUP_PRIOR_*`). Where a
    row costs little (float32 on a CPU: the step reads every weight anyway) that is the whole room;
    where it costs half a step (int8 activations) one or two drafts, and none once they are rarely kept.
    The whole room while even an entirely rejected draft costs at most one step (room · row_cost ≤ 1):
    runs are longer than this model's tail, and shortening float32 drafts by it lost on WikiText-2
    prompts (development runs of `benchmarks/llm_lookup.py`)."""
    if room * row_cost <= 1.0:
        return room
    first = (seq.lookup_hits + LOOKUP_PRIOR_FIRST[0]) / (seq.lookup_events + LOOKUP_PRIOR_FIRST[1])
    following = (seq.looked_up_accepted - seq.lookup_hits + LOOKUP_PRIOR_FOLLOWING[0]) / \
        (seq.looked_up_judged - seq.lookup_events + LOOKUP_PRIOR_FOLLOWING[1])
    best, best_value, kept, run = 0, 1.0, 0.0, first
    for length in range(1, room + 1):
        kept += run
        run *= following
        value = (1.0 + kept) / (1.0 + length * row_cost)
        if value > best_value:
            best, best_value = length, value
    return best


def segments_between(exit_layers: list[int]) -> tuple[tuple[int, int], ...]:
    """(first, last) layers of each stretch between exits: what can run as one call when no exit is checked inside."""
    segments, first = [], 0
    for layer in sorted(set(exit_layers)):
        segments.append((first, layer))
        first = layer + 1
    return tuple(segments)


class MultiExitDecoder:
    """The model, its exit heads and calibration; `step` advances a batch of sequences by one iteration."""

    def __init__(self, model: LlamaModel, heads: ExitHeads | None, exit_layers: list[int],
                 calibration: Calibration | None, *, kv_strategy: str = "recompute", max_pending: int = 64,
                 compute_fractions: list[float] | None = None, runner: RunnerKind = "torch", threads: int = 1,
                 precision: Precision = "float32", int8_activations: bool = False, fuse_segments: bool = True,
                 lookup_ngram: int = DEFAULT_NGRAM, lookup_max_batch: int = 1, pool_slots: int = 16,
                 pool_capacity: int = POOL_CAPACITY, lookup_history: int = 0):
        if kv_strategy not in KV_STRATEGIES:
            raise ValueError(f"unknown kv strategy {kv_strategy!r}; choose from {', '.join(KV_STRATEGIES)}")
        if exit_layers[-1] != model.config.num_layers - 1:
            raise ValueError("the last exit must sit after the last layer")
        if heads is not None and len(heads.heads) != len(exit_layers) - 1:
            raise ValueError(f"{len(heads.heads)} heads for {len(exit_layers) - 1} early exits")
        self.model = model
        self.heads = heads.bind(model) if heads is not None else None
        self.exit_layers = list(exit_layers)
        self.exit_at = {layer: k for k, layer in enumerate(exit_layers[:-1])}
        self.calibration = calibration
        self.kv_strategy = kv_strategy
        self.max_pending = max_pending
        self.lookup_ngram = lookup_ngram  # longest n-gram looked up for drafts (0: no lookup drafts)
        # Lookup drafts only in steps of at most this many sequences: alone, a step reads every weight
        # for one row and extra rows are nearly free; in a batch the other sequences' rows already
        # share those reads and draft rows compete with them (vLLM's speculative_disable_by_batch_size).
        self.lookup_max_batch = lookup_max_batch
        # the latest answers (this many tokens), looked up when a sequence's own text has no match
        self.history = AnswerHistory(lookup_history, lookup_ngram) if lookup_history > 0 and lookup_ngram else None
        self.adaptive_drafts = True  # exact mode: an exit stops drafting where its drafts do not pay
        # what one more row adds to a one-row step, as a share of it (`measure_row_cost`); None: drafts
        # are as long as the room for them
        self.row_cost: float | None = None
        self.num_layers = model.config.num_layers
        self.device = model.model.embed_tokens.weight.device
        self.runner = make_runner(runner, model, self.heads, threads=threads, precision=precision,
                                  int8_activations=int8_activations,
                                  segments=segments_between(self.exit_layers) if fuse_segments else ())
        # share of the full model's FLOPs a token answered at each exit used (the manifest's, or layers)
        self.compute_fractions = compute_fractions or [(layer + 1) / self.num_layers for layer in exit_layers]
        # batched segments need the sequences' caches side by side; one position more than a slot's
        # sequence uses takes the throwaway rows of batch gaps (`_run_pooled_segment`)
        self.pool: KVPool | None = None
        if self.runner.segments and pool_slots > 1:
            self.pool = KVPool(model.config, pool_slots, min(pool_capacity, model.config.max_positions) + 1,
                               dtype=model.model.embed_tokens.weight.dtype, device=self.device)

    # --- sequences ------------------------------------------------------------------------------

    def new_sequence(self, prompt: list[int], capacity: int, **options) -> Sequence:
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        seq = Sequence(tokens=list(prompt), prompt_length=len(prompt), **options)
        if seq.mode != "full" and (self.heads is None or self.calibration is None):
            seq.mode = "full"  # a bundle without heads answers every token at the last layer
        seq.filled = [0] * self.num_layers
        seq.exit_judged, seq.exit_kept = [0] * (len(self.exit_layers) - 1), [0] * (len(self.exit_layers) - 1)
        if self.pool is not None and capacity < self.pool.capacity:
            seq.slot = self.pool.acquire(seq)
        seq.cache = self.pool.cache(seq.slot) if self.pool is not None and seq.slot is not None \
            else self.model.new_cache(capacity)
        seq.h_last = torch.zeros(capacity, self.model.config.hidden_size, dtype=seq.cache[0][0].dtype, device=self.device)
        seq.verified = len(prompt)
        return seq

    def measure_row_cost(self, rows: int = 8, repeats: int = 5) -> float:
        """Time a full-depth step of one new row and of 1 + `rows` rows (a scratch sequence, medians of
        `repeats`) and keep what each extra row adds, as a share of the one-row step (`row_cost`)."""
        prefix = [0] * 16
        seq = self.new_sequence(prefix, capacity=len(prefix) + rows + 2, mode="full")
        self.step([seq])
        times: dict[int, float] = {}
        for width in (1, 1 + rows):
            spent = []
            for _ in range(repeats):
                seq.tokens[seq.fed:] = [0] * width  # the step feeds tokens past `fed`, full depth
                began = time.perf_counter()
                self.step([seq])
                spent.append(time.perf_counter() - began)
                del seq.tokens[len(prefix) + 1:]  # back to the prefix and its first answer token
                seq.fed, seq.verified = len(prefix), len(prefix) + 1
                seq.filled = [len(prefix)] * self.num_layers
            times[width] = statistics.median(spent)
        self.release(seq)
        self.row_cost = max(0.0, (times[1 + rows] - times[1]) / rows / times[1])
        return self.row_cost

    def remember(self, seq: Sequence) -> None:
        """Keep a finished sequence's answer for lookup drafts of later ones (`AnswerHistory`)."""
        if self.history is not None:
            self.history.add(seq.tokens[seq.prompt_length:seq.verified])

    def release(self, seq: Sequence) -> None:
        """Give the sequence's pool slot back (it is done: its cache is not read again); a slot whose
        sequence is dropped without this comes back when the sequence is garbage."""
        if self.pool is not None and seq.slot is not None:
            self.pool.release(seq.slot)
            seq.slot = None
            seq.cache = []

    def can_fire(self, seq: Sequence, exit_index: int) -> bool:
        """Whether exit `exit_index` can let this sequence leave at all (`Calibration.firing_exits`, as
        the classifiers' engine asks it): a head whose tables never reach δ is not computed."""
        if self.calibration is None:  # new_sequence sends such bundles full depth
            return False
        return bool(self.calibration.firing_exits_at(seq.policy, seq.delta)[exit_index])

    # --- one iteration --------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, batch: list[Sequence]) -> list[list[TokenOut]]:
        """Run every sequence's unfed tokens; return the tokens each one gained (verified ones in exact mode)."""
        out: list[list[TokenOut]] = [[] for _ in batch]
        self._compact(batch)
        if len(batch) <= self.lookup_max_batch:
            for seq in batch:
                self._draft_by_lookup(seq)
        # per sequence: first row position of its current rows and the end (exclusive)
        starts = [s.fed for s in batch]
        ends = [len(s.tokens) for s in batch]
        checks = [self._checks_exits(s) for s in batch]
        xs = [self.model.embed(torch.tensor(s.tokens[s.fed:], dtype=torch.int64, device=self.device)) for s in batch]
        active = list(range(len(batch)))
        layer_index = -1
        while active and layer_index + 1 < self.num_layers:
            layer_index += 1
            for i in active:
                seq = batch[i]
                first = seq.filled[layer_index]
                if first < starts[i]:  # pending positions join with the hidden state they exited with
                    xs[i] = torch.cat([seq.h_last[first:starts[i]], xs[i]])
                    starts[i] = first
            last = self._segment_end(layer_index, batch, active, starts, ends)
            if last > layer_index:
                self._run_segment(layer_index, last, batch, active, starts, ends, xs)
                layer_index = last
            else:
                xs = self._run_layer(layer_index, batch, active, starts, ends, xs)
            exit_index = self.exit_at.get(layer_index)
            if exit_index is None:
                continue
            asking = [i for i in active if checks[i] and self.can_fire(batch[i], exit_index)
                      and self._drafts_pay(batch[i], exit_index)]
            if not asking:
                continue
            leaving = self._decide(exit_index, [batch[i] for i in asking], [xs[i][-1] for i in asking])
            for i, left in zip(asking, leaving, strict=True):
                if left is None:
                    continue
                self._exited(batch[i], exit_index, layer_index, starts[i], ends[i], xs[i], *left, out[i])
                active.remove(i)
        if active:
            self._finish(batch, active, starts, ends, xs, out)
        return out

    def _compact(self, batch: list[Sequence]) -> None:
        """Move sequences from the highest pool slots into free slots below them, so that the running
        ones stay side by side (a pooled segment takes consecutive slots): when sequences of a batch
        finish at different times, the rest would otherwise decode around their gaps. A move copies the
        positions the sequence has filled, every layer (a fraction of a decoding step)."""
        if self.pool is None:
            return
        for seq in sorted((s for s in batch if s.slot is not None), key=lambda s: s.slot or 0, reverse=True):
            free = self.pool.lowest_free()
            if free is None or seq.slot is None or free > seq.slot:
                return
            self.pool.move(seq, seq.slot, free, seq.filled[0])
            seq.slot, seq.cache = free, self.pool.cache(free)

    def _segment_end(self, layer_index: int, batch: list[Sequence], active: list[int], starts: list[int],
                     ends: list[int]) -> int:
        """The last layer of the fused segment this step can run from `layer_index` (itself: none).

        Only when no pending position would join inside the segment (a sequence's rows are the same at
        every layer of it: `filled` is the same at its first and last layer); for several sequences,
        only as one pooled batch (`_pool_together`)."""
        last = self.runner.segments.get(layer_index, layer_index)
        if last == layer_index or any(batch[i].filled[last] != batch[i].filled[layer_index] for i in active):
            return layer_index
        return last if len(active) == 1 or self._pool_together(batch, active, starts, ends) else layer_index

    def _pool_together(self, batch: list[Sequence], active: list[int], starts: list[int], ends: list[int]) -> bool:
        """Whether these sequences can run as one pooled batch: one row each, every one in the pool,
        and gaps (slots between theirs of sequences not in it) at most a quarter of their number,
        since each gap costs a throwaway row."""
        slots = [slot for i in active if (slot := batch[i].slot) is not None]
        if len(slots) != len(active) or any(ends[i] - starts[i] != 1 for i in active):
            return False
        return max(slots) + 1 - min(slots) - len(active) <= len(active) // 4

    def _drafts_pay(self, seq: Sequence, exit_index: int) -> bool:
        """Exact mode: an exit drafts while its drafts are kept at least as often as the share of a full
        step they cost (a kept draft saves about 1 - f of a step, a rejected one wastes about f), counted
        per sequence from an optimistic start (`DRAFT_PRIOR` drafts kept), so an exit whose drafts the
        text does not suit stops drafting for that sequence."""
        if seq.mode != "exact" or not self.adaptive_drafts:
            return True
        kept, judged = seq.exit_kept[exit_index], seq.exit_judged[exit_index]
        return (kept + DRAFT_PRIOR) / (judged + DRAFT_PRIOR) >= self.compute_fractions[exit_index]

    def _draft_by_lookup(self, seq: Sequence) -> None:
        """Append the tokens that followed the last n tokens' latest earlier occurrence. They feed in
        this step, so it goes full depth and verifies them with any exit drafts before them (greedy
        only: sampling would need rejection sampling)."""
        if (seq.mode == "full" or seq.temperature > 0.0 or self.lookup_ngram == 0 or seq.fed == 0
                or len(seq.tokens) - seq.fed != 1):
            return
        room = seq.max_draft - (len(seq.tokens) - seq.verified)  # drafts in flight stay within max_draft
        if self.row_cost is not None:
            room = lookup_length(seq, room, self.row_cost)
        draft = lookup_draft(seq.tokens, room, self.lookup_ngram)
        seq.from_history = False
        if not draft and self.history is not None and \
                (seq.history_hits + HISTORY_PRIOR[0]) / (seq.history_events + HISTORY_PRIOR[1]) >= HISTORY_MIN_HITS:
            draft = self.history.draft(seq.tokens, room)
            seq.from_history = bool(draft)
        seq.tokens.extend(draft)
        seq.drafted += len(draft)
        seq.looked_up += len(draft)
        seq.draft_exits.extend([len(self.exit_layers) - 1] * len(draft))  # verified at full depth

    def _checks_exits(self, seq: Sequence) -> bool:
        if seq.mode == "full" or seq.fed == 0 or len(seq.tokens) - seq.fed != 1:
            return False  # prefill and multi-token feeds go full depth
        if seq.mode == "exact":
            return len(seq.tokens) - seq.verified < seq.max_draft
        return seq.pending < self.max_pending

    def _run_layer(self, layer_index: int, batch: list[Sequence], active: list[int], starts: list[int],
                   ends: list[int], xs: list[torch.Tensor]) -> list[torch.Tensor]:
        spans, row = [], 0
        for i in active:
            n = ends[i] - starts[i]
            keys, values = batch[i].cache[layer_index]
            spans.append(LayerSpan.starting_at((row, row + n), starts[i], keys, values))
            row += n
        x = torch.cat([xs[i] for i in active]) if len(active) > 1 else xs[active[0]]
        y = self.runner.layer(layer_index, x, spans)
        for i, span in zip(active, spans, strict=True):
            xs[i] = y[span.rows[0]:span.rows[1]]
            batch[i].filled[layer_index] = ends[i]
        return xs

    def _run_segment(self, first: int, last: int, batch: list[Sequence], active: list[int], starts: list[int],
                     ends: list[int], xs: list[torch.Tensor]) -> None:
        """Layers first..last for the active sequences as one fused call (`_segment_end` said they can)."""
        if len(active) == 1:
            i = active[0]
            xs[i] = self.runner.segment(first, last, xs[i], [starts[i]], batch[i].cache)
        else:
            self._run_pooled_segment(first, last, batch, active, starts, xs)
        for i in active:
            batch[i].filled[first:last + 1] = [ends[i]] * (last + 1 - first)

    def _run_pooled_segment(self, first: int, last: int, batch: list[Sequence], active: list[int],
                            starts: list[int], xs: list[torch.Tensor]) -> None:
        """One row per sequence, in slot order; a gap slot gets a throwaway row written where its
        own sequence (if any) has nothing yet: at its first unfilled position, which that sequence
        writes again before it reads it (or one past the slot's use: the pool keeps a spare)."""
        pool = self.pool
        at_slot = {slot: i for i in active if (slot := batch[i].slot) is not None}
        if pool is None or len(at_slot) != len(active):
            raise RuntimeError("a pooled segment needs every sequence in the KV pool")
        lowest, highest = min(at_slot), max(at_slot)
        rows, positions = [], []
        for slot in range(lowest, highest + 1):
            i = at_slot.get(slot)
            if i is not None:
                rows.append(xs[i])
                positions.append(starts[i])
                continue
            owner = pool.owner(slot)
            rows.append(torch.zeros_like(xs[active[0]]))
            positions.append(min(owner.filled[first], pool.capacity - 1) if isinstance(owner, Sequence) else 0)
        y = self.runner.segment(first, last, torch.cat(rows), positions, pool.batch(lowest, highest))
        for slot, i in at_slot.items():
            xs[i] = y[slot - lowest:slot - lowest + 1]

    def _decide(self, exit_index: int, seqs: list[Sequence], last_rows: list[torch.Tensor]
                ) -> list[tuple[int, bool] | None]:
        """(token, target met) for each sequence that leaves at this exit, None for those that go on."""
        heads, calibration = self._exit_tables()
        logits = self.runner.head_logits(exit_index, torch.stack(last_rows))
        host = logits.float().cpu().numpy()
        scores = calibration_logits(host, heads.vocab_size)
        columns = scores.argmax(axis=1)  # past the vocabulary: the head's outside estimate is on top
        leaving: list[tuple[int, bool] | None] = [None] * len(seqs)
        for policy in {s.policy for s in seqs}:
            rows = [j for j, s in enumerate(seqs) if s.policy == policy]
            deltas = Deltas.checked_elsewhere([seqs[j].delta for j in rows])  # each checked when its request was parsed
            decision = calibration.step(policy, exit_index, scores[rows], deltas)
            for j, leave, met in zip(rows, decision.exit_now, decision.target_met, strict=True):
                if leave and columns[j] < heads.vocab_size:
                    column = self._pick(seqs[j], int(columns[j]), logits[j, :heads.vocab_size])
                    leaving[j] = int(heads.vocab[column]), bool(met)
        return leaving

    def _exit_tables(self) -> tuple[ExitHeads, Calibration]:
        if self.heads is None or self.calibration is None:  # new_sequence sends such bundles full depth
            raise RuntimeError("this bundle has no exit heads")
        return self.heads, self.calibration

    def _pick(self, seq: Sequence, greedy: int, logits: torch.Tensor) -> int:
        """The greedy token (already read back to the host) or, with a temperature, a sample from `logits`."""
        if seq.temperature <= 0.0:
            return greedy
        probs = torch.softmax(logits.float() / seq.temperature, dim=-1)
        return int(torch.multinomial(probs.cpu(), 1, generator=seq.generator))

    def _exited(self, seq: Sequence, exit_index: int, layer_index: int, start: int, end: int, x: torch.Tensor,
                token: int, target_met: bool, out: list[TokenOut]) -> None:
        if self.kv_strategy == "copy" and seq.mode == "early":
            self._copy_up(seq, layer_index, start, end, x)
        else:
            seq.h_last[start:end] = x
        seq.fed = end
        seq.tokens.append(token)
        if seq.mode == "exact":
            seq.drafted += 1
            seq.draft_exits.append(exit_index)
        else:
            seq.verified = len(seq.tokens)
            out.append(TokenOut(token, exit_index, target_met=target_met))

    def _copy_up(self, seq: Sequence, layer_index: int, start: int, end: int, x: torch.Tensor) -> None:
        """CALM: deeper layers' keys and values for these positions from the exited hidden state."""
        positions = torch.arange(start, end, device=self.device)
        for deeper in range(layer_index + 1, self.num_layers):
            k, v = self.runner.key_value(deeper, x, positions)
            keys, values = seq.cache[deeper]
            keys[:, start:end] = k.transpose(0, 1)
            values[:, start:end] = v.transpose(0, 1)
            seq.filled[deeper] = end

    def _finish(self, batch: list[Sequence], active: list[int], starts: list[int], ends: list[int],
                xs: list[torch.Tensor], out: list[list[TokenOut]]) -> None:
        last_exit = len(self.exit_layers) - 1
        verify = [len(batch[i].tokens) > batch[i].verified for i in active]  # exact mode's drafts, or lookup drafts
        rows = []
        for i, v in zip(active, verify, strict=True):
            if not v:
                rows.append(xs[i][-1:])
                continue
            # drafts that left after the final layer have complete KV and are not re-run: their rows
            # are the final hidden states stored when they left
            first = min(batch[i].verified - 1, starts[i])
            if first < starts[i]:
                xs[i] = torch.cat([batch[i].h_last[first:starts[i]], xs[i]])
                starts[i] = first
            rows.append(xs[i])
        logits = self.runner.lm_logits(torch.cat(rows))
        greedy = logits.argmax(-1).tolist()  # one read for the whole batch: on a GPU each read waits for the device
        offset = 0
        for i, v, r in zip(active, verify, rows, strict=True):
            seq, end = batch[i], offset + r.shape[0]
            if v:
                self._verify(seq, starts[i], ends[i], greedy[offset:end], out[i], last_exit)
                offset = end
                continue
            token = self._pick(seq, greedy[end - 1], logits[end - 1])
            offset = end
            seq.fed = ends[i]
            seq.tokens.append(token)
            seq.verified = len(seq.tokens)
            out[i].append(TokenOut(token, last_exit))

    def _verify(self, seq: Sequence, start: int, end: int, greedy: list[int], out: list[TokenOut], last_exit: int) -> None:
        """Keep the drafts the full model agrees with; replace the first one it does not.

        Row `offset` is position start + offset; its full-model prediction is the token of the next
        position. tokens[verified:] are drafts; earlier tokens are answered already."""
        for offset, position in enumerate(range(start, end)):
            following = position + 1
            if following < seq.verified:
                continue
            if following < end and greedy[offset] == seq.tokens[following]:
                continue
            # first mismatch (or the end): keep tokens[:following], drop later drafts and their KV
            drafts = len(seq.tokens) - seq.verified
            accepted = seq.tokens[seq.verified:following]
            exits = seq.draft_exits[: len(accepted)]
            del seq.tokens[following:]
            seq.filled = [min(f, following) for f in seq.filled]
            seq.fed = following
            seq.tokens.append(greedy[offset])
            seq.accepted += len(accepted)
            kept_lookup = exits.count(last_exit)  # only lookup drafts carry the last exit
            seq.looked_up_accepted += kept_lookup
            judged = exits + seq.draft_exits[len(accepted):len(accepted) + 1]  # later drafts are not judged
            looked_up = judged.count(last_exit)
            seq.looked_up_judged += looked_up
            if looked_up:  # lookup drafts follow any exit drafts: the first of them was kept if any was
                hit = int(kept_lookup > 0)
                seq.lookup_events += 1
                seq.lookup_hits += hit
                if seq.from_history:
                    seq.history_events += 1
                    seq.history_hits += hit
            for k, exit_index in enumerate(judged):
                if exit_index != last_exit:
                    seq.exit_judged[exit_index] += 1
                    seq.exit_kept[exit_index] += int(k < len(accepted))
            out.extend(TokenOut(t, e, True) for t, e in zip(accepted, exits, strict=True))
            out.append(TokenOut(greedy[offset], last_exit, rejected=drafts - len(accepted)))
            seq.verified = len(seq.tokens)
            seq.draft_exits = []
            return
        raise AssertionError("verification always ends at the last row")
