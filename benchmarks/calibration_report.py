"""Summarise an `exitserve evaluate` result for BENCHMARKS.md: promise, coverage, compute per policy,
and how far each policy's accuracy-vs-compute curve lies from the confidence baseline's.

    python benchmarks/calibration_report.py benchmarks/results/default-bundle/evaluation.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

KEY_DELTAS = (0.80, 0.85, 0.90, 0.95, 0.99)


def curve(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    compute = np.array([r["compute_fraction"] for r in rows])
    accuracy = np.array([r["accuracy"] for r in rows])
    order = np.argsort(compute, kind="stable")
    return compute[order], accuracy[order]


def gap_to_baseline(rows: list[dict], baseline: list[dict]) -> float | None:
    """Most negative (accuracy - baseline accuracy at the same compute), in points, over the shared compute range."""
    bc, ba = curve(baseline)
    c, a = curve(rows)
    inside = (c >= bc.min()) & (c <= bc.max())
    if not inside.any():
        return None
    return float(100 * (a[inside] - np.interp(c[inside], bc, ba)).min())


def render(report: dict) -> str:
    policies = report["policies"]
    lines = ["| policy | δ | accuracy | promised | coverage | violation | compute |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, rows in policies.items():
        by_delta = {round(r["delta"], 2): r for r in rows}
        for delta in KEY_DELTAS:
            r = by_delta.get(delta)
            if r is None:
                continue
            promised = "–" if r["accuracy_promised"] is None else f"{r['accuracy_promised']:.3f}"
            lines.append(f"| {name} | {delta:.2f} | {r['accuracy']:.3f} | {promised} | {r['coverage']:.3f} | "
                         f"{'**yes**' if r['violation'] else 'no'} | {r['compute_fraction']:.3f} |")
    lines += ["", "Accuracy-vs-compute against the confidence baseline (δ from 0.50 to 0.99; worst gap in points at equal compute, "
              "negative = below the baseline; violations over the whole sweep):", "",
              "| policy | worst gap vs confidence | violations in sweep |", "| --- | --- | --- |"]
    for name, rows in policies.items():
        gap = gap_to_baseline(rows, policies["confidence"])
        violations = sum(r["violation"] for r in rows)
        lines.append(f"| {name} | {'–' if gap is None else f'{gap:+.2f}'} | {violations} of {len(rows)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("evaluation")
    args = parser.parse_args()
    with open(args.evaluation) as handle:
        print(render(json.load(handle)))


if __name__ == "__main__":
    main()
