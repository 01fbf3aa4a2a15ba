"""Scaling with work (issue 6, part 4): batch size 1 -> 256, the share of early exits, and server memory.

    python benchmarks/scaling.py --bundle bundles/cifar10-resnet-large

In-process engine (the server's, minus HTTP) on CIFAR-10 test images, 1 ONNX Runtime thread as the
server's default: latency and throughput per batch size at full depth and at δ values that send
more and more samples out early (default policy). Then peak RSS (VmHWM) of a real `exitserve serve`
process with one and with three copies of the bundle loaded, after warm-up and a few requests.
Writes benchmarks/results/scaling.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from bench_support import free_port, wait_ready

from exitserve.calibration import Calibration
from exitserve.models.bundle import load_bundle
from exitserve.models.data import load_dataset
from exitserve.service.runners.onnx_runtime import OnnxRunner, RunnerOptions
from exitserve.service.serving.engine import ExitEngine
from exitserve.service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
BATCH_SIZES = (1, 4, 16, 64, 256)
SETTINGS = (("full", 1.0), ("pcee-lb-cond", 0.99), ("pcee-lb-cond", 0.95), ("pcee-lb-cond", 0.9), ("pcee-lb-cond", 0.8))


def engine_scaling(bundle_dir: Path, x: np.ndarray, budget_s: float) -> list[dict]:
    bundle = load_bundle(bundle_dir)
    engine = ExitEngine(OnnxRunner(bundle, options=RunnerOptions(threads=1)),
                        Calibration.from_dict(bundle.calibration, bundle.manifest.num_exits))
    fractions = np.asarray(bundle.manifest.compute_fractions())
    last = bundle.manifest.num_exits - 1
    rows = []
    for batch_size in BATCH_SIZES:
        batches = [x[i : i + batch_size] for i in range(0, len(x) - batch_size + 1, batch_size)]
        for policy, delta in SETTINGS:
            times, exits = [], []
            deadline = time.perf_counter() + budget_s
            for batch in batches:  # different images every call, within a time budget
                policies = np.full(len(batch), policy, dtype=object)
                started = time.perf_counter()
                result = engine.run(batch, np.full(len(batch), delta), policies)
                times.append(time.perf_counter() - started)
                exits.append(result.exit_index)
                if time.perf_counter() > deadline and len(times) >= 5:
                    break
            exit_index = np.concatenate(exits)
            p50 = float(np.median(times))
            rows.append({
                "batch_size": batch_size, "policy": policy, "delta": delta, "calls": len(times),
                "p50_ms": 1000 * p50, "p99_ms": 1000 * float(np.percentile(times, 99)),
                # Throughput from the mean: with early exits latency is bimodal and the median would flatter it.
                "images_per_s": batch_size / float(np.mean(times)), "early_exit_share": float(np.mean(exit_index < last)),
                "mean_compute_fraction": float(fractions[exit_index].mean()),
            })
    return rows


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def server_memory(bundle_dir: Path, x: np.ndarray) -> list[dict]:
    """Peak RSS of `exitserve serve` with 1 and 3 bundles (copies renamed), after warm-up and traffic."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        copies = []
        for i in range(3):
            target = Path(tmp) / f"copy{i}"
            shutil.copytree(bundle_dir, target)
            manifest = json.loads((target / "manifest.json").read_text())
            manifest["name"] = f"{manifest['name']}-{i}"  # the manifest itself is not checksummed
            (target / "manifest.json").write_text(json.dumps(manifest))
            copies.append(target)
        for count in (1, 3):
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "exitserve.service.cli", "serve", *map(str, copies[:count]), "--port", str(port)],
                                    cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                url = f"http://127.0.0.1:{port}"
                wait_ready(f"{url}/readyz")
                after_warmup = _peak_rss_mib(proc.pid)
                for i in range(count):
                    name = json.loads((copies[i] / "manifest.json").read_text())["name"]
                    for start in range(0, 256, 64):
                        httpx.post(f"{url}/v1/models/{name}/predict", json={"inputs": x[start : start + 64].tolist()}, timeout=60)
                rows.append({"bundles": count, "peak_rss_mib_after_warmup": after_warmup,
                             "peak_rss_mib_after_traffic": _peak_rss_mib(proc.pid),
                             "max_batch_size": Settings().max_batch_size})
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    return rows


def markdown(results: dict) -> str:
    lines = ["| batch | setting | p50 ms | p99 ms | images/s | early-exit share | mean compute fraction |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["engine"]:
        setting = "full depth" if r["policy"] == "full" else f"{r['policy']} δ={r['delta']}"
        lines.append(f"| {r['batch_size']} | {setting} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['images_per_s']:.0f} | "
                     f"{r['early_exit_share']:.2f} | {r['mean_compute_fraction']:.3f} |")
    lines += ["", "| bundles loaded | peak RSS after warm-up (MiB) | peak RSS after 256-image traffic per model (MiB) |",
              "| --- | --- | --- |"]
    for r in results["memory"]:
        lines.append(f"| {r['bundles']} | {r['peak_rss_mib_after_warmup']:.0f} | {r['peak_rss_mib_after_traffic']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "cifar10-resnet-large")
    parser.add_argument("--seconds-per-row", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "scaling.json")
    args = parser.parse_args()
    x = load_dataset("cifar10:test").x[:4096]
    results = {"command": "python " + " ".join(["benchmarks/scaling.py", *sys.argv[1:]]),
               "engine": engine_scaling(args.bundle, x, args.seconds_per_row),
               "memory": server_memory(args.bundle, x)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results))


if __name__ == "__main__":
    main()
