"""Plots for the serving and scaling sections, from their JSON results.

    python benchmarks/plot_serving.py     # writes benchmarks/results/serving_peers.png and scaling.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

RESULTS = Path(__file__).resolve().parent / "results"


def plot_peers(path: Path, out: Path) -> None:
    rows = json.loads(path.read_text())["peers"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, images in zip(axes, (1, 64), strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        for key, row in rows.items():
            n, clients, variant = (part.strip() for part in key.split(",", 2))
            if int(n.split()[0]) == images:
                series.setdefault(variant, []).append((int(clients.split()[0]), row["images_per_s"]))
        for variant, points in series.items():
            points.sort()
            style = "-" if variant.startswith("exitserve") else "--"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("images / s")
        ax.set_title(f"{images} image(s) per request")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("exitserve (full depth and δ sweep) vs plain FastAPI and LitServe, default bundle, 2 CPU cores")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_scaling(path: Path, out: Path) -> None:
    rows = json.loads(path.read_text())["engine"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    settings: dict[str, list[dict]] = {}
    for row in rows:
        label = "full depth" if row["policy"] == "full" else f"{row['policy']} δ={row['delta']}"
        settings.setdefault(label, []).append(row)
    for label, series in settings.items():
        sizes = [r["batch_size"] for r in series]
        axes[0].plot(sizes, [r["images_per_s"] for r in series], marker="o", label=label)
        axes[1].plot([r["early_exit_share"] for r in series], [r["images_per_s"] for r in series], "o", label=label)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("batch size")
    axes[0].set_ylabel("images / s")
    axes[0].set_title("throughput by batch size")
    axes[1].set_xlabel("share of samples leaving before the last exit")
    axes[1].set_ylabel("images / s")
    axes[1].set_title("throughput by early-exit share (all batch sizes)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    plot_peers(RESULTS / "serving-peers.json", RESULTS / "serving_peers.png")
    plot_scaling(RESULTS / "scaling.json", RESULTS / "scaling.png")
    print(f"wrote {RESULTS / 'serving_peers.png'} and {RESULTS / 'scaling.png'}")


if __name__ == "__main__":
    main()
