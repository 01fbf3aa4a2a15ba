"""`exitserve train-llm-heads`: exit heads, their layers and label-free tables into a generation bundle.

1. cache the frozen decoder's hidden states on WikiText-2 `valid` (training tokens, then held-out
   calibration tokens) and on chat text: the model's own greedy answers to seeded chat prompts
   (`models.llm.chat_text`; train and calibration prompts disjoint, test prompts left for
   `benchmarks/llm.py`), once;
2. train one head per candidate layer against the full model's own predictions (after the final
   layer: only its outside-mass estimate);
3. choose the exit layers by measurement: greedy forward selection of the set whose expected cost
   per token (layers run + exit checks, in measured layer-equivalents) is lowest at δ = 0.9 under
   the tables fitted on one half of the calibration tokens and applied to the other half;
4. fit the final tables on all calibration tokens (WikiText-2 and chat) and write heads, tables and
   manifest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from exitserve.calibration import Calibration, decide_all
from exitserve.calibration.io import save_calibration
from exitserve.models.bundle import load_bundle
from exitserve.models.llm.chat_text import ChatText
from exitserve.models.llm.head_training import HeadTrainConfig, agreement_report, head_logits, train_head
from exitserve.models.llm.heads import OUTSIDE_ROWS, ExitHeads, choose_vocab
from exitserve.models.llm.hidden_cache import HiddenCache, cache_hidden, corpus_tokens, text_tokens
from exitserve.models.llm.llama import LayerSpan, LlamaModel, load_llama
from exitserve.models.llm.manifest import HEADS_FILE, write_generation_manifest
from exitserve.service.serving.generation.calibrate import fit_token_calibration
from exitserve.service.serving.generation.runners import RunnerKind

SELECTION_DELTA = 0.9
SELECTION_POLICY = "pcee"
# tokens of running text counted as one cluster by the guards (benchmarks/llm_promise.py bootstraps the same chunks)
TEXT_CLUSTER = 512


def save_heads(heads: ExitHeads, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(path))


def write_exits(directory: Path, heads: ExitHeads | None, calibration: Calibration | None, exit_layers: list[int],
                *, command: str, data_fingerprint: str = "", extra: dict | None = None) -> None:
    """Put heads + tables into a generation bundle and re-sign its manifest (tokenizer, ids, context kept)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    spec = manifest["generation"]
    for stale in (HEADS_FILE, "calibration.json"):
        (directory / stale).unlink(missing_ok=True)
    if heads is not None:
        if calibration is None:
            raise ValueError("exit heads need their reliability tables")
        save_heads(heads, directory / HEADS_FILE)
        save_calibration(calibration, directory / "calibration.json")
    write_generation_manifest(
        directory, name=manifest["name"], exit_layers=exit_layers,
        head_vocab_size=heads.vocab_size if heads is not None else 0,
        head_hidden=heads.hidden if heads is not None else 0, bos_id=spec.get("bos_id"), eos_ids=spec["eos_ids"],
        max_context=spec["max_context"], command=command, data_fingerprint=data_fingerprint,
        extra={**manifest["created_by"].get("extra", {}), **(extra or {})}, version=manifest.get("version", "1"),
    )


@torch.inference_mode()
def measure_costs(model: LlamaModel, heads: ExitHeads, layers: list[int], calibration: Calibration,
                  prompt: list[int], tokens: int = 12, rounds: int = 3,
                  runner: RunnerKind = "onnxruntime") -> tuple[float, float]:
    """(one exit check, the full LM head) in decoder-layer equivalents, measured in the decoder itself
    on the runner the server uses (relative costs differ between runners: BENCHMARKS.md).

    Full-depth steps against steps that run every candidate check and never exit (policy
    `confidence` at δ 1), interleaved, medians of per-step times: the check cost includes the head
    with its weights cold, the decision (`Calibration.step`) and the host round trip. The LM head's
    share comes from a microbenchmark against one layer (both hot: a ratio of like with like).
    """
    from exitserve.service.serving.generation.decoder import MultiExitDecoder

    last = model.config.num_layers - 1
    decoder = MultiExitDecoder(model, heads, [*layers, last], calibration, runner=runner)
    times: dict[str, list[float]] = {"full": [], "checks": []}
    for _ in range(rounds):
        for mode, options in (("full", {"mode": "full"}), ("checks", {"mode": "early", "policy": "confidence", "delta": 1.0})):
            seq = decoder.new_sequence(prompt, capacity=len(prompt) + tokens + 4, **options)
            decoder.step([seq])
            for _ in range(tokens):
                start = time.perf_counter()
                decoder.step([seq])
                times[mode].append(time.perf_counter() - start)
    full, checked = float(np.median(times["full"])), float(np.median(times["checks"]))
    x = torch.randn(1, model.config.hidden_size)
    cache = model.new_cache(64)

    def median(fn, reps: int = 20) -> float:
        fn()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return float(np.median(samples))

    layer = median(lambda: decoder.runner.layer(0, x, [LayerSpan.starting_at((0, 1), 32, *cache[0])]))
    lm_head_layers = median(lambda: decoder.runner.lm_logits(x)) / layer
    per_layer = full / (model.config.num_layers + lm_head_layers)
    check = max(checked - full, 0.0) / len(layers) / per_layer
    return check, lm_head_layers


def expected_cost(calibration: Calibration, logits: list[np.ndarray], exit_layers: list[int], check_cost: float,
                  delta: float = SELECTION_DELTA, policy: str = SELECTION_POLICY,
                  lm_head_cost: float = 0.0) -> tuple[float, float]:
    """(mean layer-equivalents per token, agreement of early-exited tokens) of a set of exits.

    A token answered early skips the full LM head (its exit head is the check already paid)."""
    decisions = decide_all(calibration, policy, logits, delta)
    layers = np.asarray([layer + 1 for layer in exit_layers], dtype=np.float64)
    layers[-1] += lm_head_cost
    checks = np.arange(1, len(exit_layers) + 1, dtype=np.float64)
    checks[-1] = len(exit_layers) - 1  # the last exit is the model's own head, not a check
    cost = layers[decisions.exit_index] + check_cost * checks[decisions.exit_index]
    early = decisions.exit_index < len(exit_layers) - 1
    agree = float((decisions.prediction[early] == logits[-1].argmax(1)[early]).mean()) if early.any() else float("nan")
    return float(cost.mean()), agree


def select_exits(candidate_logits: dict[int, np.ndarray], vocab: np.ndarray, full_argmax: np.ndarray, vocab_size: int,
                 num_layers: int, check_cost: float, max_exits: int, log=print, lm_head_cost: float = 0.0) -> list[int]:
    """Greedy forward selection of early-exit layers by expected cost (fit on half A, measured on half B)."""
    n = full_argmax.size
    half = n // 2
    chosen: list[int] = []
    best_cost = float(num_layers) + lm_head_cost
    log(f"  selection: full depth costs {best_cost:.2f} layer-equivalents (LM head {lm_head_cost:.2f}); "
        f"one exit check costs {check_cost:.2f}")
    while len(chosen) < max_exits:
        trial_best = None
        for layer in sorted(set(candidate_logits) - set(chosen)):
            layers = sorted([*chosen, layer])
            fit = fit_token_calibration([candidate_logits[k][:half] for k in layers], vocab, full_argmax[:half], vocab_size)
            logits = _calibration_space([candidate_logits[k][half:] for k in layers], vocab, full_argmax[half:],
                                        vocab_size)
            cost, agree = expected_cost(fit, logits, [*layers, num_layers - 1], check_cost, lm_head_cost=lm_head_cost)
            log(f"    exits {layers}: {cost:.2f} layer-equivalents per token, early agreement {agree:.3f}")
            if trial_best is None or cost < trial_best[0]:
                trial_best = (cost, layer)
        if trial_best is None or trial_best[0] >= best_cost - 0.05:
            break
        best_cost = trial_best[0]
        chosen = sorted([*chosen, trial_best[1]])
        log(f"  chose {chosen}: {best_cost:.2f} layer-equivalents per token")
    return chosen


def _calibration_space(head_logits: list[np.ndarray], vocab: np.ndarray, full_argmax: np.ndarray,
                       vocab_size: int) -> list[np.ndarray]:
    from exitserve.models.llm.heads import calibration_logits, one_hot_logits, vocab_index

    return [calibration_logits(z, vocab.size) for z in head_logits] + [one_hot_logits(vocab_index(vocab, vocab_size)[full_argmax],
                                                                          vocab.size)]


def _cached(model: LlamaModel, cache_dir: Path, key: str, layers: list[int],
            compute: Callable[[list[int]], HiddenCache]) -> HiddenCache:
    """The hidden states of the text `key` names, from the cache if any cache of it holds every wanted layer."""
    last = model.config.num_layers - 1  # every cache holds the last layer
    path = cache_dir / f"{key}-{'_'.join(map(str, layers))}.pt"
    for existing in sorted(cache_dir.glob(f"{key}-*.pt")):
        if set(layers) - {last} <= set(int(x) for x in existing.stem[len(key) + 1:].split("_")):
            return HiddenCache.load(existing)
    print(f"caching hidden states: {key} at layers {layers}", flush=True)
    cache = compute(layers)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache.save(path)
    return cache


def _text_cache(model: LlamaModel, make_ids: Callable[[], np.ndarray]) -> Callable[[list[int]], HiddenCache]:
    return lambda layers: cache_hidden(model, make_ids(), layers)


def token_groups(text_tokens: int, answer_lengths: list[int]) -> np.ndarray:
    """One cluster id per calibration token: chunks of TEXT_CLUSTER tokens of the running text, then one per answer."""
    text = np.arange(text_tokens) // TEXT_CLUSTER
    first = int(text[-1]) + 1 if text_tokens else 0
    return np.concatenate([text, np.repeat(np.arange(len(answer_lengths)) + first, answer_lengths)]).astype(np.int64)


def chat_text_path(name: str, cache_dir: Path, args: dict) -> Path:
    return cache_dir / f"{name}-chat-{int(args['chat_prompts'])}-{int(args.get('chat_tokens') or 128)}.json"


def chat_caches(bundle_dir: Path, model: LlamaModel, cache_dir: Path, layers: list[int], args: dict,
                splits: tuple[str, ...] = ("train", "calibration")) -> tuple[ChatText, dict[str, HiddenCache]]:
    """The model's own answers to chat prompts (generated once) and their hidden states per prompt split."""
    from prometheus_client import CollectorRegistry

    from exitserve.models.llm.chat_text import cache_answers, chat_prompts, generate_chat_text
    from exitserve.service.serving.generation.model import load_generation_model

    count, max_new = int(args["chat_prompts"]), int(args.get("chat_tokens") or 128)
    name = load_bundle(bundle_dir).manifest.name
    path = chat_text_path(name, cache_dir, args)
    news = Path(args["chat_news"]) if args.get("chat_news") else None
    if path.is_file():
        chat = ChatText.load(path)
    else:
        gm = load_generation_model(bundle_dir, CollectorRegistry(), threads=1)  # one thread: see BENCHMARKS §3
        prompts = chat_prompts(count, news=news)
        print(f"generating chat text: {len(prompts)} prompts, up to {max_new} tokens each (the model's own answers)")
        chat = generate_chat_text(gm, prompts, max_new=max_new)
        chat.save(path)
    caches = {}
    for split in splits:
        def compute(wanted: list[int], split: str = split) -> HiddenCache:
            return cache_answers(model, chat.split(split), wanted)

        caches[split] = _cached(model, cache_dir, f"{name}-chat-{count}-{max_new}-{split}", layers, compute)
    return chat, caches


def training_files(data: Path, extra: str | None) -> list[Path]:
    """WikiText-2 `valid` first (its tail is the held-out calibration text), then `--extra-text` files."""
    return [data / "valid.txt", *(Path(f) for f in (extra or "").split(",") if f)]


def add_exits(bundle_dir: Path, args: dict) -> None:
    from tokenizers import Tokenizer

    torch.set_num_threads(int(args.get("threads") or 2))
    bundle = load_bundle(bundle_dir)
    spec = bundle.manifest.generation_spec
    model = load_llama(bundle_dir)
    tokenizer = Tokenizer.from_file(str(bundle_dir / spec.tokenizer))
    data = Path(args["data"])
    cache_dir = Path(args["cache"])
    candidates = [int(x) for x in args["candidates"].split(",")]
    fixed = [int(x) for x in args["exit_layers"].split(",")] if args.get("exit_layers") else None
    layers = fixed or candidates
    train_tokens, cal_tokens = int(args["train_tokens"]), int(args["calibration_tokens"])
    files = training_files(data, args.get("extra_text"))
    name = bundle.manifest.name
    # calibration: the last `cal_tokens` of WikiText-2 valid; training: everything before them, then the extra text
    cal = _cached(model, cache_dir, f"{name}-valid-tail-{cal_tokens}", layers,
                  _text_cache(model, lambda: text_tokens(tokenizer, files[0], skip=-cal_tokens)))
    train = _cached(model, cache_dir, f"{name}-train-{'+'.join(f.stem for f in files)}-{train_tokens}-{cal_tokens}",
                    layers, _text_cache(model, lambda: corpus_tokens(tokenizer, files, train_tokens, hold_out=cal_tokens)))
    answer_lengths: list[int] = []
    text_size = cal.size
    if int(args.get("chat_prompts") or 0):
        chat_text, chat = chat_caches(bundle_dir, model, cache_dir, layers, args)
        print(f"chat text: {chat['train'].size} training and {chat['calibration'].size} calibration tokens")
        train, cal = train.joined(chat["train"]), cal.joined(chat["calibration"])
        answer_lengths = chat_text.split("calibration").answer_lengths()
    groups = None if args.get("independent_tokens") else token_groups(text_size, answer_lengths)
    train_tokens = train.size
    last = model.config.num_layers - 1
    vocab = choose_vocab(train.full_argmax.numpy(), int(args["head_vocab"]), always=spec.eos_ids)
    coverage = float(np.isin(cal.full_argmax.numpy(), vocab).mean())
    print(f"head vocabulary: {vocab.size} tokens cover {coverage:.3f} of the held-out full-model predictions")
    outside_rows = int(args.get("outside_rows", OUTSIDE_ROWS))
    heads = ExitHeads(model.config.hidden_size, int(args["head_hidden"]), model.config.rms_norm_eps,
                      torch.from_numpy(vocab), len(layers), outside_rows=outside_rows).init_from(model)
    config = HeadTrainConfig(loss=args["loss"], steps=int(args["steps"]), batch_size=int(args.get("batch_size") or 128),
                             temperature=float(args.get("temperature") or 1.0))
    loss_tag = config.loss + (f"{config.temperature:g}" if config.loss == "kl" else "")
    trained = cache_dir / (f"{bundle.manifest.name}-heads-{loss_tag}-{config.steps}-{config.batch_size}-{vocab.size}-"
                           f"{heads.hidden}-o{outside_rows}-{train_tokens}-{'_'.join(map(str, layers))}.safetensors")
    if trained.is_file():  # heads trained earlier with the same settings on the same text
        from safetensors.torch import load_file

        heads.load_state_dict(load_file(str(trained)))
        heads.bind(model)
    else:
        for index, layer in enumerate(layers):
            # after the final layer the head stays the model's own norm + LM-head rows (exact there):
            # only its outside-mass estimate learns
            train_head(model, heads, index, train.hidden[layer], train.hidden[last], train.full_argmax, config,
                       frozen_vocab=layer == last)
        save_heads(heads, trained)
    reports, cal_logits = {}, {}
    for index, layer in enumerate(layers):
        cal_logits[layer] = head_logits(heads, index, cal.hidden[layer])
        reports[layer] = agreement_report(cal_logits[layer], vocab, cal.full_argmax.numpy())
        print(f"  layer {layer}: {reports[layer]}")
    chosen, check_cost, lm_head_cost = fixed, None, None
    if not fixed:
        everything = fit_token_calibration([cal_logits[layer] for layer in layers], vocab, cal.full_argmax.numpy(),
                                           model.config.vocab_size)
        prompt = text_tokens(tokenizer, files[0], skip=-cal_tokens, limit=24).tolist()
        check_cost, lm_head_cost = measure_costs(model, heads, layers, everything, prompt)
        # shuffled, so the halves selection fits and measures on both hold WikiText-2 and chat tokens
        order = np.random.default_rng(0).permutation(cal.size)
        chosen = select_exits({layer: z[order] for layer, z in cal_logits.items()}, vocab,
                              cal.full_argmax.numpy()[order], model.config.vocab_size, model.config.num_layers,
                              check_cost, int(args["exits"]), lm_head_cost=lm_head_cost)
    assert chosen is not None  # fixed, or chosen by measurement just above
    keep = [layers.index(layer) for layer in chosen]
    final = ExitHeads(model.config.hidden_size, heads.hidden, model.config.rms_norm_eps, torch.from_numpy(vocab),
                      len(chosen), outside_rows=outside_rows)
    for new, old in enumerate(keep):
        final.heads[new].load_state_dict(heads.heads[old].state_dict())
    calibration = fit_token_calibration([cal_logits[layer] for layer in chosen], vocab, cal.full_argmax.numpy(),
                                        model.config.vocab_size, data_fingerprint=cal.fingerprint, groups=groups)
    print(f"design effect of the calibration tokens: {calibration.design_effect:.2f} tokens per effective sample")
    write_exits(bundle_dir, final, calibration, [*chosen, last], command="exitserve train-llm-heads",
                data_fingerprint=cal.fingerprint,
                extra={"head_training": {"loss": config.loss, "temperature": config.temperature, "steps": config.steps,
                                         "batch_size": config.batch_size, "train_tokens": train_tokens,
                                         "calibration_tokens": cal_tokens,
                                         "calibration_tokens_with_chat": cal.size,
                                         "chat_prompts": int(args.get("chat_prompts") or 0),
                                         "chat_tokens": int(args.get("chat_tokens") or 0),
                                         "outside_rows": heads.outside_rows,
                                         "check_cost_layers": check_cost, "lm_head_cost_layers": lm_head_cost,
                                         "candidates": {str(k): v for k, v in reports.items()},
                                         "vocab_coverage": coverage}})
    print(f"exits after layers {chosen} written to {bundle_dir}")
