"""The headline III (issue 27): the cascade with early exit against the static networks of its family.

    python benchmarks/headline_cascade.py --large runs/bundles/cifar10-cascade-large \\
        --small runs/bundles/cifar10-cascade-w16 runs/bundles/cifar10-cascade-w32 ... --out DIR

Every bundle's logits on cifar10:val and cifar10:test are computed once (cached under runs/cache).
Split 0 is the standard one (calibrate on the 5,000 held-out training images, test on the 10,000
test images); splits 1 and 2 pool those 15,000 images and draw 5,000 for calibration and 10,000 for
the test at random (seeded), so the spread shows what the choice of calibration images does. On each
split the large model is calibrated as `exitserve calibrate` does (`fit_calibration`), its exits are
decided by `decide_all` (the server's function) for δ 0.50…0.99 under `pcee-lb-tail` (the default),
`pcee` and the `confidence` baseline, and its test error is read off the error-vs-FLOPs curve at each
small network's full cost: the ratio the PCEE paper reports (0.81). The static networks are trained
with the same recipe and epochs; "the strongest small model" at a cost is the best of them there.
Writes headline.json and headline.png under --out and prints Markdown tables.
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
from flops_spent import RouteFlops
from headline import PAPER_RATIO, curves_on, error_at, frontier, mflops_to_reach
from logits_cache import DEFAULT_CACHE, split_logits

from exitserve.calibration import fit_calibration
from exitserve.calibration.evaluation import DEFAULT_EVAL_DELTAS
from exitserve.models.bundle import Bundle, load_bundle

REPO = Path(__file__).resolve().parent.parent
POLICIES = ("pcee-lb-tail", "pcee", "confidence")
CALIBRATION_SIZE = 5000


def split_indices(n_val: int, n_test: int, split: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, test) indices into the pooled val + test images; split 0 is the standard split."""
    if split == 0:
        return np.arange(n_val), np.arange(n_val, n_val + n_test)
    order = np.random.default_rng(split).permutation(n_val + n_test)
    return np.sort(order[:CALIBRATION_SIZE]), np.sort(order[CALIBRATION_SIZE:])


def pooled(bundle: Bundle, cache: Path) -> tuple[list[np.ndarray], np.ndarray, int]:
    val, test = split_logits(bundle, "cifar10:val", cache), split_logits(bundle, "cifar10:test", cache)
    logits = [np.concatenate([v, t]) for v, t in zip(val.logits, test.logits, strict=True)]
    return logits, np.concatenate([val.labels, test.labels]), val.labels.size


def large_curves(bundle: Bundle, logits: list[np.ndarray], labels: np.ndarray, cal_idx: np.ndarray,
                 test_idx: np.ndarray) -> dict:
    calibration = fit_calibration([z[cal_idx] for z in logits], labels[cal_idx])
    exits, curves = curves_on(bundle, calibration, RouteFlops(bundle, calibration), [z[test_idx] for z in logits],
                              labels[test_idx], DEFAULT_EVAL_DELTAS, POLICIES)
    return {"exits": exits, "policies": curves}


def static_point(bundle: Bundle, logits: list[np.ndarray], labels: np.ndarray, test_idx: np.ndarray) -> dict:
    z = logits[-1][test_idx]
    route_mflops = bundle.manifest.exits[-1].cumulative_flops / 1e6
    return {"name": bundle.manifest.name, "mflops": route_mflops,
            "error": float((z.argmax(axis=1) != labels[test_idx]).mean())}


def static_frontier_error(points: list[dict], mflops: float) -> float | None:
    """Error of the best static network costing at most `mflops` (None if none is that cheap)."""
    affordable = [p["error"] for p in points if p["mflops"] <= mflops * (1 + 1e-9)]
    return min(affordable) if affordable else None


def compare_split(large: dict, smalls: list[dict]) -> dict:
    out: dict = {}
    for policy in POLICIES:
        rows = large["policies"][policy]
        per_small = {}
        for small in smalls:
            strongest = static_frontier_error(smalls, small["mflops"])
            error = error_at(rows, small["mflops"])
            match = mflops_to_reach(rows, small["error"])
            per_small[small["name"]] = {
                "small_mflops": small["mflops"], "small_error": small["error"],
                "strongest_static_error": strongest,
                "large_error": error, "ratio": None if error is None else error / small["error"],
                "ratio_vs_strongest": None if error is None or not strongest else error / strongest,
                "large_mflops_to_match": match,
                "mflops_ratio_to_match": None if match is None else match / small["mflops"],
            }
        out[policy] = per_small
    return out


def summarise(splits: list[dict], names: list[str]) -> dict:
    """Mean, min and max over splits of each ratio."""
    summary: dict = {}
    for policy in POLICIES:
        summary[policy] = {}
        for name in names:
            entries = [s["comparison"][policy][name] for s in splits]
            ratios = [e["ratio"] for e in entries if e["ratio"] is not None]
            errors = [e["large_error"] for e in entries if e["large_error"] is not None]
            summary[policy][name] = {
                "small_mflops": entries[0]["small_mflops"],
                "small_error_mean": float(np.mean([e["small_error"] for e in entries])),
                "large_error_mean": float(np.mean(errors)) if len(errors) == len(entries) else None,
                "ratio_mean": float(np.mean(ratios)) if len(ratios) == len(entries) else None,
                "ratio_min": float(min(ratios)) if ratios else None,
                "ratio_max": float(max(ratios)) if ratios else None,
                "goal_met": len(ratios) == len(entries) and float(np.mean(ratios)) <= PAPER_RATIO,
            }
    return summary


def plot(split: dict, path: Path, large_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for policy, style in zip(POLICIES, ("-", "--", ":"), strict=True):
        xs, ys = frontier(split["large"]["policies"][policy])
        ax.plot(xs, 100 * ys, style, color="tab:blue", marker=".", markersize=3, label=f"{large_name} + {policy} (δ 0.50…0.99)")
    ex = split["large"]["exits"]
    ax.plot([e["mflops"] for e in ex], [100 * e["error"] for e in ex], "o", color="tab:blue", markerfacecolor="none",
            markersize=7, label=f"{large_name}: each exit at full depth")
    smalls = sorted(split["smalls"], key=lambda s: s["mflops"])
    ax.plot([s["mflops"] for s in smalls], [100 * s["error"] for s in smalls], "s-", color="tab:orange",
            label="static networks of the same family and recipe")
    for s in smalls:
        ax.annotate(s["name"].removeprefix("cifar10-cascade-"), (s["mflops"], 100 * s["error"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7, color="tab:orange")
    ax.set_xscale("log")
    ax.set_xlabel("mean MFLOPs per sample (multiply-add = 2; log scale)")
    ax.set_ylabel("CIFAR-10 test error (%)")
    ax.set_title(f"{large_name} with early exit vs static networks (CIFAR-10 test, split 0)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(report: dict) -> str:
    lines = [f"| policy | small network: MFLOPs, error (mean of {len(report['splits'])} splits) | "
             f"{report['large_name']} error at that cost | ratio, mean (min–max) | goal ≤ {PAPER_RATIO:.2f} |",
             "| --- | --- | --- | --- | --- |"]
    for policy, per_small in report["summary"].items():
        for name, s in per_small.items():
            ratio = "out of reach" if s["ratio_mean"] is None else f"{s['ratio_mean']:.3f} ({s['ratio_min']:.3f}–{s['ratio_max']:.3f})"
            error = "–" if s["large_error_mean"] is None else f"{100 * s['large_error_mean']:.2f} %"
            lines.append(f"| {policy} | {name.removeprefix('cifar10-')}: {s['small_mflops']:.1f}, {100 * s['small_error_mean']:.2f} % | "
                         f"{error} | {ratio} | {'**yes**' if s['goal_met'] else 'no'} |")
    split0 = report["splits"][0]
    lines += ["", f"| {report['large_name']} exit | MFLOPs | test error (split 0) |", "| --- | --- | --- |"]
    lines += [f"| {e['index']} | {e['mflops']:.1f} | {100 * e['error']:.2f} % |" for e in split0["large"]["exits"]]
    lines += ["", "| network | MFLOPs | epochs | training on this machine's CPU |", "| --- | --- | --- | --- |"]
    for name, t in report["training"].items():
        minutes = "–" if t["train_seconds"] is None else f"{t['train_seconds'] / 60:.1f} min"
        lines.append(f"| {name.removeprefix('cifar10-')} | {t['mflops']:.1f} | {t['epochs']} | {minutes} ({t['device']}) |")
    return "\n".join(lines)


def training(bundle: Bundle) -> dict:
    """How the bundle's network was trained, from its manifest's provenance."""
    extra = bundle.manifest.created_by.extra
    config = extra.get("train_config") or {}
    return {"architecture": extra.get("architecture"), "epochs": config.get("epochs"), "device": config.get("device"),
            "bf16": config.get("bf16"), "train_seconds": extra.get("train_seconds"),
            "mflops": bundle.manifest.exits[-1].cumulative_flops / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--large", type=Path, required=True)
    parser.add_argument("--small", type=Path, nargs="+", required=True, help="static networks (one exit each)")
    parser.add_argument("--splits", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--large-name", default="cascade-large")
    args = parser.parse_args()
    start = time.perf_counter()
    large_bundle = load_bundle(args.large)
    large_logits, labels, n_val = pooled(large_bundle, args.cache)
    small_bundles = [load_bundle(p) for p in args.small]
    small_logits = [pooled(b, args.cache)[0] for b in small_bundles]
    splits = []
    for split in range(args.splits):
        cal_idx, test_idx = split_indices(n_val, labels.size - n_val, split)
        large = large_curves(large_bundle, large_logits, labels, cal_idx, test_idx)
        smalls = [static_point(b, z, labels, test_idx) for b, z in zip(small_bundles, small_logits, strict=True)]
        splits.append({"split": split, "calibration_n": int(cal_idx.size), "test_n": int(test_idx.size),
                       "large": large, "smalls": smalls, "comparison": compare_split(large, smalls)})
    names = [b.manifest.name for b in small_bundles]
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{cpu_model()}, {platform.machine()}, no GPU",
        "data": "cifar10 val (5,000 held-out training images) + test (10,000); split 0 standard, others re-drawn",
        "large_name": args.large_name, "large_bundle": large_bundle.manifest.name,
        "paper_ratio": PAPER_RATIO,
        "training": {b.manifest.name: training(b) for b in (large_bundle, *small_bundles)},
        "splits": splits,
        "summary": summarise(splits, names),
        "seconds": time.perf_counter() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "headline.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    plot(splits[0], args.out / "headline.png", args.large_name)
    print(render(report))
    print(f"\nwrote {args.out / 'headline.json'} and headline.png in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
