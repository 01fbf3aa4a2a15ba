"""Tables for BENCHMARKS.md from the text bundles' evaluation reports (issue 9).

    python benchmarks/text_report.py [--results benchmarks/results/text]

Reads `<data>-<heads>/evaluation.json` written by `exitserve evaluate` for sst2 and agnews with
self-supervised and label-trained exit heads; prints per-exit accuracy side by side, and every
policy at δ ∈ {0.80, 0.90, 0.95}: overall accuracy, accuracy where promised, coverage, compute.
Also draws accuracy vs mean compute for every policy, both head kinds, one panel per data set.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATASETS = {"sst2": "SST-2 (872 test sentences)", "agnews": "AG News (7,600 test articles)"}
HEADS = ("self-supervised", "labels")
KEY_DELTAS = (0.80, 0.90, 0.95)
TABLE_POLICIES = ("pcee", "pcee-lb", "pcee-lb-cond", "confidence", "per-exit-threshold")


def _cell(report: dict | None, policy: str, delta: float) -> str:
    """accuracy / promised (✗ where below δ) / coverage / compute fraction, at δ."""
    if report is None:
        return "–"
    row = next(r for r in report["policies"][policy] if round(r["delta"], 2) == delta)
    promised = "–" if row["accuracy_promised"] is None else f"{row['accuracy_promised']:.3f}{' ✗' if row['violation'] else ''}"
    return f"{row['accuracy']:.3f} / {promised} / {row['coverage']:.2f} / {row['compute_fraction']:.2f}"


def load(results: Path) -> dict:
    return {(data, heads): json.loads((results / f"{data}-{heads}" / "evaluation.json").read_text())
            for data in DATASETS for heads in HEADS if (results / f"{data}-{heads}" / "evaluation.json").is_file()}


def render(reports: dict) -> str:
    lines = []
    for data, title in DATASETS.items():
        if (data, HEADS[0]) not in reports:
            continue
        ss, lab = reports[(data, "self-supervised")], reports.get((data, "labels"))
        lines += ["", f"**{title}** — test accuracy per exit (the final classifier is the same in both rows)", "",
                  "| exit heads | " + " | ".join(f"exit {e['index']} ({e['compute_fraction']:.2f})" for e in ss["exits"]) + " |",
                  "| --- |" + " --- |" * len(ss["exits"])]
        for heads, report in (("self-supervised", ss), ("labels", lab)):
            if report is not None:
                lines.append(f"| {heads} | " + " | ".join(f"{e['accuracy']:.3f}" for e in report["exits"]) + " |")
        lines += ["", "| policy | δ | self-supervised heads: accuracy / promised / coverage / compute | label heads: same |",
                  "| --- | --- | --- | --- |"]
        for policy in TABLE_POLICIES:
            for delta in KEY_DELTAS:
                cells = [_cell(report, policy, delta) for report in (ss, lab)]
                lines.append(f"| {policy} | {delta:.2f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def plot(reports: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DATASETS), figsize=(12, 4.5))
    for ax, (data, title) in zip(axes, DATASETS.items(), strict=True):
        for heads, style in (("self-supervised", "-"), ("labels", ":")):
            report = reports.get((data, heads))
            if report is None:
                continue
            for i, (policy, rows) in enumerate(report["policies"].items()):
                if policy == "full":
                    continue
                points = sorted((r["compute_fraction"], r["accuracy"]) for r in rows)
                ax.plot(*zip(*points, strict=True), style, color=f"C{i}", marker=".", linewidth=1,
                        label=f"{policy}" if heads == "self-supervised" else None)
            exits = [(e["compute_fraction"], e["accuracy"]) for e in report["exits"]]
            ax.plot(*zip(*exits, strict=True), "ks" if heads == "self-supervised" else "k^", markersize=4,
                    label=f"each exit, {heads} heads")
        ax.set_title(title)
        ax.set_xlabel("mean compute fraction")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("MiniLM with an exit per layer: accuracy vs compute (solid: self-supervised heads, dotted: label heads)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "text")
    args = parser.parse_args()
    reports = load(args.results)
    print(render(reports))
    plot(reports, args.results / "accuracy_vs_compute.png")
    print(f"\nwrote {args.results / 'accuracy_vs_compute.png'}")


if __name__ == "__main__":
    main()
