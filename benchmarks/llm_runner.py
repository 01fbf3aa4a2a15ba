"""Runner choice for token generation: the decoder's runners on a generation bundle, batch 1.

    python benchmarks/llm_runner.py runs/bundles/smollm2 --positions 300 --threads 1

For each runner (`service/serving/generation/runners.py`: the torch modules, and ONNX Runtime over
graphs built from the same weights; both keep the KV cache and attention in torch):
- one decoder layer for one new token over `--positions` cached ones, the same layer again and
  again (its 14 MB of weights stay in cache: the best case);
- every layer once in turn, as a decoding step runs them (each layer's weights cold: the real case);
- the full LM head (49,152 rows) and an exit head (K restricted rows), cold in the same way.
Also the largest difference between the runners' outputs. Medians and p99, interleaved rounds (so
that load on a shared machine hits both alike). Writes benchmarks/results/llm-runner.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from exitserve.models.bundle import load_bundle
from exitserve.models.llm.llama import LayerSpan, load_llama
from exitserve.service.serving.generation.model import load_heads
from exitserve.service.serving.generation.runners import RUNNERS, DecoderRunner, make_runner

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def summary(samples: list[float]) -> dict:
    ms = np.asarray(samples) * 1000
    return {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "calls": int(ms.size)}


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--positions", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "llm-runner.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_llama(args.bundle)
    config, p = model.config, args.positions
    heads = load_heads(load_bundle(args.bundle), config.hidden_size, config.rms_norm_eps)
    if heads is not None:
        heads.bind(model)
    runners: dict[str, DecoderRunner] = {name: make_runner(name, model, heads, threads=args.threads) for name in RUNNERS}
    torch.manual_seed(0)
    x = torch.randn(1, config.hidden_size)
    cache = model.new_cache(p + 1)
    for keys, values in cache:
        keys.normal_()
        values.normal_()

    def one_layer(runner: DecoderRunner):
        return runner.layer(args.layer, x, [LayerSpan.starting_at((0, 1), p, *cache[args.layer])])

    def every_layer(runner: DecoderRunner):
        y = x
        for index in range(config.num_layers):
            y = runner.layer(index, y, [LayerSpan.starting_at((0, 1), p, *cache[index])])
        return y

    parts = {"one layer, warm weights": one_layer, f"{config.num_layers} layers in turn": every_layer,
             "full LM head": lambda r: r.lm_logits(x)}
    if heads is not None:
        parts["exit head (K rows)"] = lambda r: r.head_logits(0, x)
    outputs = {name: {part: fn(runner) for part, fn in parts.items()} for name, runner in runners.items()}
    first, second = (outputs[name] for name in RUNNERS)
    checks = {part: float((first[part] - second[part]).abs().max()) for part in parts}
    assert all(v < 1e-2 for v in checks.values()), checks

    samples: dict[str, dict[str, list[float]]] = {name: {part: [] for part in parts} for name in runners}
    for _ in range(args.rounds):  # interleaved, so that load on the shared machine hits both alike
        for name, runner in runners.items():
            for part, fn in parts.items():
                reps = max(1, args.reps // args.rounds // (config.num_layers if "in turn" in part else 1))
                samples[name][part].extend(timed(lambda f=fn, r=runner: f(r), reps))
    result = {"bundle": str(args.bundle), "layer": args.layer, "positions": p, "threads": args.threads,
              "head_rows": heads.vocab_size if heads is not None else None, "max_abs_difference": checks,
              "torch_version": torch.__version__,
              "runners": {name: {part: summary(s) for part, s in per.items()} for name, per in samples.items()}}
    import onnxruntime

    result["onnxruntime_version"] = onnxruntime.__version__
    print(f"batch 1, {p} cached positions, {args.threads} thread(s); median ms (p99)")
    print("| part | " + " | ".join(RUNNERS) + " | torch / onnxruntime |")
    print("| --- |" + " --- |" * (len(RUNNERS) + 1))
    for part in parts:
        row = {name: result["runners"][name][part] for name in RUNNERS}
        ratio = row["torch"]["median_ms"] / row["onnxruntime"]["median_ms"]
        print(f"| {part} | " + " | ".join(f"{row[n]['median_ms']:.2f} ({row[n]['p99_ms']:.2f})" for n in RUNNERS)
              + f" | {ratio:.2f}× |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
