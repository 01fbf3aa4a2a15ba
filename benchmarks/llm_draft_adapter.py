"""A first look at a Kangaroo-style draft adapter (arXiv 2404.18911) on a generation bundle's cached states.

    python benchmarks/llm_draft_adapter.py runs/bundles/smollm2-deff --layer 7 --epochs 3

Kangaroo drafts from an early layer through one small adapter (attention + MLP) trained to match the
final layer. Here: one decoder layer, warm-started from the layer after `--layer` (0-based), run
causally over the cached hidden states after `--layer` of the bundle build's WikiText-2 training text
(512-token chunks, as cached), then the model's final norm and LM head, trained with cross-entropy
to the full model's token over the K most frequent ones. Reported: top-1 agreement with the full
model on the WikiText-2 test cache, against the bundle build's residual MLP head at the same layer
(its heads cache) and the LM head applied to the layer's state as it is. Needs the caches
`exitserve train-llm-heads` leaves (`--cache`, default runs/cache/llm-hidden) with the layer in them.

Writes benchmarks/results/llm-draft-adapter.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from llm import RESULTS

from exitserve.models.bundle import load_bundle
from exitserve.models.llm.head_training import head_logits
from exitserve.models.llm.heads import ExitHeads
from exitserve.models.llm.hidden_cache import HiddenCache
from exitserve.models.llm.llama import LayerSpan, LlamaModel, load_llama
from exitserve.service.serving.generation.calibrate import agreement

CHUNK = 512  # the chunks cache_hidden ran independently


def one_cache(cache_dir: Path, pattern: str, layer: int) -> Path:
    """The cache file matching `pattern` whose layers include `layer` (names as `train-llm-heads` writes them)."""
    for path in sorted(cache_dir.glob(pattern)):
        if str(layer) in path.stem.rsplit("-", 1)[-1].split("_"):
            return path
    raise SystemExit(f"no cache {pattern} with layer {layer} in {cache_dir}: run exitserve train-llm-heads first")


def heads_pattern(bundle: Path) -> str:
    """The heads cache of the build that made this bundle (its settings are in the manifest)."""
    from safetensors import safe_open

    manifest = load_bundle(bundle).manifest
    training = manifest.created_by.extra["head_training"]
    with safe_open(str(bundle / "heads.safetensors"), "pt") as handle:
        vocab = handle.get_slice("vocab").get_shape()[0]
        hidden = handle.get_slice("heads.0.up.weight").get_shape()[0]
    return (f"{manifest.name}-heads-{training['loss']}-{training['steps']}-{training['batch_size']}-{vocab}-{hidden}-"
            f"o{training['outside_rows']}-{training['train_tokens']}-*.safetensors")


def run_adapter(model: LlamaModel, adapter, hidden: torch.Tensor) -> torch.Tensor:
    c = model.config
    keys = torch.zeros(c.num_kv_heads, hidden.shape[0], c.head_dim)
    return adapter.run(hidden, [LayerSpan.starting_at((0, hidden.shape[0]), 0, keys, torch.zeros_like(keys))],
                       model.rotary())


@torch.no_grad()
def top1(model: LlamaModel, transform, cache: HiddenCache, layer: int) -> float:
    agree = []
    for first in range(0, cache.size, CHUNK):
        hidden = cache.hidden[layer][first:first + CHUNK].float()
        predicted = model.logits(transform(hidden)).argmax(-1)
        agree.append((predicted == cache.full_argmax[first:first + CHUNK]).float())
    return float(torch.cat(agree).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--cache", default="runs/cache/llm-hidden")
    parser.add_argument("--layer", type=int, default=7, help="0-based layer whose output the adapter reads")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=8192, help="training classes: the K most frequent full-model tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "llm-draft-adapter.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache_dir, layer = Path(args.cache), args.layer
    model = load_llama(Path(args.bundle))
    name = load_bundle(args.bundle).manifest.name
    # the WikiText-2 caches (running text in 512-token chunks), not the chat answers'
    train = HiddenCache.load(one_cache(cache_dir, f"{name}-train-*.pt", layer))
    test = HiddenCache.load(one_cache(cache_dir, f"{name}-test-0-*.pt", layer))
    weight = model.lm_head.weight.detach()
    vocab = torch.argsort(torch.bincount(train.full_argmax, minlength=weight.shape[0]), descending=True)[:args.vocab]
    column = torch.full((weight.shape[0],), -100, dtype=torch.int64)
    column[vocab] = torch.arange(vocab.numel())
    rows = weight[vocab].contiguous()
    result: dict = {"bundle": args.bundle, "layer": layer, "train_tokens": train.size, "test_tokens": test.size,
                    "train_cache": train.fingerprint, "test_cache": test.fingerprint,
                    "args": vars(args), "logit_lens": top1(model, lambda h: h, test, layer)}
    heads_path = one_cache(cache_dir, heads_pattern(Path(args.bundle)), layer)
    from safetensors.torch import load_file

    state = load_file(str(heads_path))
    layers = [int(x) for x in heads_path.stem.rsplit("-", 1)[-1].split("_")]
    heads = ExitHeads(model.config.hidden_size, state["heads.0.up.weight"].shape[0], model.config.rms_norm_eps,
                      state["vocab"], len(layers), outside_rows=state["heads.0.outside.weight"].shape[0])
    heads.load_state_dict(state)
    heads.bind(model)
    logits = head_logits(heads, layers.index(layer), test.hidden[layer])
    result["mlp_head"] = {"cache": heads_path.name,
                          "agreement": float(agreement(logits, heads.vocab.numpy(), test.full_argmax.numpy()).mean())}
    adapter = copy.deepcopy(model.layers[layer + 1]).float().requires_grad_(True)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=3e-4, weight_decay=0.0)
    chunks = list(range(0, train.size - CHUNK + 1, CHUNK))
    steps = args.epochs * (len(chunks) // 4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-4, total_steps=steps, pct_start=0.1)
    generator, started, epochs = torch.Generator().manual_seed(0), time.perf_counter(), []
    for epoch in range(args.epochs):
        order = torch.randperm(len(chunks), generator=generator).tolist()
        for batch in range(0, len(order) - 3, 4):
            loss = torch.zeros(())
            for j in order[batch:batch + 4]:
                first = chunks[j]
                hidden = train.hidden[layer][first:first + CHUNK].float()
                scores = model.model.norm(run_adapter(model, adapter, hidden)) @ rows.T
                loss = loss + F.cross_entropy(scores, column[train.full_argmax[first:first + CHUNK]], ignore_index=-100) / 4
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        with torch.no_grad():
            epochs.append({"epoch": epoch + 1, "agreement": top1(model, lambda h: run_adapter(model, adapter, h), test, layer),
                           "seconds": time.perf_counter() - started})
        print(epochs[-1], flush=True)
    result["adapter"] = {"epochs": epochs, "agreement": epochs[-1]["agreement"]}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"layer {layer}: adapter {result['adapter']['agreement']:.3f}, MLP head {result['mlp_head']['agreement']:.3f}, "
          f"logit lens {result['logit_lens']:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
