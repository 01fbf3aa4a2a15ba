"""Which score ranks right above wrong best, per exit? (issue 15, lever 2: failure prediction)

    python benchmarks/failure_scores.py --bundle bundles/cifar10-resnet-large

Fitted on the bundle's 5,000 validation images, measured on the 10,000 CIFAR-10 test images (logits
cached by logits_cache.py). Scores per exit, all from features the exit already has:
  max-softmax   the temperature-scaled top probability (what the tables use today);
  margin, entropy  the other built-in measures;
  logistic (this exit)  a logistic regression on [max-softmax, margin, 1 - normalised entropy,
                 top logit] of this exit;
  logistic (+ earlier exits)  the same plus, for every earlier exit, its max-softmax and whether its
                 prediction agrees with this exit's (needs state carried across exits).
AUROC (higher = better) and AURC (lower = better) of "correct" per exit. Writes
benchmarks/results/failure_scores.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from logits_cache import DEFAULT_CACHE, split_logits

from exitserve.calibration.confidence import confidence_from_probs, softmax, top2_margin
from exitserve.calibration.metrics import aurc, auroc
from exitserve.calibration.temperature import fit_temperature
from exitserve.models.bundle import load_bundle

REPO = Path(__file__).resolve().parent.parent


def exit_features(logits: np.ndarray, temperature: float) -> np.ndarray:
    probs = softmax(logits, temperature)
    return np.stack([probs.max(axis=1), top2_margin(probs), confidence_from_probs(probs, "entropy"),
                     np.asarray(logits, np.float64).max(axis=1)], axis=1)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Newton's method on the L2-regularised log-loss; features standardised. Returns (mean, std, weights)."""
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-12
    z = np.column_stack([np.ones(len(x)), (x - mean) / std])
    w = np.zeros(z.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-z @ w))
        grad = z.T @ (p - y) + l2 * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + l2 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return mean, std, w


def score(model: tuple[np.ndarray, np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    mean, std, w = model
    return 1.0 / (1.0 + np.exp(-(np.column_stack([np.ones(len(x)), (x - mean) / std]) @ w)))


def with_history(logits: list[np.ndarray], temperatures: list[float], k: int) -> np.ndarray:
    own = exit_features(logits[k], temperatures[k])
    prediction = logits[k].argmax(axis=1)
    extra = [np.column_stack([softmax(logits[j], temperatures[j]).max(axis=1), logits[j].argmax(axis=1) == prediction])
             for j in range(k)]
    return np.column_stack([own, *extra]) if extra else own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "cifar10-resnet-large")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "failure_scores.json")
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    cal, test = (split_logits(bundle, spec, args.cache) for spec in ("cifar10:val", "cifar10:test"))
    exits = bundle.manifest.num_exits
    temperatures = [fit_temperature(cal.logits[k], cal.labels) for k in range(exits)]
    rows = []
    for k in range(exits):
        y_cal = (cal.logits[k].argmax(axis=1) == cal.labels).astype(float)
        correct = test.logits[k].argmax(axis=1) == test.labels
        probs = softmax(test.logits[k], temperatures[k])
        scores = {
            "max-softmax": probs.max(axis=1),
            "margin": top2_margin(probs),
            "entropy": confidence_from_probs(probs, "entropy"),
            "logistic (this exit)": score(fit_logistic(exit_features(cal.logits[k], temperatures[k]), y_cal),
                                          exit_features(test.logits[k], temperatures[k])),
        }
        if k:
            scores["logistic (+ earlier exits)"] = score(fit_logistic(with_history(cal.logits, temperatures, k), y_cal),
                                                         with_history(test.logits, temperatures, k))
        rows.append({"exit": k, "accuracy": float(correct.mean()),
                     "scores": {name: {"auroc": auroc(s, correct), "aurc": aurc(s, correct)} for name, s in scores.items()}})
    report = {"command": " ".join(["python", *sys.argv]), "bundle": bundle.manifest.name,
              "fit": "cifar10:val (5,000)", "measured": "cifar10:test (10,000)", "exits": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    names = list(rows[-1]["scores"])
    print("| exit | accuracy | " + " | ".join(f"{n}: AUROC / AURC" for n in names) + " |")
    print("| --- | --- |" + " --- |" * len(names))
    for r in rows:
        cells = [f"{r['scores'][n]['auroc']:.4f} / {r['scores'][n]['aurc']:.4f}" if n in r["scores"] else "–" for n in names]
        print(f"| {r['exit']} | {r['accuracy']:.4f} | " + " | ".join(cells) + " |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
