"""The per-token promise of a generation bundle, on the text it is fitted on and on the text users send.

    python benchmarks/llm_promise.py runs/bundles/smollm2 [--test-tokens 8192]

Two held-out sets, teacher-forced (every position is one sample; the reference is the full model's
greedy token there): WikiText-2 `test`, and the model's own answers to the chat prompts of the
`test` split (`models.llm.chat_text`: prompts the tables never saw; generated once by
`train-llm-heads` or here). For every policy and every δ from 0.70 to 0.95 in steps of 0.01: the
agreement of the tokens answered with `target_met` (promised) with the full model, their share, the
share answered early, and two one-sided checks of a row below δ (a row "breaks" the promise when its
promised agreement is below δ): the binomial p-value (tokens independent) and the upper end of a 95 %
bootstrap over *clusters* (a chat answer, or a 512-token WikiText-2 chunk), which is the honest one:
tokens of one answer rise and fall together.

Writes benchmarks/results/llm-promise.json; prints a Markdown table at δ 0.7 / 0.8 / 0.9 / 0.95.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from llm import DATA, RESULTS, decision_row, exit_logits, test_cache
from prometheus_client import CollectorRegistry
from scipy.stats import binom

from exitserve.calibration.rules import POLICIES
from exitserve.models.bundle import load_bundle
from exitserve.service.serving.generation.build import chat_caches
from exitserve.service.serving.generation.model import GenerationModel

DELTAS = tuple(round(0.70 + 0.01 * i, 2) for i in range(26))
KEY_DELTAS = (0.7, 0.8, 0.9, 0.95)
# policies that mark tokens as promised (`full` answers everything at the last exit)
PROMISING = tuple(p for p in POLICIES if p != "full")


BOOTSTRAP = 2000


def sweep(gm: GenerationModel, per_exit: list[np.ndarray], full: np.ndarray, name: str,
          clusters: np.ndarray) -> list[dict]:
    """`clusters` [tokens]: the answer (or text chunk) each token belongs to, for the cluster bootstrap."""
    rows = []
    draws = np.random.default_rng(0).integers(0, clusters.max() + 1, size=(BOOTSTRAP, clusters.max() + 1))
    for policy in PROMISING:
        for delta in DELTAS:
            row, _, agree, promised = decision_row(gm, per_exit, full, policy, delta)
            n, k = row["promised_tokens"], row["promised_agreeing"]
            # P(at most k agreeing of n | true agreement δ): small = the shortfall is not chance
            row["p_value"] = float(binom.cdf(k, n, delta)) if n else 1.0
            per_n = np.bincount(clusters, weights=promised, minlength=draws.shape[1])
            per_k = np.bincount(clusters, weights=promised & agree, minlength=draws.shape[1])
            boot = per_k[draws].sum(1) / np.maximum(per_n[draws].sum(1), 1)
            row["bootstrap_upper_95"] = float(np.quantile(boot, 0.95))
            row["set"] = name
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--test-tokens", type=int, default=8192, help="WikiText-2 test tokens")
    parser.add_argument("--cache", default="runs/cache/llm-hidden")
    parser.add_argument("--out", default=str(RESULTS / "llm-promise.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    gm = GenerationModel(load_bundle(args.bundle), CollectorRegistry())
    training = gm.bundle.manifest.created_by.extra.get("head_training", {})
    chat_args = {"chat_prompts": training.get("chat_prompts") or 640, "chat_tokens": training.get("chat_tokens") or 128,
                 "chat_news": str(Path(args.data).parents[0] / "agnews" / "test.tsv")}
    wiki = test_cache(gm, Path(args.data), args.test_tokens, Path(args.cache))
    chat_text, chat_split = chat_caches(Path(args.bundle), gm.model, Path(args.cache), gm.spec.exit_layers[:-1],
                                        chat_args, splits=("test",))
    chat_cache, lengths = chat_split["test"], chat_text.split("test").answer_lengths()
    sets = {"wikitext-2 test": (wiki, np.arange(wiki.size) // 512),  # cache_hidden's independent chunks
            "chat test prompts": (chat_cache, np.repeat(np.arange(len(lengths)), lengths))}
    result: dict = {"bundle": gm.name, "exit_layers": gm.spec.exit_layers, "deltas": list(DELTAS),
                    "fitted_on_chat": bool(training.get("chat_prompts")), "sets": {}, "rows": []}
    for name, (cache, clusters) in sets.items():
        start = time.perf_counter()
        rows = sweep(gm, exit_logits(gm, cache), cache.full_argmax.numpy(), name, clusters)
        breaks = [r for r in rows if r["promised_tokens"] and r["promised_agreement"] < r["delta"]]
        result["sets"][name] = {"tokens": cache.size, "clusters": int(clusters.max() + 1), "breaks": len(breaks),
                                "significant_breaks": sum(r["p_value"] < 0.05 for r in breaks),
                                "bootstrap_significant_breaks": sum(r["bootstrap_upper_95"] < r["delta"] for r in breaks),
                                "worst": min((r["promised_agreement"] - r["delta"] for r in rows
                                              if r["promised_tokens"]), default=None)}
        result["rows"].extend(rows)
        print(f"{name}: {cache.size} tokens, {len(breaks)} of {len(rows)} (policy, δ) below δ "
              f"({result['sets'][name]['significant_breaks']} with binomial p < 0.05, "
              f"{result['sets'][name]['bootstrap_significant_breaks']} with the cluster bootstrap's 95 % upper end "
              f"below δ) in {time.perf_counter() - start:.0f} s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| set | policy | δ | promised agreement | promised share | early share | mean layers |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in result["rows"]:
        if r["delta"] in KEY_DELTAS:
            print(f"| {r['set']} | {r['policy']} | {r['delta']} | {r['promised_agreement']:.3f} | "
                  f"{r['promised_share']:.3f} | {r['coverage_early']:.3f} | {r['mean_layers']:.1f} |")


if __name__ == "__main__":
    main()
