"""Summarise an `exitserve evaluate` result for BENCHMARKS.md: promise, coverage, compute per policy,
how far each policy's accuracy-vs-compute curve lies from the confidence baseline's, and promised
coverage vs δ of the default against the previous default and the confidence rule (table + plot).

    python benchmarks/calibration_report.py benchmarks/results/default-bundle/evaluation.json \
        --plot benchmarks/results/default-bundle/coverage_vs_delta.png

The previous default's figures (schema 1 tables, before issue 15) come from
benchmarks/results/schema1-reference.json, extracted once from that version's committed results:

    git show d03734c:benchmarks/results/default-bundle/evaluation.json > /tmp/old-evaluation.json
    git show d03734c:benchmarks/results/control.json > /tmp/old-control.json
    python benchmarks/calibration_report.py --extract-old /tmp/old-evaluation.json /tmp/old-control.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

KEY_DELTAS = (0.80, 0.85, 0.90, 0.95, 0.99)
RESULTS = Path(__file__).resolve().parent / "results"
OLD_REFERENCE = RESULTS / "schema1-reference.json"
DEFAULT, PREVIOUS, CONFIDENCE = "pcee-lb-tail", "pcee-lb-cond", "confidence"
# Issue 15's goal for the default on the test set: promised coverage at these δ, no violation in 0.80-0.99.
COVERAGE_GOAL = {0.90: 0.72, 0.95: 0.62, 0.99: 0.40}


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


def _promised(r: dict) -> str:
    return "–" if r.get("accuracy_promised") is None else f"{r['accuracy_promised']:.3f}"


def coverage_table(report: dict, old: dict | None) -> list[str]:
    """Promised coverage (promised accuracy) and compute at the key δ: new default, old default, confidence."""
    policies = report["policies"]
    columns = [(f"`{DEFAULT}` (new default)", {round(r["delta"], 2): r for r in policies[DEFAULT]})]
    if old is not None:
        columns.append((f"`{PREVIOUS}` before (schema 1)", {round(d, 2): r for d, r in zip(old["test"]["deltas"], old["test"]["rows"], strict=True)}))
    columns.append((f"`{PREVIOUS}` now", {round(r["delta"], 2): r for r in policies[PREVIOUS]}))
    columns.append((f"`{CONFIDENCE}` (guarded now)", {round(r["delta"], 2): r for r in policies[CONFIDENCE]}))
    if old is not None and "confidence" in old:
        columns.append((f"`{CONFIDENCE}` before (its own, unguarded)",
                        {round(d, 2): r for d, r in zip(old["confidence"]["deltas"], old["confidence"]["rows"], strict=True)}))
    lines = ["| δ | " + " | ".join(name for name, _ in columns) + " | goal |", "| --- |" + " --- |" * (len(columns) + 1)]
    for delta in (0.80, 0.85, 0.90, 0.95, 0.97, 0.98, 0.99):
        cells = []
        for _, rows in columns:
            r = rows.get(delta)
            cells.append("–" if r is None else f"{r['coverage']:.3f} ({_promised(r)}) · {r['compute_fraction']:.3f}"
                         + (" **violation**" if r.get("violation") else ""))
        goal = COVERAGE_GOAL.get(delta)
        lines.append(f"| {delta:.2f} | " + " | ".join(cells) + f" | {'–' if goal is None else f'≥ {goal:.2f}'} |")
    sweep = [r for r in policies[DEFAULT] if 0.80 - 1e-9 <= r["delta"] <= 0.99 + 1e-9]
    met = [policies_row_meets(report, d, g) for d, g in COVERAGE_GOAL.items()]
    lines += ["", f"`{DEFAULT}` on the test set: {sum(r['violation'] for r in sweep)} violations at the {len(sweep)} δ in "
              f"0.80–0.99; coverage goal {'met' if all(met) else 'missed'} at "
              + ", ".join(f"δ {d:.2f} ({'yes' if m else 'no'})" for d, m in zip(COVERAGE_GOAL, met, strict=True)) + "."]
    return lines


def policies_row_meets(report: dict, delta: float, goal: float) -> bool:
    rows = {round(r["delta"], 2): r for r in report["policies"][DEFAULT]}
    r = rows.get(round(delta, 2))
    return r is not None and r["coverage"] >= goal and not r["violation"]


def render(report: dict, old: dict | None = None) -> str:
    policies = report["policies"]
    lines = ["| policy | δ | accuracy | promised | coverage | violation | compute |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, rows in policies.items():
        by_delta = {round(r["delta"], 2): r for r in rows}
        for delta in KEY_DELTAS:
            r = by_delta.get(delta)
            if r is None:
                continue
            lines.append(f"| {name} | {delta:.2f} | {r['accuracy']:.3f} | {_promised(r)} | {r['coverage']:.3f} | "
                         f"{'**yes**' if r['violation'] else 'no'} | {r['compute_fraction']:.3f} |")
    lines += ["", "Accuracy-vs-compute against the confidence baseline (δ from 0.50 to 0.99; worst gap in points at equal compute, "
              "negative = below the baseline; violations over the whole sweep):", "",
              "| policy | worst gap vs confidence | violations in sweep |", "| --- | --- | --- |"]
    for name, rows in policies.items():
        gap = gap_to_baseline(rows, policies["confidence"])
        violations = sum(r["violation"] for r in rows)
        lines.append(f"| {name} | {'–' if gap is None else f'{gap:+.2f}'} | {violations} of {len(rows)} |")
    if DEFAULT in policies and PREVIOUS in policies and CONFIDENCE in policies:
        lines += ["", "Promised coverage (promised accuracy) · compute, side by side:", "", *coverage_table(report, old)]
    return "\n".join(lines)


def over_promise_table(report: dict, policies: list[str]) -> list[str]:
    """Mean estimate minus realised accuracy per exit, in points (n), for the chosen policies at the key δ."""
    exits = report["num_exits"]
    lines = ["| policy | δ | " + " | ".join(f"exit {k}" for k in range(exits)) + " |", "| --- | --- |" + " --- |" * exits]
    for row in sorted((r for r in report["over_promise"] if r["policy"] in policies),
                      key=lambda r: (r["delta"], policies.index(r["policy"]))):
        cells = ["–" if e["over_promise"] is None else f"{100 * e['over_promise']:+.1f} ({e['n']})" for e in row["per_exit"]]
        lines.append(f"| {row['policy']} | {row['delta']:.2f} | " + " | ".join(cells) + " |")
    return lines


def plot(report: dict, old: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    styles = {DEFAULT: ("tab:red", "-"), PREVIOUS: ("tab:blue", "--"), CONFIDENCE: ("tab:green", "-.")}
    for policy, (color, line) in styles.items():
        rows = report["policies"][policy]
        d = [r["delta"] for r in rows]
        left.plot(d, [r["coverage"] for r in rows], line, color=color, label=policy + (" (default)" if policy == DEFAULT else " now"))
        right.plot(d, [r["compute_fraction"] for r in rows], line, color=color, label=policy)
        bad = [r for r in rows if r["violation"]]
        left.plot([r["delta"] for r in bad], [r["coverage"] for r in bad], "x", color=color, markersize=8)
    if old is not None:
        left.plot(old["test"]["deltas"], [r["coverage"] for r in old["test"]["rows"]], ":", color="black",
                  label=f"{PREVIOUS} before (schema 1)")
        right.plot(old["test"]["deltas"], [r["compute_fraction"] for r in old["test"]["rows"]], ":", color="black",
                   label=f"{PREVIOUS} before (schema 1)")
        if "confidence" in old:
            left.plot(old["confidence"]["deltas"], [r["coverage"] for r in old["confidence"]["rows"]], ":", color="tab:green",
                      label=f"{CONFIDENCE} before (unguarded)")
    for delta, goal in COVERAGE_GOAL.items():
        left.plot([delta], [goal], "k^", markersize=7)
    left.set_title("promised coverage vs δ on the test set (▲ goal, x violation)")
    left.set_xlabel("δ")
    left.set_ylabel("coverage (share answered with target_met)")
    right.set_title("mean compute fraction vs δ")
    right.set_xlabel("δ")
    right.set_ylabel("compute (FLOPs / full model)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def extract_old(evaluation: Path, control: Path, out: Path = OLD_REFERENCE) -> dict:
    """The previous default's test-set rows and split summary, kept small for later comparisons."""
    policies = json.loads(evaluation.read_text())["policies"]
    rows = policies[PREVIOUS]
    keep = ("delta", "accuracy", "accuracy_promised", "coverage", "compute_fraction", "violation")
    splits = json.loads(control.read_text())
    per_delta = splits["policies"][PREVIOUS]["per_delta"]
    reference = {
        "policy": PREVIOUS,
        "source": f"{evaluation.name} and {control.name} of commit d03734c (schema 1 tables)",
        "test": {"deltas": [r["delta"] for r in rows], "rows": [{k: r[k] for k in keep} for r in rows]},
        "confidence": {"deltas": [r["delta"] for r in policies[CONFIDENCE]],
                       "rows": [{k: r[k] for k in keep} for r in policies[CONFIDENCE]]},
        "splits": {"policy": PREVIOUS, "splits": splits["splits"], "deltas": [r["delta"] for r in per_delta],
                   "coverage": [r["coverage"] for r in per_delta], "violations": [r["violations"] for r in per_delta],
                   "compute_fraction": [r["compute_fraction"] for r in per_delta],
                   "confidence_coverage": [r["coverage"] for r in splits["policies"].get(CONFIDENCE, {}).get("per_delta", [])]},
    }
    out.write_text(json.dumps(reference, indent=1) + "\n")
    return reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("evaluation", nargs="?", type=Path)
    parser.add_argument("--plot", type=Path, help="write the coverage-vs-δ plot here")
    parser.add_argument("--old", type=Path, default=OLD_REFERENCE, help="the previous default's figures")
    parser.add_argument("--over-promise", nargs="+", metavar="POLICY",
                        help="print only the over-promise table of these policies")
    parser.add_argument("--extract-old", nargs=2, type=Path, metavar=("EVALUATION", "CONTROL"),
                        help="write --old from an older evaluation.json and control.json")
    args = parser.parse_args()
    if args.extract_old:
        extract_old(*args.extract_old, out=args.old)
        print(f"wrote {args.old}")
        return
    if args.evaluation is None:
        parser.error("give an evaluation.json")
    report = json.loads(args.evaluation.read_text())
    old = json.loads(args.old.read_text()) if args.old.exists() else None
    if args.over_promise:
        print("\n".join(over_promise_table(report, args.over_promise)))
        return
    print(render(report, old))
    if args.plot:
        plot(report, old, args.plot)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
