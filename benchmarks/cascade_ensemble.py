"""Ensembling earlier exits at an exit (issue 27's last lever), measured on a trained cascade.

    python benchmarks/cascade_ensemble.py --large runs/bundles/cifar10-cascade-large-sd \\
        --small runs/bundles/s16-cascade-w64 --out benchmarks/results/headline-cascade-sd/ensemble.json

At exit k the ensemble scores log_softmax(z_k) + w * sum_{j<k} log_softmax(z_j) (a geometric mean
of the exits so far, as Zero Time Waste and IMTA do; its extra cost is a few adds of 10 numbers).
The weight w is chosen per exit on the calibration images (cifar10:val) and reported on the test
images; then the ensembled logits are calibrated and decided like `headline_cascade.py` does (split 0)
and the large model's error at the small network's full cost is read off, with and without the
ensemble. Uses the logits cache of `headline_cascade.py` (runs/cache).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from headline_cascade import compare_split, large_curves, pooled, split_indices, static_point
from logits_cache import DEFAULT_CACHE

from exitserve.models.bundle import load_bundle

WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def ensembled(logits: list[np.ndarray], weights: list[float]) -> list[np.ndarray]:
    """Exit k's scores plus weights[k] times the earlier exits' log-probabilities (exit 0 as it is)."""
    logp = [log_softmax(z) for z in logits]
    return [logp[k] + weights[k] * sum(logp[:k], np.zeros_like(logp[k])) for k in range(len(logp))]


def error(z: np.ndarray, labels: np.ndarray) -> float:
    return float((z.argmax(axis=1) != labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--large", type=Path, required=True)
    parser.add_argument("--small", type=Path, required=True, help="the static network whose cost is compared at")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    large, small = load_bundle(args.large), load_bundle(args.small)
    logits, labels, n_val = pooled(large, args.cache)
    cal, test = split_indices(n_val, labels.size - n_val, 0)
    per_exit, chosen = [], [0.0]
    for k in range(1, len(logits)):
        rows = []
        for w in WEIGHTS:
            weights = [0.0] * len(logits)
            weights[k] = w
            z = ensembled(logits, weights)[k]
            rows.append({"weight": w, "val_error": error(z[cal], labels[cal]), "test_error": error(z[test], labels[test])})
        best = min(rows, key=lambda r: r["val_error"])
        chosen.append(best["weight"])
        per_exit.append({"exit": k, "rows": rows, "chosen_weight": best["weight"]})
    small_point = static_point(small, pooled(small, args.cache)[0], labels, test)
    comparison = {}
    for name, z in (("plain", logits), ("ensembled", ensembled(logits, chosen))):
        curves = large_curves(large, z, labels, cal, test)
        comparison[name] = {policy: row[small_point["name"]]
                            for policy, row in compare_split(curves, [small_point]).items()}
    report = {"command": " ".join(["python", *sys.argv]), "large_bundle": large.manifest.name,
              "small": small_point, "per_exit": per_exit, "chosen_weights": chosen, "comparison": comparison}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for entry in per_exit:
        print(f"exit {entry['exit']}: " + ", ".join(f"w {r['weight']}: val {100 * r['val_error']:.2f} / test "
                                                    f"{100 * r['test_error']:.2f} %" for r in entry["rows"]))
    for name, by_policy in comparison.items():
        print(name, {p: round(c["ratio"], 3) for p, c in by_policy.items() if c["ratio"] is not None})


if __name__ == "__main__":
    main()
