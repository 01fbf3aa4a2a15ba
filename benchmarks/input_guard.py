"""The input guard, measured: which score, how well it separates foreign inputs, what it costs (issue 26).

    python benchmarks/input_guard.py [--bundle bundles/cifar10-resnet-large] [--rounds 30]

1. Score choice. Candidate scores, each thresholded to withhold 1 % of the bundle's calibration
   samples (cifar10:val), on the CIFAR-10 test set (the share withheld from real photos) and on foreign
   inputs made here: uniform and Gaussian noise, constant and horizontal-gradient images, MNIST digits
   as 32x32 RGB (1,000 each, seed 0). Candidates: each exit's max-softmax (after its temperature), energy
   (log-sum-exp of the logits), max-logit, a class-conditional Mahalanobis distance on the logits, and
   the Mahalanobis distance of the first segment's pooled features (models.features: per channel, the
   mean and standard deviation of its hidden state) — the one the bundle's guard uses.
2. Cost. Full depth (policy `full`), 64-image batches through the server's engine: the bundle as
   calibrated (features tap in the graphs, guard applied) against the same bundle with the tap
   stripped from its graphs (no guard), alternating, `--rounds` rounds; medians, p99 and their ratio.
   Also the guard's own scoring time per sample.

Writes benchmarks/results/input-guard.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from bench_support import cpu_model
from PIL import Image

from exitserve.calibration import Calibration
from exitserve.calibration.confidence import softmax
from exitserve.models.bundle import MANIFEST_FILE, load_bundle, write_manifest
from exitserve.models.data import load_dataset
from exitserve.models.spans import add_spans
from exitserve.service.runners.onnx_runtime import OnnxRunner, RunnerOptions
from exitserve.service.serving.engine import ExitEngine
from exitserve.service.tools.offline import bundle_outputs

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
WITHHELD = 0.01  # every score is thresholded to withhold this share of the calibration samples


def foreign_sets(n: int = 1000, seed: int = 0, data_root: Path | None = None) -> dict[str, np.ndarray]:
    """Inputs unlike CIFAR-10, float32 NCHW in [0, 1]."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, 32, dtype=np.float32)[None, None, None, :]
    start, end = rng.random((n, 3, 1, 1), dtype=np.float32), rng.random((n, 3, 1, 1), dtype=np.float32)
    sets = {
        "uniform noise": rng.random((n, 3, 32, 32), dtype=np.float32),
        "gaussian noise": np.clip(rng.normal(0.5, 0.25, (n, 3, 32, 32)), 0, 1).astype(np.float32),
        "constant": np.broadcast_to(rng.random((n, 3, 1, 1), dtype=np.float32), (n, 3, 32, 32)).copy(),
        "gradient": np.broadcast_to(start + (end - start) * ramp, (n, 3, 32, 32)).astype(np.float32),
    }
    mnist = (data_root or REPO.parent / "shared" / "data") / "mnist" / "mnist_test.npz"
    if mnist.exists():
        digits = np.load(mnist)["x"][:n]
        big = np.stack([np.asarray(Image.fromarray(d).resize((32, 32), Image.BILINEAR)) for d in digits])
        sets["MNIST as RGB"] = np.repeat(big[:, None].astype(np.float32) / 255.0, 3, axis=1)
    return sets


def logit_scores(calibration: Calibration, logits: list[np.ndarray], fit: dict | None = None) -> tuple[dict, dict]:
    """Per exit, higher = more typical: max-softmax, energy, max-logit, class-conditional Mahalanobis on
    logits (its class means and shared covariance fitted on the first call, passed back in `fit`)."""
    scores, fit = {}, dict(fit or {})
    for k, z in enumerate(logits):
        z = z.astype(np.float64)
        scores[f"exit {k} max-softmax"] = softmax(z, float(calibration.temperatures[k])).max(axis=1)
        top = z.max(axis=1, keepdims=True)
        scores[f"exit {k} energy"] = (top + np.log(np.exp(z - top).sum(axis=1, keepdims=True)))[:, 0]
        scores[f"exit {k} max-logit"] = top[:, 0]
        pred = z.argmax(axis=1)
        if k not in fit:
            means = np.stack([z[pred == c].mean(axis=0) if (pred == c).any() else z.mean(axis=0) for c in range(z.shape[1])])
            centred = z - means[pred]
            cov = centred.T @ centred / len(z) + 1e-3 * np.eye(z.shape[1])
            fit[k] = (means, np.linalg.inv(cov))
        means, precision = fit[k]
        centred = z - means[pred]
        scores[f"exit {k} logit Mahalanobis"] = -np.einsum("ij,jk,ik->i", centred, precision, centred)
    return scores, fit


def score_table(bundle_dir: Path, data_root: Path | None) -> dict:
    bundle = load_bundle(bundle_dir, require_calibration=True)
    calibration = Calibration.from_dict(bundle.calibration, bundle.manifest.num_exits)
    assert calibration.input_guard is not None, "calibrate the bundle first (it fits the guard)"
    sets = {"cifar10:val": load_dataset("cifar10:val").x, "cifar10:test": load_dataset("cifar10:test").x,
            **foreign_sets(data_root=data_root)}
    rows: dict[str, dict[str, float]] = {}
    reference: dict[str, np.ndarray] = {}
    fit: dict = {}
    for name, x in sets.items():
        logits, features = bundle_outputs(bundle, x, progress=False)
        scores, fit = logit_scores(calibration, logits, fit)
        scores["first-segment pooled features, Mahalanobis (the guard)"] = -calibration.input_guard.scores(features)
        if name == "cifar10:val":
            reference = {s: np.quantile(v, WITHHELD) for s, v in scores.items()}
            continue
        for score, values in scores.items():
            rows.setdefault(score, {})[name] = float((values < reference[score]).mean())
    return {"withheld_on_calibration": WITHHELD, "share_withheld": rows}


def strip_tap(source: Path, target: Path) -> None:
    """A copy of a calibrated bundle without the features tap in its graphs (the cost baseline)."""
    shutil.copytree(source, target)
    raw = json.loads((target / MANIFEST_FILE).read_text())
    tap = raw["segments"][0].pop("features")
    raw["segments"][0]["outputs"].remove(tap)
    path = target / raw["segments"][0]["file"]
    model = onnx.load(str(path))
    keep = [node for node in model.graph.node if not node.name.startswith("features_tap/")]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    outputs = [o for o in model.graph.output if o.name != tap]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    onnx.save(model, str(path))
    calibration = json.loads((target / "calibration.json").read_text())
    calibration.pop("input_guard")
    (target / "calibration.json").write_text(json.dumps(calibration))
    write_manifest(target, raw)
    add_spans(target)


def cost(bundle_dir: Path, rounds: int, batch: int, threads: int) -> dict:
    x = load_dataset("cifar10:test").x[:batch]
    with tempfile.TemporaryDirectory() as tmp:
        plain_dir = Path(tmp) / "untapped"
        strip_tap(bundle_dir, plain_dir)
        engines = {}
        for name, path in (("guarded", bundle_dir), ("no tap, no guard", plain_dir)):
            bundle = load_bundle(path, require_calibration=True)
            runner = OnnxRunner(bundle, options=RunnerOptions(threads=threads))
            runner.warmup([batch])
            engines[name] = ExitEngine(runner, Calibration.from_dict(bundle.calibration, bundle.manifest.num_exits))
        assert engines["guarded"].input_guard is not None and engines["no tap, no guard"].input_guard is None
        deltas, policies = np.full(batch, 0.9), np.full(batch, "full", dtype=object)
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(rounds):
            for name, engine in engines.items():
                start = time.perf_counter()
                for _ in range(5):
                    engine.run(x, deltas, policies)
                times[name].append((time.perf_counter() - start) / 5)
        guard = engines["guarded"].input_guard
        _, features = bundle_outputs(load_bundle(bundle_dir), x, progress=False)
        assert guard is not None and features is not None
        start = time.perf_counter()
        for _ in range(200):
            guard.in_distribution(features)
        scoring_us = (time.perf_counter() - start) / 200 / batch * 1e6
    summary = {name: {"median_ms": float(np.median(t) * 1e3), "p99_ms": float(np.percentile(t, 99) * 1e3),
                      "images_per_s": float(batch / np.median(t))} for name, t in times.items()}
    ratios = np.array(times["guarded"]) / np.array(times["no tap, no guard"])
    return {"batch": batch, "rounds": rounds, "runs_per_round": 5, "threads": threads, "policy": "full", **summary,
            "throughput_ratio_guarded_over_plain": float(1 / np.median(ratios)),
            "guard_scoring_us_per_sample": scoring_us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "cifar10-resnet-large")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "input-guard.json")
    args = parser.parse_args()
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{cpu_model()}, {platform.machine()}, no GPU",
        "bundle": args.bundle.name,
        "scores": score_table(args.bundle, args.data_root),
        "cost": cost(args.bundle, args.rounds, args.batch, args.threads),
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
