"""Control of accuracy over random calibration/test splits (issue 6, part 2).

    python benchmarks/control.py --bundle bundles/cifar10-resnet-large --splits 20

Held-out data: the bundle's 5,000 validation images (held out of training, split seed 0) and the
10,000 CIFAR-10 test images, pooled (15,000; the model trained on neither), so that calibration and
test halves are exchangeable, which is what the promise assumes. Each split shuffles the pool with
its own seed and cuts it into two halves of 7,500: tables are fitted on one (the bundle's own
calibration settings) and every policy is evaluated on the other over δ = 0.50 … 0.99. Logits are
computed once (cached under runs/cache); decisions go through `decide_all`, the function the
server's engine uses. Writes benchmarks/results/control.json and control_curves.png and prints
Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from bench_support import cpu_model
from logits_cache import DEFAULT_CACHE, split_logits

from exitserve.calibration import POLICIES, decide_all, fit_calibration
from exitserve.calibration.evaluation import DEFAULT_EVAL_DELTAS, KEY_DELTAS, policy_row
from exitserve.calibration.fitting import InputFeatures
from exitserve.calibration.plots import _STYLES  # the same colours as the evaluation plots
from exitserve.models.bundle import load_bundle

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
# Policies the goal applies to (violation rate <= alpha); the rest are shown beside them.
# Schema 3 guards every policy's promise the same way, so the goal applies to all of them.
CONTROLLED = POLICIES
FIT_KEYS = ("confidence", "binning", "bins", "window", "alpha", "prior", "tail_bins")
# The coverage panel: the default, the previous default and the unguarded confidence rule.
COVERAGE_POLICIES = ("pcee-lb-global", "pcee-lb-tail", "pcee-lb-cond", "confidence")


def run_splits(logits: list[np.ndarray], labels: np.ndarray, fractions: np.ndarray, fit_kwargs: dict,
               splits: int, seed: int, deltas: np.ndarray, features: InputFeatures | None = None
               ) -> dict[str, list[list[dict]]]:
    """rows[policy][split][δ index]: `policy_row` of each split's test half. With `features` the input
    guard is fitted on each calibration half and applied to its test half, as the server applies it."""
    n = labels.size
    half = n // 2
    rows: dict[str, list[list[dict]]] = {p: [] for p in POLICIES}
    for s in range(splits):
        order = np.random.default_rng([seed, s]).permutation(n)  # one seed per split: each reproducible alone
        cal, test = order[:half], order[half:2 * half]
        guard = None if features is None else InputFeatures(features.name, features.values[cal], features.quantile)
        calibration = fit_calibration([z[cal] for z in logits], labels[cal], features=guard, **fit_kwargs)
        typical = None if features is None or calibration.input_guard is None else \
            calibration.input_guard.in_distribution(features.values[test])
        test_logits = [z[test] for z in logits]
        for policy in POLICIES:
            rows[policy].append([
                policy_row(decide_all(calibration, policy, test_logits, float(d), typical), labels[test], float(d),
                           fractions, len(logits))
                for d in deltas
            ])
    return rows


def summarise(rows: list[list[dict]], deltas: np.ndarray) -> list[dict]:
    """Per δ, over splits: violation rate, promised accuracy (mean, min), coverage, accuracy, compute."""
    out = []
    for j, d in enumerate(deltas):
        at = [split[j] for split in rows]
        promised = [r["accuracy_promised"] for r in at if r["accuracy_promised"] is not None]
        violations = sum(r["violation"] for r in at)
        # Small p = the shortfall is unlikely to be test-half noise alone (one-sided binomial, from policy_row).
        p_values = [r["violation_p_value"] for r in at if r["violation_p_value"] is not None]
        out.append({
            "delta": float(d),
            "splits": len(at),
            "splits_with_promise": len(promised),
            "violations": int(violations),
            "violation_rate": violations / len(at),
            "accuracy_promised_mean": float(np.mean(promised)) if promised else None,
            "accuracy_promised_min": float(np.min(promised)) if promised else None,
            "n_promised_mean": float(np.mean([r["n_promised"] for r in at])),
            "violation_p_value_median": float(np.median(p_values)) if p_values else None,
            "coverage": float(np.mean([r["coverage"] for r in at])),
            "accuracy": float(np.mean([r["accuracy"] for r in at])),
            "accuracy_std": float(np.std([r["accuracy"] for r in at])),
            "compute_fraction": float(np.mean([r["compute_fraction"] for r in at])),
        })
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(20, 5.5))
    alpha = report["fit"]["alpha"]
    for policy, summary in report["policies"].items():
        color, line = _STYLES.get(policy, ("tab:gray", "-"))
        pts = sorted((r["compute_fraction"], r["accuracy"]) for r in summary["per_delta"])
        left.plot([p[0] for p in pts], [p[1] for p in pts], line, color=color, marker=".", markersize=3, label=policy)
        right.plot([r["delta"] for r in summary["per_delta"]], [r["violation_rate"] for r in summary["per_delta"]], line,
                   color=color, marker=".", markersize=3, label=policy)
    ex = report["exits"]
    left.plot([e["compute_fraction"] for e in ex], [e["accuracy"] for e in ex], "ks", markersize=7,
              label="single exit (all samples)")
    for e in ex:
        left.annotate(f"exit {e['index']}", (e["compute_fraction"], e["accuracy"]), textcoords="offset points",
                      xytext=(5, -12), fontsize=8)
    n = report["splits"]
    left.set_title(f"accuracy vs compute, mean over {n} test halves (δ 0.50 … 0.99)")
    left.set_xlabel("mean compute fraction (FLOPs / full model)")
    left.set_ylabel("overall accuracy")
    left.legend(fontsize=7, loc="lower right")
    old = report.get("schema1_reference")
    for policy in COVERAGE_POLICIES:
        color, line = _STYLES.get(policy, ("tab:gray", "-"))
        rows = report["policies"][policy]["per_delta"]
        middle.plot([r["delta"] for r in rows], [r["coverage"] for r in rows], line, color=color, marker=".", markersize=3,
                    label=policy)
        bad = [r for r in rows if r["violation_rate"] > alpha]
        middle.plot([r["delta"] for r in bad], [r["coverage"] for r in bad], "x", color=color, markersize=8)
    if old:
        middle.plot(old["deltas"], old["coverage"], ":", color="black", label=f"{old['policy']} before (schema 1)")
        if "confidence_coverage" in old:
            middle.plot(old["deltas"], old["confidence_coverage"], ":", color=_STYLES["confidence"][0],
                        label="confidence before (unguarded)")
    middle.set_title(f"promised coverage vs δ, mean over {report['splits']} test halves (x: violation rate > α)")
    middle.set_xlabel("δ (requested accuracy)")
    middle.set_ylabel("coverage (share answered with target_met)")
    middle.legend(fontsize=7, loc="lower left")
    middle.grid(alpha=0.3)
    right.axhline(alpha, color="black", linewidth=1, linestyle=":", label=f"α = {alpha}")
    right.set_title(f"violation rate over {n} splits (promised accuracy < δ)")
    right.set_xlabel("δ (requested accuracy)")
    right.set_ylabel("share of splits violating")
    right.set_ylim(-0.02, 1.02)
    right.legend(fontsize=7, loc="upper left")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def render_matrix(report: dict) -> list[str]:
    """Policies × key δ: violations of n splits, then mean coverage / mean compute fraction."""
    n, alpha = report["splits"], report["fit"]["alpha"]
    lines = ["| policy | " + " | ".join(f"δ = {d:.2f}" for d in KEY_DELTAS) + " |", "| --- |" + " --- |" * len(KEY_DELTAS)]
    for policy, summary in report["policies"].items():
        cells = []
        for r in summary["per_delta"]:
            if round(r["delta"], 2) in KEY_DELTAS:
                v = f"{r['violations']}/{n}"
                cells.append(f"{'**' + v + '**' if r['violation_rate'] > alpha else v} · {r['coverage']:.2f} / {r['compute_fraction']:.2f}")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return lines


def render(report: dict) -> str:
    n = report["splits"]
    lines = [*render_matrix(report), "", f"| policy | δ | violations (of {n}) | promised accuracy: mean (min) | promised samples (mean) | coverage | accuracy | compute |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for policy, summary in report["policies"].items():
        for r in summary["per_delta"]:
            if round(r["delta"], 2) not in KEY_DELTAS:
                continue
            v = f"{r['violations']} ({r['violation_rate']:.2f})"
            lines.append(f"| {policy} | {r['delta']:.2f} | {'**' + v + '**' if r['violation_rate'] > report['fit']['alpha'] else v} | "
                         f"{fmt(r['accuracy_promised_mean'])} ({fmt(r['accuracy_promised_min'])}) | {r['n_promised_mean']:.1f} | "
                         f"{r['coverage']:.3f} | "
                         f"{r['accuracy']:.3f} | {r['compute_fraction']:.3f} |")
    lines += ["", f"| policy | worst violation rate at key δ | violation rate over the whole sweep ({len(report['deltas'])} δ × {n}) | "
              "δ in the sweep where the rate > α: rate (median p of the violations) | goal (≤ α at every key δ) |",
              "| --- | --- | --- | --- | --- |"]
    alpha = report["fit"]["alpha"]
    for policy, summary in report["policies"].items():
        goal = summary["goal_met"]
        over = [f"{r['delta']:.2f}: {r['violation_rate']:.2f} (p {fmt(r['violation_p_value_median'], '.2g')})"
                for r in summary["per_delta"] if r["violation_rate"] > alpha]
        if len(over) > 6:
            over = [*over[:2], f"… {len(over) - 4} more …", *over[-2:]]
        lines.append(f"| {policy} | {summary['worst_key_violation_rate']:.2f} | {summary['sweep_violation_rate']:.3f} | "
                     f"{'; '.join(over) or 'none'} | {'–' if goal is None else ('**met**' if goal else '**missed**')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "cifar10-resnet-large")
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--old", type=Path, default=RESULTS / "schema1-reference.json",
                        help="the previous default's figures, drawn for comparison (calibration_report.py --extract-old)")
    args = parser.parse_args()
    start = time.perf_counter()

    bundle = load_bundle(args.bundle, require_calibration=True)
    fit_kwargs = {k: bundle.calibration[k] for k in FIT_KEYS}  # the settings the shipped tables were fitted with
    parts = [split_logits(bundle, spec, args.cache) for spec in ("cifar10:val", "cifar10:test")]
    logits = [np.concatenate([p.logits[k] for p in parts]) for k in range(bundle.manifest.num_exits)]
    labels = np.concatenate([p.labels for p in parts])
    fractions = np.asarray(bundle.manifest.compute_fractions())
    deltas = DEFAULT_EVAL_DELTAS
    logits_done = time.perf_counter()

    guard = bundle.calibration.get("input_guard")
    features = None
    if guard is not None and all(p.features is not None for p in parts):
        features = InputFeatures(guard["features"], np.concatenate([p.features for p in parts]), guard["quantile"])
    rows = run_splits(logits, labels, fractions, fit_kwargs, args.splits, args.seed, deltas, features)
    alpha = float(fit_kwargs["alpha"])
    policies = {}
    key = [j for j, d in enumerate(deltas) if round(float(d), 2) in KEY_DELTAS]
    for policy in POLICIES:
        per_delta = summarise(rows[policy], deltas)
        worst = max(per_delta[j]["violation_rate"] for j in key)
        policies[policy] = {
            "per_delta": per_delta,
            "worst_key_violation_rate": worst,
            "sweep_violation_rate": float(np.mean([r["violation_rate"] for r in per_delta])),
            "goal_met": (worst <= alpha) if policy in CONTROLLED else None,
        }
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{cpu_model()}, {platform.machine()}, no GPU",
        "bundle": bundle.manifest.name,
        "held_out": {"pool": "cifar10:val (5,000, held out of training, split seed 0) + cifar10:test (10,000)",
                     "n": int(labels.size), "calibration_half": int(labels.size // 2), "test_half": int(labels.size // 2),
                     "fingerprints": [p.fingerprint for p in parts]},
        "splits": args.splits,
        "seed": args.seed,
        "split_seeds": f"numpy default_rng([{args.seed}, s]) for s in 0..{args.splits - 1}",
        "fit": fit_kwargs,
        "input_guard": None if features is None else {"quantile": features.quantile, "fitted_per_split": True},
        "deltas": [float(d) for d in deltas],
        "key_deltas": list(KEY_DELTAS),
        "controlled_policies": list(CONTROLLED),
        # Each exit at full depth on the pooled data (every test half is a random half of it).
        "exits": [{"index": k, "compute_fraction": float(fractions[k]), "accuracy": float((z.argmax(axis=1) == labels).mean())}
                  for k, z in enumerate(logits)],
        "policies": policies,
        "goal_met": all(policies[p]["goal_met"] for p in CONTROLLED),
        "schema1_reference": json.loads(args.old.read_text())["splits"] if args.old.exists() else None,
        "seconds": {"logits": logits_done - start, "splits": time.perf_counter() - logits_done},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "control.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    plot(report, args.out / "control_curves.png")
    print(render(report))
    print(f"\nwrote {args.out / 'control.json'} and control_curves.png; splits took {report['seconds']['splits']:.0f} s")


if __name__ == "__main__":
    main()
