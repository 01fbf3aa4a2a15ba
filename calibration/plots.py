"""PNG plots of an evaluation report. matplotlib is imported lazily (Agg), only when plotting."""

from __future__ import annotations

from pathlib import Path

import numpy as np

RELIABILITY_PNG = "reliability.png"
ACCURACY_VS_DELTA_PNG = "accuracy_vs_delta.png"
ACCURACY_VS_COMPUTE_PNG = "accuracy_vs_compute.png"
_STYLES = {  # conditional variants share their base colour, dashed
    "pcee": ("tab:blue", "-"), "pcee-cond": ("tab:blue", "--"),
    "pcee-ws": ("tab:green", "-"), "pcee-ws-cond": ("tab:green", "--"),
    "pcee-lb": ("tab:red", "-"), "pcee-lb-cond": ("tab:red", "--"),
    "pcee-lb-tail": ("tab:brown", "-"), "pcee-lb-global": ("tab:olive", "-"),
    "confidence": ("tab:orange", "-"), "per-exit-threshold": ("tab:purple", "-"), "full": ("black", ":"),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(policy: str) -> dict:
    color, line = _STYLES.get(policy, ("tab:gray", "-"))
    return {"color": color, "linestyle": line}


def _nan(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def plot_reliability(report: dict, path: str | Path) -> Path:
    """Per exit: test accuracy per confidence bin (bars, with counts), the calibration table (dots), y = x."""
    plt = _pyplot()
    exits = report["exits"]
    fig, axes = plt.subplots(1, len(exits), figsize=(3.6 * len(exits), 3.9), sharey=True, squeeze=False)
    for ax, e in zip(axes[0], exits, strict=True):
        rel = e["reliability"]
        edges = np.array(rel["edges"])
        left, width = edges[:-1], np.diff(edges)
        acc, cal_acc, counts = _nan(rel["accuracy"]), _nan(rel["calibration_accuracy"]), rel["counts"]
        ax.bar(left, np.nan_to_num(acc), width=width, align="edge", color="tab:blue", alpha=0.55,
               edgecolor="white", label="test accuracy")
        ax.plot(left + width / 2, cal_acc, "o", color="tab:red", markersize=4, label="calibration table")
        ax.plot([0, 1], [0, 1], color="gray", linewidth=1, linestyle="--")
        for x, w, c in zip(left, width, counts, strict=True):
            if c:  # counts inside the foot of each bar, clear of the dots and the diagonal
                ax.text(x + w / 2, 0.015, str(c), ha="center", va="bottom", fontsize=6, rotation=90)
        ece = "–" if e["ece"] is None else f"{e['ece']:.3f}"
        ax.set_title(f"exit {e['index']} (compute {e['compute_fraction']:.2f})\naccuracy {e['accuracy']:.3f}, ECE {ece}",
                     fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.12)
        ax.set_xlabel("confidence (test samples per bin at the foot)")
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_accuracy_vs_delta(report: dict, path: str | Path) -> Path:
    """Realised overall and promised accuracy, and coverage, against δ for every policy (with y = x)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    deltas = np.array(report["deltas"])
    last_accuracy = report["exits"][-1]["accuracy"]
    for policy, rows in report["policies"].items():
        d = np.array([r["delta"] for r in rows])
        axes[0].plot(d, [r["accuracy"] for r in rows], label=policy, **_style(policy))
        axes[1].plot(d, _nan([r["accuracy_promised"] for r in rows]), label=policy, **_style(policy))
        axes[2].plot(d, [r["coverage"] for r in rows], label=policy, **_style(policy))
    for ax in axes[:2]:
        ax.plot(deltas, deltas, color="gray", linewidth=1, label="y = δ")
        ax.axhline(last_accuracy, color="gray", linewidth=0.8, linestyle=":", label="last exit accuracy")
    axes[0].set_title("overall accuracy")
    axes[1].set_title("accuracy of promised samples (target_met)")
    axes[2].set_title("coverage (share answered with target_met)")
    for ax in axes:
        ax.set_xlabel("δ (requested accuracy)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[2].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_accuracy_vs_compute(report: dict, path: str | Path) -> Path:
    """Accuracy against mean compute fraction over the δ sweep, with each exit's full-data point."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for policy, rows in report["policies"].items():
        pts = sorted((r["compute_fraction"], r["accuracy"]) for r in rows)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", markersize=3, label=policy, **_style(policy))
    ex = report["exits"]
    ax.plot([e["compute_fraction"] for e in ex], [e["accuracy"] for e in ex], "ks", markersize=7, label="single exit (all samples)")
    for e in ex:
        ax.annotate(f"exit {e['index']}", (e["compute_fraction"], e["accuracy"]), textcoords="offset points", xytext=(5, -12), fontsize=8)
    ax.set_xlabel("mean compute fraction (FLOPs / full model)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"accuracy vs compute over δ = {min(report['deltas']):.2f} … {max(report['deltas']):.2f}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_plots(report: dict, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_reliability(report, out / RELIABILITY_PNG),
        plot_accuracy_vs_delta(report, out / ACCURACY_VS_DELTA_PNG),
        plot_accuracy_vs_compute(report, out / ACCURACY_VS_COMPUTE_PNG),
    ]
