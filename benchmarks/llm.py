"""Token-level early exit on a generation bundle (SmolLM2-135M-Instruct): quality per δ and decoding speed.

    python benchmarks/llm.py BUNDLE --quality --speed --hf --prompts 16 --new-tokens 32

quality: teacher-forced on WikiText-2 `test` (hidden states cached once): per δ and policy, the
         agreement of promised tokens with the full model, coverage (share of tokens answered
         early), mean decoder layers per token; exit decisions by `decide_all` (= the engine's rule).
speed:   greedy generation, one stream, in the same engine: full depth, early exit at each δ, exact
         mode (and whether its output equals full depth), Hugging Face `generate` greedy on the
         same weights (`--hf`, needs the llm-convert extra); then 1/4/16 concurrent streams through
         the scheduler; exit-check costs (full LM head vs restricted head vs one layer) at batch 1.
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
from exitserve.service.serving.generation.model import GenerationModel

DELTAS = (0.7, 0.8, 0.9, 0.95)
POLICIES = ("pcee", "pcee-lb", "pcee-lb-cond", "per-exit-threshold")
RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text" / "wikitext-2"


def quality(gm: GenerationModel, data: Path, tokens: int, cache_dir: Path) -> list[dict]:
    spec, config = gm.spec, gm.model.config
    layers = spec.exit_layers[:-1]
    path = cache_dir / f"{gm.name}-test-0-{tokens}-{'_'.join(map(str, layers))}.pt"
    found = [c for c in map(HiddenCache.load, sorted(cache_dir.glob(f"{gm.name}-test-0-{tokens}-*.pt")))
             if set(layers) <= set(c.layers)]
    if found:
        cache = found[0]
    else:
        cache = cache_hidden(gm.model, text_tokens(gm.tokenizer, data / "test.txt", limit=tokens), layers)
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache.save(path)
    heads = gm.decoder.heads
    vocab = heads.vocab.numpy()
    full = cache.full_argmax.numpy()
    per_exit = [calibration_logits(head_logits(heads, k, cache.hidden[layer])) for k, layer in enumerate(layers)]
    per_exit.append(one_hot_logits(vocab_index(vocab, config.vocab_size)[full], vocab.size))
    exit_layers = np.asarray([layer + 1 for layer in spec.exit_layers])
    rows = []
    for policy in POLICIES:
        for delta in DELTAS:
            d = decide_all(gm.calibration, policy, per_exit, delta)
            early = d.exit_index < len(exit_layers) - 1
            token = np.where(early, vocab[np.minimum(d.prediction, vocab.size - 1)], full)
            agree = token == full
            promised = d.target_met
            rows.append({
                "policy": policy, "delta": delta, "tokens": int(full.size),
                "promised_agreement": float(agree[promised].mean()) if promised.any() else float("nan"),
                "early_agreement": float(agree[early].mean()) if early.any() else float("nan"),
                "agreement": float(agree.mean()), "coverage_early": float(early.mean()),
                "promised_share": float(promised.mean()),
                "mean_layers": float(exit_layers[d.exit_index].mean()),
            })
    return rows


def wikitext_prompts(gm: GenerationModel, data: Path, count: int, length: int = 24) -> list[list[int]]:
    lines = [line.strip() for line in (data / "test.txt").read_text().splitlines()
             if len(line.split()) > 30 and not line.strip().startswith("=")]
    return [gm.encode(" " + line)[:length] for line in lines[:count]]


def generate(gm: GenerationModel, prompt: list[int], new_tokens: int, kv: str = "recompute",
             **options) -> tuple[list[int], list[int], float, object]:
    gm.decoder.kv_strategy = kv
    seq = gm.decoder.new_sequence(prompt, capacity=len(prompt) + new_tokens + 16, **options)
    tokens, exits = [], []
    start = time.perf_counter()
    gm.decoder.step([seq])  # prefill
    first = time.perf_counter()
    while len(tokens) < new_tokens:
        for t in gm.decoder.step([seq]):
            tokens.append(t.token)
            exits.append(t.exit)
    seconds = time.perf_counter() - first
    del start
    return tokens[:new_tokens], exits[:new_tokens], seconds, seq


def speed(gm: GenerationModel, prompts: list[list[int]], new_tokens: int, hf: bool) -> dict:
    configs = {"full": {"mode": "full"}}
    for delta in DELTAS:
        configs[f"early δ={delta}"] = {"mode": "early", "delta": delta, "policy": "pcee-lb-cond"}
    configs["early δ=0.9, CALM copy KV"] = {"mode": "early", "delta": 0.9, "policy": "pcee-lb-cond", "kv": "copy"}
    configs["exact"] = {"mode": "exact", "delta": 0.5, "policy": "pcee", "max_draft": 6}
    out: dict = {}
    full_tokens: dict[int, list[int]] = {}
    generate(gm, prompts[0], 4, mode="full")  # warm
    for name, options in configs.items():
        rates, same, layers, drafted, accepted, agree = [], 0, [], 0, 0, []
        for i, prompt in enumerate(prompts):
            tokens, exits, seconds, seq = generate(gm, prompt, new_tokens, **options)
            rates.append(new_tokens / seconds)
            if name == "full":
                full_tokens[i] = tokens
            same += tokens == full_tokens[i]
            # free generation: share of positions equal to full greedy before the first divergence counts
            first_diff = next((j for j, (a, b) in enumerate(zip(tokens, full_tokens[i], strict=True)) if a != b), new_tokens)
            agree.append(first_diff / new_tokens)
            layers.extend(gm.spec.exit_layers[e] + 1 for e in exits)
            drafted += seq.drafted
            accepted += seq.accepted
        out[name] = {"tokens_per_s_median": statistics.median(rates), "identical_to_full": same / len(prompts),
                     "prefix_equal_to_full": float(np.mean(agree)),
                     "mean_layers": float(np.mean(layers)), "draft_acceptance": accepted / drafted if drafted else None}
        print(f"  {name}: {out[name]}", flush=True)
    if hf:
        out["hf generate"] = hf_speed(gm, prompts, new_tokens, full_tokens)
        print(f"  hf generate: {out['hf generate']}", flush=True)
    return out


def hf_speed(gm: GenerationModel, prompts: list[list[int]], new_tokens: int, full_tokens: dict[int, list[int]]) -> dict:
    from exitserve.models.llm.convert import load_hf, smollm2_gguf

    model, _ = load_hf(smollm2_gguf())
    rates, same = [], 0
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=2, do_sample=False)
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        # the first token's time is the prefill: compare per-token decoding like ours (prefill excluded)
        rates.append(new_tokens / (time.perf_counter() - start))
        same += out[0, len(prompt):].tolist() == full_tokens[i]
    return {"tokens_per_s_median": statistics.median(rates), "identical_to_full": same / len(prompts),
            "note": "includes the prefill"}


def concurrency(gm: GenerationModel, prompts: list[list[int]], new_tokens: int, streams: int, options: dict) -> dict:
    seqs = [gm.decoder.new_sequence(prompts[i % len(prompts)], capacity=64 + new_tokens, **options)
            for i in range(streams)]
    gm.decoder.step(seqs)  # prefill together
    counts = [0] * streams
    gaps: list[float] = []
    start = time.perf_counter()
    while min(counts) < new_tokens:
        t0 = time.perf_counter()
        gained = gm.decoder.step(seqs)
        dt = time.perf_counter() - t0
        for i, g in enumerate(gained):
            counts[i] += len(g)
            gaps.extend([dt / max(len(g), 1)] * len(g))
    seconds = time.perf_counter() - start
    return {"streams": streams, "tokens_per_s": sum(counts) / seconds,
            "itl_p50_ms": 1000 * float(np.percentile(gaps, 50)), "itl_p99_ms": 1000 * float(np.percentile(gaps, 99))}


@torch.inference_mode()
def check_costs(gm: GenerationModel, reps: int = 50) -> dict:
    from exitserve.models.llm.llama import LayerSpan

    model, heads = gm.model, gm.decoder.heads
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

    return {"layer_ms": med(lambda: model.layers[5].run(x, [LayerSpan((0, 1), torch.tensor([10]), *cache[5])],
                                                       model.rotary())),
            "full_lm_head_ms": med(lambda: model.logits(x)),
            "restricted_head_ms": med(lambda: heads.logits(0, x)) if heads is not None else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--hf", action="store_true")
    parser.add_argument("--concurrency", action="store_true")
    parser.add_argument("--test-tokens", type=int, default=8192)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="runs/cache/llm-hidden")
    parser.add_argument("--out", default=str(RESULTS / "llm.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from prometheus_client import CollectorRegistry

    gm = GenerationModel(load_bundle(args.bundle), CollectorRegistry())
    assert isinstance(gm.calibration, Calibration)
    result: dict = {"bundle": gm.name, "exit_layers": gm.spec.exit_layers, "threads": args.threads,
                    "check_costs": check_costs(gm)}
    print(f"exit layers {gm.spec.exit_layers}; exit check costs {result['check_costs']}", flush=True)
    if args.quality:
        result["quality"] = quality(gm, Path(args.data), args.test_tokens, Path(args.cache))
        print("| policy | δ | promised agreement | early-exit agreement | coverage (early) | mean layers |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in result["quality"]:
            print(f"| {r['policy']} | {r['delta']} | {r['promised_agreement']:.3f} | {r['early_agreement']:.3f} | "
                  f"{r['coverage_early']:.3f} | {r['mean_layers']:.1f} |")
    if args.speed:
        prompts = wikitext_prompts(gm, Path(args.data), args.prompts)
        result["speed"] = speed(gm, prompts, args.new_tokens, args.hf)
        if args.concurrency:
            result["concurrency"] = [concurrency(gm, prompts, args.new_tokens, n, {"mode": "full"}) for n in (1, 4, 16)]
            print(f"  concurrency: {result['concurrency']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
