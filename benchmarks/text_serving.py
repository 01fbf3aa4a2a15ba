"""Serving a MiniLM text bundle (issue 9): full depth vs δ vs the same model as one ONNX graph.

    python benchmarks/text_serving.py --bundle runs/bundles/sst2-minilm-self-supervised --data sst2

The monolithic twin is the bundle's segments merged into one graph with the early heads pruned
(`models.monolithic`), calibrated with one exit and served by the same server, tokenizer and
HTTP path: what differs is exiting, nothing else. Load from `wrk` (one thread, C) with the test
sentences cycled one per request, or 64 per request. Accuracy of what is served comes from the
server itself: every test sentence sent once at each δ.
Writes benchmarks/results/text-serving-<data>.json and prints Markdown for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
from bench_support import cpu_model, free_port, wait_ready
from serving import REPO, RESULTS, _start, _stop, _wrk

from exitserve.models.bundle import load_bundle
from exitserve.models.data import load_dataset

FULL = {"policy": "full"}


def ensure_monolithic(bundle_dir: Path, data: str) -> Path:
    from exitserve.models.monolithic import monolithic_bundle
    from exitserve.service.tools.offline import calibrate_bundle

    mono = bundle_dir.parent / f"{bundle_dir.name}-monolithic"
    source = load_bundle(bundle_dir).manifest
    if not (mono / "calibration.json").is_file() or load_bundle(mono).manifest.created_by.extra.get("monolithic_of") != f"{source.name} v{source.version}":
        monolithic_bundle(bundle_dir, mono, name=f"{source.name}-monolithic")
        calibrate_bundle(mono, f"{data}:val", progress=False)
    return mono


def served_accuracy(url: str, model: str, texts: list[str], y: np.ndarray, extra: dict) -> dict:
    """Send every test text once (64 per request); what the server answered, scored."""
    predictions = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for start in range(0, len(texts), 64):
            response = client.post(f"/v1/models/{model}/predict", json={"texts": texts[start : start + 64], **extra})
            response.raise_for_status()
            predictions += response.json()["predictions"]
    correct = np.array([p["class_index"] for p in predictions]) == y
    met = np.array([p["target_met"] for p in predictions])
    exits = np.array([p["exit"] for p in predictions])
    return {
        "samples": len(y), "accuracy": float(correct.mean()), "coverage": float(met.mean()),
        "promised_accuracy": float(correct[met].mean()) if met.any() else None,
        "mean_compute_fraction": float(np.mean([p["compute_fraction"] for p in predictions])),
        "exit_histogram": np.bincount(exits, minlength=predictions[0]["exits_total"]).tolist(),
    }


def run(bundle_dir: Path, data: str, seconds: int, clients: tuple[int, ...], deltas: tuple[float, ...],
        policies: tuple[str, ...], threads: int) -> dict:
    test = load_dataset(f"{data}:test")
    # The server refuses texts over the bundle's token limit (a 400, by design): leave those out here.
    from exitserve.service.serving.text_input import TextTokenizer

    tokenizer = TextTokenizer(load_bundle(bundle_dir))
    limit = tokenizer.spec.max_length
    fits = np.array([len(e.ids) <= limit for e in tokenizer.tokenizer.encode_batch([str(t) for t in test.x])])
    texts = [str(t) for t, ok in zip(test.x, fits, strict=True) if ok]
    labels = test.y[fits]
    mono_dir = ensure_monolithic(bundle_dir, data)
    servers = {"exitserve": bundle_dir, "monolithic": mono_dir}
    settings = {"max_batch_size": 64, "max_queue_delay_ms": 2, "threads": threads}
    out: dict = {"machine": {"cpu": cpu_model(), "cores": 2, "python": platform.python_version()},
                 "bundle": str(bundle_dir), "monolithic": str(mono_dir), "data": f"{data}:test", "seconds": seconds,
                 "settings": settings, "texts": len(texts), "left_out_over_limit": int((~fits).sum()),
                 "accuracy": {}, "load": {}}
    for server, directory in servers.items():
        model = load_bundle(directory).manifest.name
        port = free_port()
        proc = _start([sys.executable, "-m", "exitserve.service.cli", "serve", str(directory), "--port", str(port),
                       "--max-batch-size", "64", "--max-queue-delay-ms", "2"], {"EXITSERVE_THREADS": str(threads)})
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(f"{url}/readyz")
            variants = {"full depth": FULL}
            if server != "monolithic":
                variants |= {f"δ={d} {p}": {"delta": d, "policy": p} for d in deltas for p in policies}
            for variant, extra in variants.items():
                key = f"{server} {variant}"
                out["accuracy"][key] = served_accuracy(url, model, texts, labels, extra)
                print(key, out["accuracy"][key], flush=True)
                for per_request in (1, 64):
                    bodies = [json.dumps({"texts": texts[i : i + per_request], **extra}).encode()
                              for i in range(0, len(texts) - per_request + 1, per_request)]
                    for connections in clients if per_request == 1 else (1,):
                        with tempfile.TemporaryDirectory() as tmp:
                            target = f"{url}/v1/models/{model}/predict"
                            headers = {"Content-Type": "application/json"}
                            _wrk(target, bodies, headers, connections, 1, Path(tmp))  # warm-up
                            result = _wrk(target, bodies, headers, connections, seconds, Path(tmp))
                        result["texts_per_s"] = result["req_per_s"] * per_request
                        out["load"][f"{key} | {per_request} per request | {connections} clients"] = result
                        print(key, per_request, connections, f"{result['texts_per_s']:.0f} texts/s",
                              f"p50 {result['p50_us'] / 1000:.1f} ms p99 {result['p99_us'] / 1000:.1f} ms", flush=True)
        finally:
            _stop(proc)
    return out


def markdown(results: dict) -> str:
    lines = ["| served | accuracy | coverage (`target_met`) | accuracy where met | mean compute | samples per exit |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, a in results["accuracy"].items():
        promised = "–" if a["promised_accuracy"] is None else f"{a['promised_accuracy']:.4f}"
        lines.append(f"| {key} | {a['accuracy']:.4f} | {a['coverage']:.3f} | {promised} | {a['mean_compute_fraction']:.3f} | "
                     f"{' / '.join(map(str, a['exit_histogram']))} |")
    lines += ["", "| served | texts per request | clients | texts/s | p50 ms | p99 ms | vs monolithic | non-2xx |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    load = results["load"]
    for key, r in load.items():
        served, per_request, connections = key.split(" | ")
        mono = load.get(f"monolithic full depth | {per_request} | {connections}")
        ratio = f"{r['texts_per_s'] / mono['texts_per_s']:.2f}×" if mono else "–"
        lines.append(f"| {served} | {per_request.split()[0]} | {connections.split()[0]} | {r['texts_per_s']:.0f} | "
                     f"{r['p50_us'] / 1000:.1f} | {r['p99_us'] / 1000:.1f} | {ratio} | {r['non_2xx'] + r['socket_errors']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", required=True, choices=["sst2", "agnews"])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--deltas", type=float, nargs="+", default=[0.95])
    parser.add_argument("--policies", nargs="+", default=["pcee", "pcee-lb-cond"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    results = run(args.bundle, args.data, args.seconds, tuple(args.clients), tuple(args.deltas), tuple(args.policies), args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"text-serving-{args.data}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    print(f"\nwrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
