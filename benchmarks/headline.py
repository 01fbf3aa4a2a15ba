"""Large model with early exit vs small model at equal cost (issues 6 and 17; arXiv 2412.19325's headline).

    python benchmarks/headline.py     # runs/bundles/cifar10-resnet-small-ge vs runs/bundles/cifar10-resnet-deep-late-ge

Calibrates both bundles on cifar10:val in place (runs/ copies, never committed; `--large-calibrated`
keeps a committed large bundle's calibration as it is), takes every exit's logits on cifar10:val and
cifar10:test once (cached under runs/cache), and compares test error against mean FLOPs per sample:
each exit of both models at full depth, the small model with PCEE over δ (its own early-exit curve),
the large model with `pcee`, `pcee-lb-cond` and the `confidence` baseline over δ. Also counts
destructive overthinking (an early exit right where the last exit is wrong). Decisions go through
`decide_all`, the function the server's engine uses. Writes headline.json and headline.png under
--out and prints Markdown tables. BENCHMARKS.md §4.1 has the commands that train the two bundles.
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
from logits_cache import DEFAULT_CACHE, split_logits

from exitserve.calibration import Calibration, decide_all, fit_calibration
from exitserve.calibration.evaluation import DEFAULT_EVAL_DELTAS, policy_row
from exitserve.calibration.io import save_calibration
from exitserve.models.bundle import CALIBRATION_FILE, Bundle, load_bundle, refresh_checksums

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
HEADLINE_POLICIES = ("pcee", "pcee-lb-cond", "confidence")
SMALL_POLICIES = ("pcee",)  # the small model's own early-exit curve
PAPER_ERRORS = (0.060, 0.074)  # large with PCEE vs small, at the small model's FLOPs (arXiv 2412.19325)
PAPER_RATIO = PAPER_ERRORS[0] / PAPER_ERRORS[1]


def calibrate_in_place(directory: Path, bundle: Bundle, cache: Path) -> Calibration:
    """What `exitserve calibrate DIR --data cifar10:val` does, but from the cached logits."""
    val = split_logits(bundle, "cifar10:val", cache)
    calibration = fit_calibration(val.logits, val.labels, data_fingerprint=val.fingerprint)
    save_calibration(calibration, directory / CALIBRATION_FILE)
    refresh_checksums(directory)
    load_bundle(directory, require_calibration=True)  # what we wrote must load
    return calibration


def overthinking(logits: list[np.ndarray], labels: np.ndarray) -> dict:
    """Destructive overthinking: how often exit k is right where the last exit is wrong (share of all samples)."""
    right = np.stack([z.argmax(axis=1) == labels for z in logits])  # [exits, n]
    last_wrong = ~right[-1]
    return {
        "per_exit": [float((r & last_wrong).mean()) for r in right[:-1]],
        "any_early_exit": float((right[:-1].any(axis=0) & last_wrong).mean()),
        "last_exit_error": float(last_wrong.mean()),
    }


def curves_on(bundle: Bundle, calibration: Calibration, route: RouteFlops, logits: list[np.ndarray],
              labels: np.ndarray, deltas: np.ndarray, policies: tuple[str, ...]) -> tuple[list[dict], dict[str, list[dict]]]:
    """Per exit at full depth, and each policy over δ: error and mean MFLOPs per sample on these logits,
    as the manifest adds them up (`mflops`: every exit head on the way) and as the server runs them
    (`mflops_run`: the heads of exits that can fire at δ, fused spans between; flops_spent.py)."""
    manifest = bundle.manifest
    mflops = np.array([e.cumulative_flops for e in manifest.exits]) / 1e6
    fractions = np.asarray(manifest.compute_fractions())
    exits = []
    for k, z in enumerate(logits):
        accuracy = float((z.argmax(axis=1) == labels).mean())
        exits.append({"index": k, "mflops": float(mflops[k]), "compute_fraction": float(fractions[k]),
                      "accuracy": accuracy, "error": 1.0 - accuracy})
    curves = {}
    for policy in policies:
        rows = []
        for delta in deltas:
            d = decide_all(calibration, policy, logits, float(delta))
            row = policy_row(d, labels, float(delta), fractions, manifest.num_exits)
            row["mflops"] = float(mflops[d.exit_index].mean())
            row["mflops_run"] = route.mean(policy, float(delta), d.exit_index) / 1e6
            row["error"] = 1.0 - row["accuracy"]
            rows.append(row)
        curves[policy] = rows
    return exits, curves


def model_curves(
    bundle: Bundle, calibration: Calibration, cache: Path, deltas: np.ndarray, policies: tuple[str, ...]
) -> dict:
    """`curves_on` the CIFAR-10 test set, with the cost of full depth and overthinking."""
    test = split_logits(bundle, "cifar10:test", cache)
    route = RouteFlops(bundle, calibration)  # reads every graph's FLOPs: once
    exits, curves = curves_on(bundle, calibration, route, test.logits, test.labels, deltas, policies)
    return {
        "bundle": bundle.manifest.name, "full_mflops": exits[-1]["mflops"],
        "full_mflops_run": route.full_depth() / 1e6,
        "test_n": int(test.labels.size),
        "calibration_fingerprint": calibration.data_fingerprint, "logits_seconds": test.seconds,
        "exits": exits, "policies": curves, "overthinking": overthinking(test.logits, test.labels),
    }


def frontier(rows: list[dict], key: str = "mflops") -> tuple[np.ndarray, np.ndarray]:
    """The δ-sweep as a piecewise-linear curve in (MFLOPs, error), sorted by cost; at equal cost the lower error."""
    points: dict[float, float] = {}
    for r in rows:
        x = round(r[key], 9)
        points[x] = min(points.get(x, np.inf), r["error"])
    xs = np.array(sorted(points))
    return xs, np.array([points[x] for x in xs])


def error_at(rows: list[dict], mflops: float, key: str = "mflops") -> float | None:
    """Error interpolated along the curve at this cost; None outside the costs the curve reaches."""
    xs, ys = frontier(rows, key)
    if mflops < xs[0] or mflops > xs[-1]:
        return None
    return float(np.interp(mflops, xs, ys))


def mflops_to_reach(rows: list[dict], error: float, key: str = "mflops") -> float | None:
    """Lowest cost at which the curve (linear between δ points) reaches this error or less; None if never."""
    xs, ys = frontier(rows, key)
    if ys[0] <= error:
        return float(xs[0])
    for i in range(1, xs.size):
        if ys[i] <= error:  # crossing inside segment i-1 .. i
            t = (ys[i - 1] - error) / (ys[i - 1] - ys[i])
            return float(xs[i - 1] + t * (xs[i] - xs[i - 1]))
    return None


def below_small_curve(small_rows: list[dict], large_rows: list[dict], key: str = "mflops", points: int = 200) -> dict:
    """Large curve minus small curve (error) over the costs both reach; below everywhere if the max is < 0."""
    sx, _ = frontier(small_rows, key)
    lx, _ = frontier(large_rows, key)
    lo, hi = max(sx[0], lx[0]), min(sx[-1], lx[-1])
    if lo > hi:
        return {"shared_mflops": None, "max_gap": None, "share_below": None, "below_everywhere": False}
    grid = np.linspace(lo, hi, points)
    gap = np.array([error_at(large_rows, g, key) - error_at(small_rows, g, key) for g in grid])
    return {"shared_mflops": [float(lo), float(hi)], "max_gap": float(gap.max()), "min_gap": float(gap.min()),
            "share_below": float((gap < 0).mean()), "below_everywhere": bool((gap < 0).all())}


def compare(small: dict, large: dict, key: str = "mflops") -> dict:
    """The headline at the small model's full cost, FLOPs as the manifest adds them (`mflops`) or as
    the servers run them (`mflops_run`: the small model deployed plainly, no inner heads)."""
    small_mflops = small["full_mflops" if key == "mflops" else "full_mflops_run"]
    small_error = small["exits"][-1]["error"]
    out = {}
    for policy in HEADLINE_POLICIES:
        rows = large["policies"][policy]
        xs, ys = frontier(rows, key)
        error = error_at(rows, small_mflops, key)
        match = mflops_to_reach(rows, small_error, key)
        ratio = None if error is None else error / small_error
        cheapest = int(np.argmin(xs))
        out[policy] = {
            "small_full_mflops": small_mflops,
            "small_full_error": small_error,
            "large_error_at_small_mflops": error,
            "error_ratio": ratio,
            "large_mflops_to_match_small_error": match,
            "mflops_ratio_to_match": None if match is None else match / small_mflops,
            # The large model cannot spend less than its first exit on any sample; if that already costs
            # more than the small model at full depth, equal cost is out of reach and no ratio exists.
            "large_min_mflops": float(xs[cheapest]),
            "large_error_at_min_mflops": float(ys[cheapest]),
            "large_first_exit_mflops": large["exits"][0]["mflops"],
            "equal_cost_reachable": error is not None,
            "goal_met": ratio is not None and ratio <= PAPER_RATIO,
            "vs_small_pcee_curve": below_small_curve(small["policies"]["pcee"], rows, key),
        }
    return out


def plot(small: dict, large: dict, result: dict, path: Path, small_name: str = "small", large_name: str = "large") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"pcee": "-", "pcee-lb-cond": "--", "confidence": ":"}
    for model, color, name in ((small, "tab:orange", small_name), (large, "tab:blue", large_name)):
        for policy in model["policies"]:
            xs, ys = frontier(model["policies"][policy])
            ax.plot(xs, 100 * ys, styles[policy], color=color, marker=".", markersize=3,
                    label=f"{name} + {policy} (δ 0.50…0.99)")
        ex = model["exits"]
        marker = "s" if model is small else "o"
        face = color if model is small else "none"
        ax.plot([e["mflops"] for e in ex], [100 * e["error"] for e in ex], marker, color=color, markerfacecolor=face,
                markersize=7, linestyle="none", label=f"{name}: each exit at full depth")
        for e in ex:
            ax.annotate(f"{name[0].upper()}{e['index']}", (e["mflops"], 100 * e["error"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=color)
    h = result["pcee"]
    ax.axvline(h["small_full_mflops"], color="gray", linewidth=0.8, linestyle=":")
    ax.axhline(100 * h["small_full_error"], color="gray", linewidth=0.8, linestyle=":")
    ax.annotate(f"{small_name}, full depth", (h["small_full_mflops"], 100 * h["small_full_error"]), textcoords="offset points",
                xytext=(6, -14), fontsize=8, color="gray")
    # No policy can spend less than the large model's first exit on a sample: its curve starts right of this.
    ax.axvline(h["large_first_exit_mflops"], color="tab:blue", linewidth=0.8, linestyle=":")
    ax.annotate(f"{large_name}: cheapest possible\n(exit 0 for every sample)",
                (h["large_first_exit_mflops"], 100 * h["small_full_error"]),
                textcoords="offset points", xytext=(4, 40), fontsize=7, color="tab:blue")
    ax.set_xlabel("mean MFLOPs per sample (multiply-add = 2)")
    ax.set_ylabel("CIFAR-10 test error (%)")
    ax.set_title(f"{large_name} model with early exit vs {small_name} model (CIFAR-10 test, 10,000 images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt(value: float | None, spec: str, scale: float = 1.0, missing: str = "–") -> str:
    return missing if value is None else format(value * scale, spec)


def render(report: dict) -> str:
    names = {"small": report.get("small_name", "small"), "large": report.get("large_name", "large")}
    small_name, large_name = names["small"], names["large"]
    over = {k: report["models"][k]["overthinking"] for k in names}
    lines = ["| model | exit | MFLOPs | test accuracy | test error | right where the last exit is wrong |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key in ("small", "large"):
        exits = report["models"][key]["exits"]
        for e in exits:
            destructive = over[key]["per_exit"][e["index"]] if e["index"] < len(exits) - 1 else None
            lines.append(f"| {names[key]} | {e['index']} | {e['mflops']:.1f} | {e['accuracy']:.4f} | "
                         f"{100 * e['error']:.2f} % | {fmt(destructive, '.2f', 100)}{'' if destructive is None else ' %'} |")
    lines += ["", f"| policy ({large_name}) | {small_name} full depth: MFLOPs, error | {large_name} error at that cost | "
              f"ratio (paper 0.81) | {large_name} MFLOPs to match {small_name}'s error | "
              f"below {small_name} + pcee at every shared cost (max gap) | goal met |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    comparisons = [("comparison", "manifest FLOPs")]
    if "comparison_run_flops" in report:
        comparisons.append(("comparison_run_flops", "FLOPs as served"))
    for (section, what), policy in ((c, p) for c in comparisons for p in report[comparisons[0][0]]):
        h = report[section][policy]
        match = h["large_mflops_to_match_small_error"]
        times = "" if match is None else f" ({match / h['small_full_mflops']:.2f}× {small_name})"
        below = h["vs_small_pcee_curve"]
        gap = "–" if below["max_gap"] is None else (
            f"{'yes' if below['below_everywhere'] else 'no'} ({100 * below['max_gap']:+.2f} pts; below on "
            f"{100 * below['share_below']:.0f} % of {below['shared_mflops'][0]:.1f}–{below['shared_mflops'][1]:.1f} MFLOPs)")
        lines.append(
            f"| {policy} ({what}) | {h['small_full_mflops']:.1f}, {100 * h['small_full_error']:.2f} % | "
            f"{fmt(h['large_error_at_small_mflops'], '.2f', 100, 'out of reach')}"
            f"{'' if h['large_error_at_small_mflops'] is None else ' %'} | {fmt(h['error_ratio'], '.3f')} | "
            f"{fmt(match, '.1f')}{times} | {gap} | {'**yes**' if h['goal_met'] else '**no**'} |")
    lines += ["", "| model | destructive overthinking: some early exit right, last exit wrong | last exit's error |",
              "| --- | --- | --- |"]
    for key in ("small", "large"):
        lines.append(f"| {names[key]} | {100 * over[key]['any_early_exit']:.2f} % | {100 * over[key]['last_exit_error']:.2f} % |")
    lines += ["", "| model + policy | δ | MFLOPs | test error | coverage | promised accuracy |", "| --- | --- | --- | --- | --- | --- |"]
    for key in ("small", "large"):
        for policy, rows in report["models"][key]["policies"].items():
            for r in rows:
                if round(r["delta"], 2) in (0.50, 0.80, 0.90, 0.95, 0.99):
                    lines.append(f"| {names[key]} + {policy} | {r['delta']:.2f} | {r['mflops']:.1f} | {100 * r['error']:.2f} % | "
                                 f"{r['coverage']:.3f} | {fmt(r['accuracy_promised'], '.3f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=Path, default=REPO / "runs" / "bundles" / "cifar10-resnet-small-ge")
    parser.add_argument("--large", type=Path, default=REPO / "runs" / "bundles" / "cifar10-resnet-deep-late-ge")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-calibrate", action="store_true", help="use the small bundle's calibration as it is")
    parser.add_argument("--large-calibrated", action="store_true",
                        help="use the large bundle's calibration as it is (a committed bundle) instead of fitting it in place")
    parser.add_argument("--small-name", default="small", help="what the smaller model is called in tables and plots")
    parser.add_argument("--large-name", default="deep-late", help="what the larger model is called in tables and plots")
    args = parser.parse_args()
    start = time.perf_counter()

    small_bundle = load_bundle(args.small)
    if args.no_calibrate:
        small_bundle = load_bundle(args.small, require_calibration=True)
        small_cal = Calibration.from_dict(small_bundle.calibration, num_exits=small_bundle.manifest.num_exits)
    else:
        small_cal = calibrate_in_place(args.small, small_bundle, args.cache)
    if args.large_calibrated:  # a committed bundle is already calibrated on cifar10:val: use it as it is
        large_bundle = load_bundle(args.large, require_calibration=True)
        large_cal = Calibration.from_dict(large_bundle.calibration, num_exits=large_bundle.manifest.num_exits)
        split_logits(large_bundle, "cifar10:val", args.cache)  # cached for benchmarks/control.py
    else:
        large_bundle = load_bundle(args.large)
        large_cal = calibrate_in_place(args.large, large_bundle, args.cache)

    small = model_curves(small_bundle, small_cal, args.cache, DEFAULT_EVAL_DELTAS, SMALL_POLICIES)
    large = model_curves(large_bundle, large_cal, args.cache, DEFAULT_EVAL_DELTAS, HEADLINE_POLICIES)
    comparison = compare(small, large)
    served = compare(small, large, "mflops_run")
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{cpu_model()}, {platform.machine()}, no GPU",
        "data": "cifar10:test (10,000 images); calibration on cifar10:val (5,000 held-out training images, split seed 0)",
        "deltas": [float(d) for d in DEFAULT_EVAL_DELTAS],
        "paper": {"large_pcee_error": PAPER_ERRORS[0], "small_error": PAPER_ERRORS[1], "ratio": PAPER_RATIO},
        "small_name": args.small_name,
        "large_name": args.large_name,
        "models": {"small": small, "large": large},
        "comparison": comparison,
        # FLOPs as the servers run them: the small model plainly (no inner heads), the large one with
        # only the heads of exits that can fire at δ (flops_spent.py)
        "comparison_run_flops": served,
        "goal": "large with PCEE has lower error than the small model at the small model's full-depth FLOPs, "
                f"error ratio <= {PAPER_RATIO:.3f}",
        "goal_met": comparison["pcee"]["goal_met"],
        "seconds": time.perf_counter() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "headline.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    plot(small, large, comparison, args.out / "headline.png", args.small_name, args.large_name)
    print(render(report))
    print(f"\nwrote {args.out / 'headline.json'} and headline.png in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
