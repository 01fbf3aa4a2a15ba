"""Where lookup drafts pay: one stream, float32, with and without them, on WikiText-2 and on chat prompts.

    python benchmarks/llm_lookup.py runs/bundles/smollm2-deff --prompts 16 --new-tokens 64

Lookup drafts (`service/serving/generation/lookup.py`) are free where the text repeats its context.
WikiText-2 prompts (24 tokens of a test line) leave a 135M model to continue encyclopedic prose, and
its greedy continuation repeats itself; chat prompts (the `test` split of `models.llm.chat_text`, the
prompts the tables never saw, rendered with the chat template) get answers that repeat less. Every
prompt runs full depth, early exit δ 0.9 (the default policy) and exact mode (drafts at δ 0.8) with
lookup (the server's default) and without (`--generation-lookup-ngram 0`), and, as before either,
without lookup and with every exit drafting in exact mode (no `_drafts_pay` rule), back to back;
ratios are per prompt against full depth, medians reported (`llm_precision.one_stream`).
Writes benchmarks/results/llm-lookup.json.

    python benchmarks/llm_lookup.py runs/bundles/smollm2-deff --history --out benchmarks/results/llm-lookup-history.json

`--history` adds a model whose answer history (`--generation-lookup-history`, its default size) holds
what the server would have answered before: the model's greedy answers to the `train` and
`calibration` chat prompts (none of them a test prompt), generated first, 16 at a time. The history is
not added to while measuring, so no test prompt's own answer is in it. The other models keep none.
It also adds "lookup to the room": lookup drafts as long as there is room for them, not as long as
they pay (`MultiExitDecoder.row_cost` unmeasured), as before the server measured what a row costs.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from llm import DATA, RESULTS, generate, wikitext_prompts
from llm_precision import one_stream
from prometheus_client import CollectorRegistry

from exitserve.models.bundle import load_bundle
from exitserve.models.llm.chat_text import chat_prompts, generate_chat_text, prompt_split
from exitserve.service.serving.generation.model import GenerationModel
from exitserve.service.settings import DEFAULT_LOOKUP_HISTORY

HISTORY = "float32, answer history"
TO_THE_ROOM = "float32, lookup to the room"


def chat_test_prompts(gm: GenerationModel, news: Path, count: int) -> list[list[int]]:
    """`count` of the chat prompts held out from the tables (seeded draw), rendered with the chat template."""
    if gm.chat_template is None:
        raise SystemExit(f"{gm.name}: no chat template")
    held_out = [p for p in chat_prompts(640, news=news) if prompt_split(p) == "test"]
    random.Random(1).shuffle(held_out)
    return [gm.encode(gm.chat_template.render([{"role": "user", "content": p}])) for p in held_out[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--prompts", type=int, default=16, help="prompts of each kind")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--history", action="store_true", help="add a model with an answer history (see above)")
    parser.add_argument("--out", default=str(RESULTS / "llm-lookup.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    bundle = load_bundle(args.bundle)
    models = {"float32": GenerationModel(bundle, CollectorRegistry(), threads=1, lookup_history=0),
              "float32, no lookup": GenerationModel(bundle, CollectorRegistry(), threads=1, lookup_ngram=0),
              "float32, no lookup, every exit drafts": GenerationModel(bundle, CollectorRegistry(), threads=1,
                                                                       lookup_ngram=0)}
    models["float32, no lookup, every exit drafts"].decoder.adaptive_drafts = False  # as before both
    gm = models["float32"]
    result: dict = {"bundle": gm.name, "exit_layers": gm.spec.exit_layers, "threads": 1, "args": vars(args)}
    if args.history:
        models[HISTORY] = GenerationModel(bundle, CollectorRegistry(), threads=1,
                                          lookup_history=DEFAULT_LOOKUP_HISTORY)
        earlier = [p for p in chat_prompts(640, news=Path(args.data).parent / "agnews" / "test.tsv")
                   if prompt_split(p) != "test"]
        chat = generate_chat_text(gm, earlier)
        history = models[HISTORY].decoder.history
        assert history is not None
        for answer in chat.answer_ids:
            history.add(answer)
        result["history"] = {"answers_generated": len(earlier), "answers_kept": len(history),
                             "tokens_kept": history.tokens, "capacity": history.capacity}
        models[TO_THE_ROOM] = GenerationModel(bundle, CollectorRegistry(), threads=1, lookup_history=0)
    prompt_sets = {"wikitext-2": wikitext_prompts(gm, Path(args.data), args.prompts),
                   "chat": chat_test_prompts(gm, Path(args.data).parent / "agnews" / "test.tsv", args.prompts)}
    for name, model in models.items():
        if name != TO_THE_ROOM:
            model.warm_up()  # as the server starts (lookup drafts as long as pays: the draft row cost measured)
        generate(model, prompt_sets["wikitext-2"][0], 4, mode="full")
    result["row_cost"] = {name: model.decoder.row_cost for name, model in models.items()}
    for name, prompts in prompt_sets.items():
        print(f"{name}:", flush=True)
        result[name] = one_stream(models, prompts, args.new_tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name in prompt_sets:
        for config, row in result[name].items():
            print(f"{name:10} {config:40} {row['ratio_to_float32_full_median']:.2f}x  identical "
                  f"{row['identical_to_same_precision_full']:.2f}  lookup share {row['lookup_token_share']:.2f}")


if __name__ == "__main__":
    main()
