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
EXACT_DRAFT_DELTAS = (0.5, 0.8)
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
    """(tokens, exits, decoding tokens/s with the prefill excluded, sequence state)."""
    gm.decoder.kv_strategy = kv
    seq = gm.decoder.new_sequence(prompt, capacity=len(prompt) + new_tokens + 16, **options)
    first = gm.decoder.step([seq])[0]  # the prefill yields the first token
    tokens, exits = [t.token for t in first], [t.exit for t in first]
    start = time.perf_counter()
    while len(tokens) < new_tokens:
        for t in gm.decoder.step([seq])[0]:
            tokens.append(t.token)
            exits.append(t.exit)
    rate = (len(tokens) - len(first)) / (time.perf_counter() - start)
    gm.decoder.kv_strategy = "recompute"
    return tokens[:new_tokens], exits[:new_tokens], rate, seq


def speed(gm: GenerationModel, prompts: list[list[int]], new_tokens: int, hf: bool) -> dict:
    """Configurations interleaved per prompt, so that load changes on a shared machine hit all alike."""
    configs: dict[str, dict] = {"full": {"mode": "full"}}
    for delta in DELTAS:
        configs[f"early δ={delta}"] = {"mode": "early", "delta": delta, "policy": "pcee-lb-cond"}
    configs["early δ=0.9, CALM copy KV"] = {"mode": "early", "delta": 0.9, "policy": "pcee-lb-cond", "kv": "copy"}
    for draft in EXACT_DRAFT_DELTAS:
        configs[f"exact (draft δ={draft})"] = {"mode": "exact", "delta": draft, "policy": "pcee", "max_draft": 6}
    stats = {name: {"rates": [], "same": 0, "prefix": [], "layers": [], "drafted": 0, "accepted": 0} for name in configs}
    hf_model = _hf_model() if hf else None
    if hf_model is not None:
        stats["hf generate"] = {"rates": [], "same": 0, "prefix": [], "layers": [], "drafted": 0, "accepted": 0}
    generate(gm, prompts[0], 4, mode="full")  # warm
    for i, prompt in enumerate(prompts):
        full_tokens = None
        for name, options in configs.items():
            tokens, exits, rate, seq = generate(gm, prompt, new_tokens, **options)
            full_tokens = tokens if name == "full" else full_tokens
            _record(stats[name], tokens, full_tokens, rate)
            stats[name]["layers"].extend(gm.spec.exit_layers[e] + 1 for e in exits)
            stats[name]["drafted"] += seq.drafted
            stats[name]["accepted"] += seq.accepted
        if hf_model is not None:
            tokens, rate = _hf_generate(hf_model, prompt, new_tokens)
            _record(stats["hf generate"], tokens, full_tokens, rate)
        print(f"  prompt {i + 1}/{len(prompts)}: " + ", ".join(
            f"{name} {stats[name]['rates'][-1]:.1f}" for name in stats), flush=True)
    out = {}
    for name, st in stats.items():
        out[name] = {"tokens_per_s_median": statistics.median(st["rates"]),
                     "ratio_to_full_median": statistics.median(
                         [a / b for a, b in zip(st["rates"], stats["full"]["rates"], strict=True)]),
                     "identical_to_full": st["same"] / len(prompts),
                     "prefix_equal_to_full": float(np.mean(st["prefix"])),
                     "mean_layers": float(np.mean(st["layers"])) if st["layers"] else None,
                     "draft_acceptance": st["accepted"] / st["drafted"] if st["drafted"] else None}
        print(f"  {name}: {out[name]}", flush=True)
    return out


def _record(st: dict, tokens: list[int], full_tokens: list[int], rate: float) -> None:
    st["rates"].append(rate)
    st["same"] += tokens == full_tokens
    # free generation diverges after the first differing token: the share before it
    first = next((j for j, (a, b) in enumerate(zip(tokens, full_tokens, strict=True)) if a != b), len(tokens))
    st["prefix"].append(first / len(tokens))


def _hf_model():
    from exitserve.models.llm.convert import load_hf, smollm2_gguf

    return load_hf(smollm2_gguf())[0]


def _hf_generate(model, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Hugging Face `generate`, greedy; decoding tokens/s with the prefill (a 1-token generate) subtracted."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        seconds = time.perf_counter() - start - prefill
    return out[0, len(prompt):].tolist(), (new_tokens - 1) / seconds


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
