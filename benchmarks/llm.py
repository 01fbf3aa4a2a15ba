"""Token-level early exit on a generation bundle (SmolLM2-135M-Instruct): quality per δ and decoding speed.

    python benchmarks/llm.py BUNDLE --quality --speed --hf --hf-early-exit 8 --concurrency --prompts 100 --new-tokens 64

quality: teacher-forced on WikiText-2 `test` (hidden states cached once): per δ and policy, the
         agreement of promised tokens with the full model, coverage (share of tokens answered
         early), mean decoder layers per token; exit decisions by `decide_all` (= the engine's rule).
speed:   greedy generation, one stream, in the same engine: full depth, early exit at each δ, exact
         mode (and whether its output equals full depth), Hugging Face `generate` greedy on the
         same weights (`--hf`, needs the llm-convert extra) and `generate(assistant_early_exit=k)`
         (`--hf-early-exit k`, on the first `--hf-early-exit-prompts` prompts: it is slow); then
         1/4/16 concurrent streams through the scheduler (the server's engine thread); exit-check
         costs (full LM head vs restricted head vs one layer) at batch 1.
Writes benchmarks/results/llm.json; prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from exitserve.calibration import Calibration, decide_all
from exitserve.models.bundle import load_bundle
from exitserve.models.llm.head_training import head_logits
from exitserve.models.llm.heads import calibration_logits, one_hot_logits, vocab_index
from exitserve.models.llm.hidden_cache import HiddenCache, cache_hidden, text_tokens
from exitserve.service.serving.generation.decoder import MultiExitDecoder
from exitserve.service.serving.generation.model import GenerationModel
from exitserve.service.serving.generation.runners import RUNNERS

DELTAS = (0.7, 0.8, 0.9, 0.95)
POLICIES = ("pcee", "pcee-lb", "pcee-lb-cond", "pcee-lb-tail", "per-exit-threshold")
EXACT_DRAFT_DELTAS = (0.5, 0.8)
SPEED_POLICY = "pcee-lb-cond"  # the early-exit rows' policy unless --policy says another (reports up to now)
RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text" / "wikitext-2"


def test_cache(gm: GenerationModel, data: Path, tokens: int, cache_dir: Path) -> HiddenCache:
    """Hidden states of the first `tokens` of WikiText-2 test at the bundle's exit layers (cached once)."""
    layers = gm.spec.exit_layers[:-1]
    path = cache_dir / f"{gm.name}-test-0-{tokens}-{'_'.join(map(str, layers))}.pt"
    found = [c for c in map(HiddenCache.load, sorted(cache_dir.glob(f"{gm.name}-test-0-{tokens}-*.pt")))
             if set(layers) <= set(c.layers)]
    if found:
        return found[0]
    cache = cache_hidden(gm.model, text_tokens(gm.tokenizer, data / "test.txt", limit=tokens), layers)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache.save(path)
    return cache


def exit_logits(gm: GenerationModel, cache: HiddenCache) -> list[np.ndarray]:
    """Every exit's logits in the calibration class space, the full model last (one-hot at its token)."""
    heads = gm.decoder.heads
    assert heads is not None
    vocab = heads.vocab.numpy()
    per_exit = [calibration_logits(head_logits(heads, k, cache.hidden[layer]), vocab.size)
                for k, layer in enumerate(gm.spec.exit_layers[:-1])]
    per_exit.append(one_hot_logits(vocab_index(vocab, gm.model.config.vocab_size)[cache.full_argmax.numpy()],
                                   vocab.size))
    return per_exit


def decision_row(gm: GenerationModel, per_exit: list[np.ndarray], full: np.ndarray, policy: str,
                 delta: float) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """The promise as served at one policy and δ (decisions by `decide_all`, the engine's rule), and
    per token: its exit index, whether it agrees with the full model, whether it was promised."""
    heads = gm.decoder.heads
    assert heads is not None and gm.calibration is not None
    vocab = heads.vocab.numpy()
    exit_layers = np.asarray([layer + 1 for layer in gm.spec.exit_layers])
    d = decide_all(gm.calibration, policy, per_exit, delta)
    early = d.exit_index < len(exit_layers) - 1
    token = np.where(early, vocab[np.minimum(d.prediction, vocab.size - 1)], full)
    agree = (token == full) & ~(early & (d.prediction >= vocab.size))  # "outside" names no token
    promised = d.target_met
    row = {
        "policy": policy, "delta": delta, "tokens": int(full.size),
        "promised_agreement": float(agree[promised].mean()) if promised.any() else float("nan"),
        "promised_tokens": int(promised.sum()), "promised_agreeing": int(agree[promised].sum()),
        "early_agreement": float(agree[early].mean()) if early.any() else float("nan"),
        "agreement": float(agree.mean()), "coverage_early": float(early.mean()),
        "promised_share": float(promised.mean()),
        "mean_layers": float(exit_layers[d.exit_index].mean()),
        # tokens that needed the full LM head (an exit after the final layer answers without it)
        "full_head_share": float((d.exit_index == len(exit_layers) - 1).mean()),
    }
    return row, d.exit_index, agree, promised


def quality(gm: GenerationModel, data: Path, tokens: int, cache_dir: Path) -> list[dict]:
    cache = test_cache(gm, data, tokens, cache_dir)
    layers = gm.spec.exit_layers[:-1]
    full = cache.full_argmax.numpy()
    per_exit = exit_logits(gm, cache)
    target_logp = _target_log_probs(gm, cache, text_tokens(gm.tokenizer, data / "test.txt", limit=tokens), layers)
    rows = []
    for policy in POLICIES:
        for delta in DELTAS:
            row, exit_index, _, _ = decision_row(gm, per_exit, full, policy, delta)
            row["perplexity"] = _perplexity(target_logp[exit_index, np.arange(full.size)])
            row["perplexity_full"] = _perplexity(target_logp[-1])
            rows.append(row)
    return rows


@torch.inference_mode()
def _target_log_probs(gm: GenerationModel, cache: HiddenCache, ids: np.ndarray, layers: list[int],
                      context: int = 512) -> np.ndarray:
    """[exits, tokens] log-probability each exit gives the actual next token, over the FULL vocabulary.

    An early exit's head ends in the model's final norm and scores tokens by their (tied) embedding
    rows; its restricted vocabulary is those rows for the K most frequent tokens. For perplexity the
    same features are scored against every row (the full LM head on the exit's hidden state), so a
    token outside the K still gets its probability. The last position of each cached chunk has no next
    token in that chunk: NaN, left out of perplexity."""
    heads, model = gm.decoder.heads, gm.model
    weight = model.lm_head.weight
    n = cache.size
    nxt = np.full(n, -1, dtype=np.int64)
    for first in range(0, n, context):
        last = min(first + context, n)
        nxt[first: last - 1] = ids[first + 1: last]
    out = np.full((len(layers) + 1, n), np.nan, dtype=np.float64)
    has = nxt >= 0
    target = torch.from_numpy(np.where(has, nxt, 0))
    for k in range(len(layers) + 1):
        for a in range(0, n, 1024):
            b = min(a + 1024, n)
            if k < len(layers):
                hidden = cache.hidden[layers[k]][a:b].float()
                logits = heads.exit_heads[k].features(hidden) @ weight.T
            else:
                logits = model.logits(cache.hidden[model.config.num_layers - 1][a:b].float())
            logp = torch.log_softmax(logits, dim=-1).gather(1, target[a:b, None])[:, 0]
            out[k, a:b] = np.where(has[a:b], logp.numpy(), np.nan)
    return out


def _perplexity(logp: np.ndarray) -> float:
    return float(np.exp(-np.nanmean(logp)))


def wikitext_prompts(gm: GenerationModel, data: Path, count: int, length: int = 24) -> list[list[int]]:
    lines = [line.strip() for line in (data / "test.txt").read_text().splitlines()
             if len(line.split()) > 30 and not line.strip().startswith("=")]
    return [gm.encode(" " + line)[:length] for line in lines[:count]]


def generate(gm: GenerationModel, prompt: list[int], new_tokens: int, kv: str = "recompute",
             decoder: MultiExitDecoder | None = None, **options) -> tuple[list[int], list[int], float, object]:
    """(tokens, exits, decoding tokens/s with the prefill excluded, sequence state); the served
    decoder unless another (the other runner over the same weights) is given."""
    decoder = decoder or gm.decoder
    decoder.kv_strategy = kv
    seq = decoder.new_sequence(prompt, capacity=len(prompt) + new_tokens + 16, **options)
    first = decoder.step([seq])[0]  # the prefill yields the first token
    tokens, exits = [t.token for t in first], [t.exit for t in first]
    start = time.perf_counter()
    while len(tokens) < new_tokens:
        for t in decoder.step([seq])[0]:
            tokens.append(t.token)
            exits.append(t.exit)
    rate = (len(tokens) - len(first)) / (time.perf_counter() - start)
    decoder.kv_strategy = "recompute"
    return tokens[:new_tokens], exits[:new_tokens], rate, seq


def speed(gm: GenerationModel, prompts: list[list[int]], new_tokens: int, hf: bool, hf_early_exit: int = 0,
          hf_early_exit_prompts: int = 0, calm: bool = False, budget_s: float = 0.0,
          other_runner: MultiExitDecoder | None = None, policy: str = SPEED_POLICY) -> dict:
    """Configurations interleaved per prompt, so that load changes on a shared machine hit all alike;
    with `budget_s`, no new prompt starts after that many seconds (the prompts run are recorded)."""
    began = time.perf_counter()
    configs: dict[str, dict] = {"full": {"mode": "full"}}
    if other_runner is not None:
        configs["full, other runner"] = {"mode": "full", "decoder": other_runner}
    for delta in DELTAS:
        configs[f"early δ={delta}"] = {"mode": "early", "delta": delta, "policy": policy}
    if calm:
        configs["early δ=0.9, CALM copy KV"] = {"mode": "early", "delta": 0.9, "policy": policy, "kv": "copy"}
    for draft in EXACT_DRAFT_DELTAS:
        configs[f"exact (draft δ={draft})"] = {"mode": "exact", "delta": draft, "policy": "pcee", "max_draft": 8}
    names = list(configs)
    hf_model = _hf_model() if hf or hf_early_exit else None
    if hf_model is not None and hf:
        names.append("hf generate")
    early_exit_name = f"hf generate(assistant_early_exit={hf_early_exit})"
    if hf_model is not None and hf_early_exit:
        names.append(early_exit_name)
    stats = {name: {"rates": [], "ratios": [], "same": 0, "prefix": [], "layers": [], "drafted": 0, "accepted": 0,
                    "prompts": 0} for name in names}
    generate(gm, prompts[0], 4, mode="full")  # warm
    for i, prompt in enumerate(prompts):
        if budget_s and time.perf_counter() - began > budget_s:
            print(f"  time budget spent: {i} of {len(prompts)} prompts run", flush=True)
            break
        full_tokens: list[int] = []
        full_rate = 0.0
        for name, options in configs.items():
            tokens, exits, rate, seq = generate(gm, prompt, new_tokens, **options)
            if name == "full":
                full_tokens, full_rate = tokens, rate
            _record(stats[name], tokens, full_tokens, rate, full_rate)
            stats[name]["layers"].extend(gm.spec.exit_layers[e] + 1 for e in exits)
            stats[name]["drafted"] += seq.drafted
            stats[name]["accepted"] += seq.accepted
        if hf_model is not None and hf:
            tokens, rate = _hf_generate(hf_model, prompt, new_tokens)
            _record(stats["hf generate"], tokens, full_tokens, rate, full_rate)
        if hf_model is not None and hf_early_exit and i < hf_early_exit_prompts:
            tokens, rate = _hf_generate(hf_model, prompt, new_tokens, assistant_early_exit=hf_early_exit)
            _record(stats[early_exit_name], tokens, full_tokens, rate, full_rate)
        print(f"  prompt {i + 1}/{len(prompts)}: " + ", ".join(
            f"{name} {stats[name]['rates'][-1]:.1f}" for name in stats if stats[name]["rates"]), flush=True)
    out = {}
    for name, st in stats.items():
        if not st["rates"]:
            continue
        out[name] = {"prompts": st["prompts"], "tokens_per_s_median": statistics.median(st["rates"]),
                     "ratio_to_full_median": statistics.median(st["ratios"]),
                     "identical_to_full": st["same"] / st["prompts"],
                     "prefix_equal_to_full": float(np.mean(st["prefix"])),
                     "mean_layers": float(np.mean(st["layers"])) if st["layers"] else None,
                     "draft_acceptance": st["accepted"] / st["drafted"] if st["drafted"] else None}
        print(f"  {name}: {out[name]}", flush=True)
    return out


def _record(st: dict, tokens: list[int], full_tokens: list[int], rate: float, full_rate: float) -> None:
    st["rates"].append(rate)
    st["ratios"].append(rate / full_rate)  # same prompt, back to back
    st["prompts"] += 1
    st["same"] += tokens == full_tokens
    # free generation diverges after the first differing token: the share before it
    first = next((j for j, (a, b) in enumerate(zip(tokens, full_tokens, strict=True)) if a != b), len(tokens))
    st["prefix"].append(first / len(tokens))


def _hf_model():
    from exitserve.models.llm.convert import load_hf, smollm2_gguf

    return load_hf(smollm2_gguf())[0]


def _hf_generate(model, prompt: list[int], new_tokens: int, **options) -> tuple[list[int], float]:
    """Hugging Face `generate`, greedy; decoding tokens/s with the prefill (a 1-token generate) subtracted."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **options)
        seconds = time.perf_counter() - start - prefill
    return out[0, len(prompt):].tolist(), (new_tokens - 1) / seconds


def concurrency(gm: GenerationModel, prompts: list[list[int]], new_tokens: int, streams: int, options: dict) -> dict:
    """`streams` requests submitted together to the scheduler (the server's engine thread, continuous
    batching); aggregate tokens/s and inter-token latency per token (gap between a stream's events /
    tokens in the event, as the server's histogram counts it), prefill and first token excluded."""
    import asyncio

    from exitserve.service.serving.generation.stream import GenerationParams

    async def run() -> tuple[float, list[float], int]:
        loop = asyncio.get_running_loop()
        handles = [gm.scheduler.submit(GenerationParams(prompt=prompts[i % len(prompts)], max_tokens=new_tokens,
                                                        temperature=0.0, **options), loop) for i in range(streams)]

        async def read(stream) -> tuple[list[float], int, float, float]:
            gaps, last, count, first_at = [], None, 0, 0.0
            while True:
                event = await stream.queue.get()
                now = time.perf_counter()
                if event.tokens:
                    if last is None:
                        first_at = now
                    else:
                        gaps.extend([(now - last) / len(event.tokens)] * len(event.tokens))
                    last = now
                    count += len(event.tokens)
                if event.finish_reason is not None:
                    return gaps, count, first_at, now

        results = await asyncio.gather(*(read(h) for h in handles))
        start, end = max(r[2] for r in results), max(r[3] for r in results)
        tokens = sum(len(r[0]) for r in results)
        return end - start, [g for r in results for g in r[0]], tokens

    seconds, gaps, tokens = asyncio.run(run())
    return {"streams": streams, "mode": options, "tokens_per_s": tokens / seconds,
            "itl_p50_ms": 1000 * float(np.percentile(gaps, 50)), "itl_p99_ms": 1000 * float(np.percentile(gaps, 99))}


@torch.inference_mode()
def check_costs(gm: GenerationModel, reps: int = 50) -> dict:
    """Batch-1 costs through the served runner, each call repeated (its weights warm in cache: a
    decoding step reads every weight once, so there a layer costs more, see llm_runner.py)."""
    from exitserve.models.llm.llama import LayerSpan

    model, runner = gm.model, gm.decoder.runner
    x = torch.randn(1, model.config.hidden_size)
    cache = model.new_cache(64)

    def med(fn) -> float:
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1000 * float(np.median(times))

    return {"layer_ms": med(lambda: runner.layer(5, x, [LayerSpan.starting_at((0, 1), 10, *cache[5])])),
            "full_lm_head_ms": med(lambda: runner.lm_logits(x)),
            "restricted_head_ms": med(lambda: runner.head_logits(0, x)) if gm.decoder.heads is not None else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--hf", action="store_true")
    parser.add_argument("--hf-early-exit", type=int, default=0, help="also generate(assistant_early_exit=K)")
    parser.add_argument("--hf-early-exit-prompts", type=int, default=8, help="prompts for the (slow) row above")
    parser.add_argument("--calm", action="store_true", help="also the CALM copy-KV strategy at δ 0.9")
    parser.add_argument("--concurrency-tokens", type=int, default=32, help="new tokens per stream there")
    parser.add_argument("--budget-s", type=float, default=0.0, help="speed: start no prompt after this (0: all)")
    parser.add_argument("--concurrency", action="store_true")
    parser.add_argument("--test-tokens", type=int, default=8192)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runner", choices=RUNNERS, default="onnxruntime", help="the served decoder's runner")
    parser.add_argument("--policy", default=SPEED_POLICY,
                        help="early-exit policy of the speed and concurrency rows (the server's default is pcee-lb-tail)")
    parser.add_argument("--compare-runner", action="store_true",
                        help="speed: also full depth on the other runner over the same weights")
    parser.add_argument("--cache", default="runs/cache/llm-hidden")
    parser.add_argument("--out", default=str(RESULTS / "llm.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from prometheus_client import CollectorRegistry

    # no answer history: the benchmark asks the same prompts again, which the history would answer from memory
    gm = GenerationModel(load_bundle(args.bundle), CollectorRegistry(), runner=args.runner, threads=args.threads,
                         lookup_history=0)
    assert isinstance(gm.calibration, Calibration)
    other = None
    if args.compare_runner:
        other = MultiExitDecoder(gm.model, gm.decoder.heads, gm.spec.exit_layers, gm.calibration,
                                 runner=next(r for r in RUNNERS if r != args.runner), threads=args.threads)
    result: dict = {"bundle": gm.name, "exit_layers": gm.spec.exit_layers, "threads": args.threads,
                    "runner": args.runner,
                    "args": vars(args), "check_costs": check_costs(gm)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each part: a run stopped by its time limit keeps what it measured
        out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"exit layers {gm.spec.exit_layers}; exit check costs {result['check_costs']}", flush=True)
    if args.quality:
        result["quality"] = quality(gm, Path(args.data), args.test_tokens, Path(args.cache))
        print("| policy | δ | promised agreement | early-exit agreement | coverage (early) | mean layers | "
              "full LM head | perplexity (full model) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in result["quality"]:
            print(f"| {r['policy']} | {r['delta']} | {r['promised_agreement']:.3f} | {r['early_agreement']:.3f} | "
                  f"{r['coverage_early']:.3f} | {r['mean_layers']:.1f} | {r['full_head_share']:.3f} | "
                  f"{r['perplexity']:.2f} ({r['perplexity_full']:.2f}) |")
        save()
    if args.speed:
        prompts = wikitext_prompts(gm, Path(args.data), args.prompts)
        result["speed"] = speed(gm, prompts, args.new_tokens, args.hf, args.hf_early_exit, args.hf_early_exit_prompts,
                                args.calm, args.budget_s, other, args.policy)
        save()
    if args.concurrency:
        prompts = wikitext_prompts(gm, Path(args.data), 16)
        gm.scheduler.start()
        result["concurrency"] = []
        for n in (1, 4, 16):
            for options in ({"mode": "full"}, {"mode": "early", "delta": 0.9, "policy": args.policy},
                            {"mode": "exact", "delta": 0.8, "policy": "pcee", "max_draft": 8}):
                row = concurrency(gm, prompts, args.concurrency_tokens, n, options)
                result["concurrency"].append(row)
                print(f"  concurrency: {row}", flush=True)
                save()
        gm.scheduler.close()
    save()


if __name__ == "__main__":
    main()
