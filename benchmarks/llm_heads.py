"""Exit-head variants on cached hidden states: loss (CE - λ·entropy vs KL at a temperature) and the
restricted-vocabulary size, measured on held-out text (the end of WikiText-2 `valid`).

    python benchmarks/llm_heads.py runs/bundles/smollm2 --layers 15,23 --steps 1500 --batch-size 256 \
        --variants ce:4096,kl1:4096,kl2:4096,none:8192,none:16384 --threads 1

Needs the hidden-state caches `exitserve train-llm-heads` writes (same `--train-tokens`,
`--calibration-tokens`, `--extra-text`). Per variant and layer: top-1 agreement with the full
model, the share of tokens at confidence >= 0.9 and their agreement; also the final layer's own
norm + restricted rows (no training), whose agreement is the vocabulary's coverage of sure tokens.
Writes benchmarks/results/llm-heads.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from exitserve.models.bundle import load_bundle
from exitserve.models.llm.head_training import HeadTrainConfig, agreement_report, head_logits, train_head
from exitserve.models.llm.heads import ExitHeads, choose_vocab
from exitserve.models.llm.llama import load_llama
from exitserve.service.serving.generation.build import _cached, training_files

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--data", default="../shared/data/text/wikitext-2")
    parser.add_argument("--extra-text", default="../shared/data/text/agnews/dev.tsv")
    parser.add_argument("--train-tokens", type=int, default=500_000)
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--cache-layers", default="7,11,15,19,23,26", help="the layers the caches were made with")
    parser.add_argument("--layers", default="15,23")
    parser.add_argument("--variants", default="ce:4096,kl1:4096,kl2:4096,ce:8192",
                        help="loss:vocab; loss is ce, klT (KL at temperature T), or none (the final layer only)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--head-hidden", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="runs/cache/llm-hidden")
    parser.add_argument("--out", default=str(RESULTS / "llm-heads.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bundle_dir = Path(args.bundle)
    bundle = load_bundle(bundle_dir)
    model = load_llama(bundle_dir)
    files = training_files(Path(args.data), args.extra_text)
    name, cal_tokens, cache_layers = bundle.manifest.name, args.calibration_tokens, [
        int(x) for x in args.cache_layers.split(",")]
    cache_dir = Path(args.cache)

    def missing():
        raise SystemExit("no hidden-state cache: run `exitserve train-llm-heads` with the same token counts first")

    cal = _cached(model, cache_dir, f"{name}-valid-tail-{cal_tokens}", cache_layers, missing)
    train = _cached(model, cache_dir, f"{name}-train-{'+'.join(f.stem for f in files)}-{args.train_tokens}-{cal_tokens}",
                    cache_layers, missing)
    last = model.config.num_layers - 1
    layers = [int(x) for x in args.layers.split(",")]
    full_cal = cal.full_argmax.numpy()
    eos = bundle.manifest.generation_spec.eos_ids
    rows: list[dict] = []
    for variant in args.variants.split(","):
        loss, size = variant.split(":")
        vocab = choose_vocab(train.full_argmax.numpy(), int(size), always=eos)
        coverage = float(np.isin(full_cal, vocab).mean())
        heads = ExitHeads(model.config.hidden_size, args.head_hidden, model.config.rms_norm_eps,
                          torch.from_numpy(vocab), len(layers) + 1).init_from(model)
        temperature = float(loss[2:]) if loss.startswith("kl") else 1.0
        config = HeadTrainConfig(loss="kl" if loss.startswith("kl") else "ce", steps=args.steps,
                                 batch_size=args.batch_size, temperature=temperature)
        final = agreement_report(head_logits(heads, len(layers), cal.hidden[last]), vocab, full_cal)
        rows.append({"variant": variant, "layer": last, "trained": False, "vocab_coverage": coverage, **final})
        print(f"{variant}: vocabulary covers {coverage:.3f} of held-out full-model tokens; final layer, "
              f"restricted rows: {final}", flush=True)
        for index, layer in enumerate(layers if loss != "none" else []):
            start = time.perf_counter()
            train_head(model, heads, index, train.hidden[layer], train.hidden[last], train.full_argmax, config)
            report = agreement_report(head_logits(heads, index, cal.hidden[layer]), vocab, full_cal)
            rows.append({"variant": variant, "layer": layer, "trained": True, "steps": args.steps,
                         "batch_size": args.batch_size, "seconds": time.perf_counter() - start,
                         "vocab_coverage": coverage, **report})
            print(f"  {variant} layer {layer}: {report}", flush=True)
    result = {"train_tokens": train.size, "calibration_tokens": cal.size, "threads": args.threads, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| variant | layer | agreement | share at confidence ≥ 0.9 | their agreement |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | {r['layer'] + 1}{'' if r['trained'] else ' (untrained)'} | {r['agreement']:.3f} | "
              f"{r['share_conf_0.9']:.3f} | {r['agreement_conf_0.9']:.3f} |")


if __name__ == "__main__":
    main()
