"""Every policy's promise at every δ in 0.001 steps on the CIFAR-10 test set (issue 26).

    python benchmarks/promise_sweep.py [--bundle bundles/cifar10-resnet-large]

The bundle's own tables and input guard, the 10,000 test images, δ = 0.500, 0.501, …, 0.999 (500
values), through `decide_all` (the engine's decisions) with the guard applied as the server applies
it. Per policy: how many δ values show a promised accuracy below δ, how many of those chance explains
badly (one-sided binomial p < 0.05), the worst p, and coverage and compute at the key δ.
Writes benchmarks/results/promise-sweep.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from logits_cache import DEFAULT_CACHE, split_logits
from scipy import stats

from exitserve.calibration import POLICIES, Calibration, decide_all
from exitserve.models.bundle import load_bundle

REPO = Path(__file__).resolve().parent.parent
KEY = (0.8, 0.9, 0.95, 0.99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "cifar10-resnet-large")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "promise-sweep.json")
    args = parser.parse_args()
    bundle = load_bundle(args.bundle, require_calibration=True)
    calibration = Calibration.from_dict(bundle.calibration, bundle.manifest.num_exits)
    test = split_logits(bundle, "cifar10:test", args.cache)
    guard = calibration.input_guard
    typical = None if guard is None or test.features is None else guard.in_distribution(test.features)
    fractions = np.asarray(bundle.manifest.compute_fractions())
    deltas = np.round(np.arange(0.500, 0.9995, 0.001), 3)
    policies = {}
    for policy in POLICIES:
        shortfalls, significant, worst, key = 0, 0, 1.0, {}
        for delta in deltas:
            d = decide_all(calibration, policy, test.logits, float(delta), typical)
            n = int(d.target_met.sum())
            right = int((d.prediction[d.target_met] == test.labels[d.target_met]).sum())
            if n and right / n < delta:
                shortfalls += 1
                p = float(stats.binom.cdf(right, n, delta))
                significant += p < 0.05
                worst = min(worst, p)
            if round(float(delta), 3) in KEY:
                key[str(round(float(delta), 2))] = {"coverage": n / d.target_met.size,
                                                    "promised_accuracy": right / n if n else None,
                                                    "compute": float(fractions[d.exit_index].mean())}
        policies[policy] = {"deltas_below": shortfalls, "significant_p05": int(significant), "worst_p": worst, "key": key}
        print(f"{policy:20s} below δ at {shortfalls:3d} of {deltas.size}, significant {significant}, worst p {worst:.3f}")
    report = {"command": " ".join(["python", *sys.argv]), "bundle": bundle.manifest.name, "deltas": deltas.size,
              "input_guard_withheld": None if typical is None else float(1 - typical.mean()), "policies": policies}
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
