"""Check and time exitserve's CUDA paths on a GPU machine (issues 16 and 18); writes one JSON file.

    python benchmarks/cuda_check.py --bundle BUNDLE --out cuda.json

BUNDLE is a CIFAR-10 classifier bundle exported with --torchscript. What runs:

- classifier, torch runner on the GPU: the engine's decisions (exit, class) against the same
  bundle's ONNX graphs under ONNX Runtime on the CPU, on test images; device-to-host copies per
  batch counted by the profiler (only exit logits should cross, never hidden states); batch 1
  and 64 latency at full depth and δ 0.8 against the plain chain of the same TorchScript modules.
- the same with CUDA graphs (one per span and batch-size bucket), against the whole model as one graph.
- classifier, ONNX Runtime's CUDA provider: the same, when this ONNX Runtime build has it.
- language model, decoder on the GPU: a tiny random decoder's greedy tokens equal the CPU's,
  exact mode equals full greedy; a SmolLM2-135M-shaped random decoder's tokens/s at full depth
  with 1 and 16 streams (random weights: speed only, exits mean nothing).
- with `--llm-bundle` (a generation bundle, e.g. the README's SmolLM2 build): its tokens/s at full
  depth, early exit δ 0.9 and exact mode, 1 and 16 streams, WikiText-2 prompts, on the GPU.

Nothing here runs in CI; BENCHMARKS.md records what a GPU machine gave.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from exitserve.calibration import Calibration
from exitserve.models.bundle import load_bundle
from exitserve.models.data import load_dataset
from exitserve.service.runners.onnx_runtime import OnnxRunner, RunnerOptions
from exitserve.service.runners.torch_runner import TorchScriptRunner
from exitserve.service.serving.engine import ExitEngine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # llm_support: the tiny random decoder the decoder tests use


DEVICE = "cuda"  # --device cpu runs the same checks here, to test the script before a GPU run


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], reps: int) -> dict:
    for _ in range(max(3, reps // 10)):
        fn()
    times = []
    for _ in range(reps):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"median_ms": 1e3 * statistics.median(times), "p99_ms": 1e3 * times[min(len(times) - 1, int(0.99 * len(times)))],
            "reps": reps}


def environment() -> dict:
    import onnxruntime as ort

    return {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else None, "onnxruntime": ort.__version__,
            "onnxruntime_providers": ort.get_available_providers()}


def decisions(engine: ExitEngine, x: np.ndarray, delta: float, policy: str, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    exits, classes = [], []
    for i in range(0, len(x), batch):
        part = x[i:i + batch]
        result = engine.run(part, np.full(len(part), delta), np.full(len(part), policy, dtype=object))
        exits.append(result.exit_index.copy())
        classes.append(result.class_index.copy())
    return np.concatenate(exits), np.concatenate(classes)


def device_to_host_copies(fn: Callable[[], object]) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize()
    names = [e.name for e in prof.events() if "memcpy" in e.name.lower() and "dtoh" in e.name.lower().replace(" ", "")]
    return {"dtoh_copies": len(names), "names": sorted(set(names))}


def classifier(bundle_path: Path, images: int, policy: str, provider: str) -> dict:
    bundle = load_bundle(bundle_path, require_calibration=True)
    calibration = Calibration.from_dict(bundle.calibration, num_exits=bundle.manifest.num_exits)
    x = load_dataset("cifar10:test").x[:images].astype(np.float32)
    cpu_engine = ExitEngine(OnnxRunner(bundle, options=RunnerOptions(provider="cpu", threads=4)), calibration)
    if provider in ("torch", "torch-graphs"):
        graphs = [1, 4, 16, 64] if provider == "torch-graphs" else None
        runner = TorchScriptRunner(bundle, device=DEVICE, cuda_graph_buckets=graphs)
    else:
        runner = OnnxRunner(bundle, options=RunnerOptions(provider=DEVICE))
    gpu_engine = ExitEngine(runner, calibration)
    out: dict = {"bundle": bundle.manifest.name, "images": len(x), "policy": policy}
    for delta, pol in ((0.8, policy), (0.9, policy), (1.0, "full")):
        ref_exit, ref_class = decisions(cpu_engine, x, delta, pol)
        got_exit, got_class = decisions(gpu_engine, x, delta, pol)
        out[f"{pol}@{delta}"] = {"same_exit": int((ref_exit == got_exit).sum()),
                                 "same_class": int((ref_class == got_class).sum()),
                                 "mean_exit": float(got_exit.mean())}
    for batch in (1, 64):
        part = x[:batch]
        full = (np.full(batch, 1.0), np.full(batch, "full", dtype=object))
        early = (np.full(batch, 0.8), np.full(batch, policy, dtype=object))
        row: dict = {"copies_full": device_to_host_copies(lambda p=part, a=full: gpu_engine.run(p, *a)),
                     "copies_delta_0.8": device_to_host_copies(lambda p=part, a=early: gpu_engine.run(p, *a)),
                     "segments": bundle.manifest.num_exits}
        reps = 300 if batch == 1 else 100
        row["engine_full"] = timed(lambda p=part, a=full: gpu_engine.run(p, *a), reps)
        row["engine_delta_0.8"] = timed(lambda p=part, a=early: gpu_engine.run(p, *a), reps)
        if isinstance(runner, TorchScriptRunner):
            row["plain_chain"] = timed(lambda p=part: plain_chain(runner, p), reps)
            row["full_over_plain"] = row["plain_chain"]["median_ms"] / row["engine_full"]["median_ms"]
            if runner.graphs is not None:  # the whole model as one replayed graph: a plain endpoint with graphs
                last = bundle.manifest.num_exits - 1
                row["plain_graphed"] = timed(lambda p=part, n=last: runner.run_span(0, n, runner.start(p)), reps)
                row["full_over_plain_graphed"] = row["plain_graphed"]["median_ms"] / row["engine_full"]["median_ms"]
        out[f"batch_{batch}"] = row
    if isinstance(runner, TorchScriptRunner) and runner.graphs is not None:
        out["graphs_captured"] = len(runner.graphs)
    return out


@torch.inference_mode()
def plain_chain(runner: TorchScriptRunner, x: np.ndarray) -> np.ndarray:
    """What a hand-written endpoint does: every segment in turn, the last exit's logits to the host."""
    specs = runner.bundle.manifest.segments
    state = runner.start(x)
    logits = None
    for module, spec in zip(runner.modules, specs, strict=True):
        outputs = module(*(state[name] for name in spec.inputs))
        values = dict(zip(spec.outputs, outputs if isinstance(outputs, tuple) else (outputs,), strict=True))
        logits = values.pop(spec.logits)
        state = values
    assert logits is not None
    return logits.float().cpu().numpy()


def decoder_checks(runner_name: str) -> dict:
    from llm_support import EXIT_LAYERS, random_prompts, tiny_calibration, tiny_heads, tiny_model

    from exitserve.service.serving.generation.decoder import MultiExitDecoder

    model = tiny_model()
    heads = tiny_heads(model)
    calibration = tiny_calibration(model, heads)
    prompts = random_prompts(12, seed=11)
    cpu_full = generate(MultiExitDecoder(model, heads, EXIT_LAYERS, calibration, runner="torch"), prompts, 20, mode="full")
    gpu = MultiExitDecoder(model.to(DEVICE), heads.to(DEVICE), EXIT_LAYERS, calibration, runner=runner_name)
    gpu_full = generate(gpu, prompts, 20, mode="full")
    gpu_exact = generate(gpu, prompts, 20, mode="exact", delta=0.15, policy="confidence", max_draft=6)
    gpu_early = generate(gpu, prompts, 20, mode="early", delta=0.5)
    return {"prompts": len(prompts), "full_gpu_equals_cpu": sum(a == b for a, b in zip(gpu_full, cpu_full, strict=True)),
            "exact_equals_full": sum(a == b for a, b in zip(gpu_exact, gpu_full, strict=True)),
            "early_tokens_differ_from_full": sum(a != b for a, b in zip(gpu_early, gpu_full, strict=True))}


def generate(dec, prompts: list[list[int]], new_tokens: int, **options) -> list[list[int]]:
    seqs = [dec.new_sequence(p, capacity=len(p) + new_tokens + 16, **options) for p in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    running = list(range(len(prompts)))
    while running:
        for i, tokens in zip(running, dec.step([seqs[i] for i in running]), strict=True):
            outs[i].extend(t.token for t in tokens)
        running = [i for i in running if len(outs[i]) < new_tokens]
    return [o[:new_tokens] for o in outs]


def decoder_speed(runner_name: str, streams_list: list[int], new_tokens: int = 64) -> dict:
    from llm_support import random_prompts, tiny_calibration, tiny_heads

    from exitserve.models.llm.llama import LlamaConfig, LlamaModel
    from exitserve.service.serving.generation.decoder import MultiExitDecoder

    config = LlamaConfig()  # SmolLM2-135M's shape
    torch.manual_seed(0)
    model = LlamaModel(config).eval().requires_grad_(False)
    exit_layers = [15, 29, 29]
    heads = tiny_heads(model, vocab_size=8192, exit_layers=exit_layers)
    calibration = tiny_calibration(model, heads, tokens=500, exit_layers=exit_layers)
    dec = MultiExitDecoder(model.to(DEVICE), heads.to(DEVICE), exit_layers, calibration, runner=runner_name)
    out: dict = {"model": "SmolLM2-135M shape, random weights, float32", "new_tokens": new_tokens}
    for streams in streams_list:
        prompts = random_prompts(streams, seed=5, vocab=config.vocab_size)
        generate(dec, prompts, 8, mode="full")  # warm-up
        synchronize()
        start = time.perf_counter()
        generate(dec, prompts, new_tokens, mode="full")
        synchronize()
        seconds = time.perf_counter() - start
        seqs = [dec.new_sequence(p, capacity=len(p) + 32, mode="full") for p in prompts]
        dec.step(seqs)  # the prompt; then decoding steps, each should read only its tokens back
        copies = device_to_host_copies(lambda s=seqs: [dec.step(s) for _ in range(4)])
        out[f"streams_{streams}"] = {"tokens_per_s": streams * new_tokens / seconds,
                                     "ms_per_step": 1e3 * seconds / new_tokens,
                                     "dtoh_copies_per_step": copies["dtoh_copies"] / 4}
    return out


def bundle_modes(path: Path, runner_name: str, streams_list: list[int], new_tokens: int = 64) -> dict:
    """A real generation bundle on the device: tokens/s per mode and number of streams (after a warm-up)."""
    from prometheus_client import CollectorRegistry

    from exitserve.calibration.rules import DEFAULT_POLICY
    from exitserve.service.serving.generation.model import GenerationModel

    gm = GenerationModel(load_bundle(path), CollectorRegistry(), device=DEVICE, runner=runner_name)
    gm.warm_up()
    lines = [line.strip() for line in (ROOT.parent / "shared" / "data" / "text" / "wikitext-2" / "test.txt")
             .read_text().splitlines() if len(line.split()) > 30 and not line.strip().startswith("=")]
    modes = {"full": {"mode": "full"}, "early δ=0.9": {"mode": "early", "delta": 0.9, "policy": DEFAULT_POLICY},
             "exact": {"mode": "exact", "delta": 0.8, "policy": "pcee"}}
    out: dict = {"bundle": str(path), "row_cost": gm.decoder.row_cost, "new_tokens": new_tokens}
    for streams in streams_list:
        prompts = [gm.encode(" " + line)[:24] for line in lines[:streams]]
        for name, options in modes.items():
            generate(gm.decoder, prompts, 8, **options)  # warm-up
            synchronize()
            start = time.perf_counter()
            generate(gm.decoder, prompts, new_tokens, **options)
            synchronize()
            out[f"{name} streams_{streams}"] = streams * new_tokens / (time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a CIFAR-10 bundle exported with --torchscript")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--policy", default="pcee-lb-tail")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: try the script without a GPU")
    parser.add_argument("--streams", default="1,16", help="decoder speed: concurrent streams per row")
    parser.add_argument("--parts", help="comma-separated part names to run (default: all)")
    parser.add_argument("--llm-bundle", type=Path, help="a generation bundle: its modes' tokens/s on the device")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    result: dict = {"environment": environment()}
    streams = [int(s) for s in args.streams.split(",")]
    cuda_provider = DEVICE == "cpu" or "CUDAExecutionProvider" in result["environment"]["onnxruntime_providers"]
    parts: list[tuple[str, Callable[[], dict]]] = [
        ("classifier_torch_cuda", lambda: classifier(args.bundle, args.images, args.policy, "torch")),
        ("decoder_torch_cuda", lambda: decoder_checks("torch")),
        ("decoder_speed_torch_cuda", lambda: decoder_speed("torch", streams)),
    ]
    if DEVICE == "cuda":
        parts.insert(1, ("classifier_torch_cuda_graphs", lambda: classifier(args.bundle, args.images, args.policy, "torch-graphs")))
    if cuda_provider:
        parts += [("classifier_onnxruntime_cuda", lambda: classifier(args.bundle, args.images, args.policy, "onnxruntime")),
                  ("decoder_onnxruntime_cuda", lambda: decoder_checks("onnxruntime")),
                  ("decoder_speed_onnxruntime_cuda", lambda: decoder_speed("onnxruntime", streams))]
    else:
        result["onnxruntime_cuda"] = "not run: this ONNX Runtime build has no CUDAExecutionProvider"
    if args.llm_bundle is not None:
        parts.append(("llm_bundle_modes_torch", lambda: bundle_modes(args.llm_bundle, "torch", streams)))
    if args.parts:
        wanted = set(args.parts.split(","))
        parts = [(name, part) for name, part in parts if name in wanted]
    for name, part in parts:
        began = time.perf_counter()
        try:
            result[name] = part()
        except Exception:  # record and go on: one failing path must not hide the others
            result[name] = {"error": traceback.format_exc()}
        result[name]["seconds"] = time.perf_counter() - began
        print(name, json.dumps(result[name])[:1500], flush=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
