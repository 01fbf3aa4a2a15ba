"""Regenerate every benchmark table from the cached artefacts (trained models, exported graphs).

    python benchmarks/run_all.py --quick      # under 10 minutes on 2 cores
    python benchmarks/run_all.py              # the settings BENCHMARKS.md reports

Cached artefacts, each with its own command (README and BENCHMARKS.md): the default bundle
(committed), `runs/cifar10-resnet-large/checkpoint.pt` for the monolithic baselines, and
`runs/bundles/cifar10-resnet-small` and `-medium` for the headline comparisons, the text bundles'
evaluations under benchmarks/results/text (BENCHMARKS.md, text section; the served text benchmark,
benchmarks/text_serving.py, is not part of this run). A step whose artefact or tool is
missing is skipped with the command that makes it; everything else runs. Tables go to stdout, JSON
and PNG to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Relative to REPO (every step runs there), so the commands recorded in the results read as typed.
BENCH = Path("benchmarks")
BUNDLE = Path("bundles/cifar10-resnet-large")
CHECKPOINT = Path("runs/cifar10-resnet-large/checkpoint.pt")
MONOLITHIC = Path("runs/monolithic")
SMALL = Path("runs/bundles/cifar10-resnet-small-ge")  # with runs/bundles/cifar10-resnet-deep-late-ge (§4.1)
MEDIUM = Path("runs/bundles/cifar10-resnet-medium")
TEXT_RESULTS = Path("benchmarks/results/text")


def run(title: str, args: list[str]) -> bool:
    print(f"\n## {title}\n\n`{' '.join(['python', *args])}`\n", flush=True)
    started = time.perf_counter()
    ok = subprocess.run([sys.executable, *args], cwd=REPO).returncode == 0
    print(f"\n({'done' if ok else 'FAILED'} in {time.perf_counter() - started:.0f} s)", flush=True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shorter HTTP runs")
    quick = parser.parse_args().quick
    import os

    os.chdir(REPO)
    results = []
    results.append(run("Evaluation of the default bundle", ["-m", "exitserve.service.cli", "evaluate", str(BUNDLE), "--data", "cifar10:test",
                                                            "--out", "benchmarks/results/default-bundle", "--no-progress"]))
    results.append(run("Control on the default bundle", [str(BENCH / "calibration_report.py"),
                                                         "benchmarks/results/default-bundle/evaluation.json"]))
    results.append(run("Control over random splits", [str(BENCH / "control.py"), "--splits", "20"]))
    if SMALL.is_dir() and Path("runs/bundles/cifar10-resnet-deep-late-ge").is_dir():
        results.append(run("Large with early exit vs small", [str(BENCH / "headline.py")]))
    else:
        print("\nskipped headline: train the small and deep-late models first (BENCHMARKS.md §4.1 has the commands)")
    if MEDIUM.is_dir():
        results.append(run("Large with early exit vs medium", [str(BENCH / "headline.py"), "--small", str(MEDIUM), "--small-name",
                                                               "medium", "--large", str(BUNDLE), "--large-calibrated",
                                                               "--large-name", "large",
                                                               "--out", "benchmarks/results/headline-medium"]))
    else:
        print("\nskipped the medium headline: train the medium preset first (BENCHMARKS.md §4.1 has the command)")
    if (TEXT_RESULTS / "sst2-self-supervised" / "evaluation.json").is_file():
        results.append(run("Text models: per-exit accuracy and policies", [str(BENCH / "text_report.py")]))
    if not (MONOLITHIC / "last-exit.onnx").is_file() and CHECKPOINT.is_file():
        run("Monolithic baselines", [str(BENCH / "monolithic.py"), str(CHECKPOINT), "--out", str(MONOLITHIC)])
    if (MONOLITHIC / "last-exit.onnx").is_file():
        parts = ["cutting", "early"]
        if shutil.which("wrk"):
            parts.append("http")
            if importlib.util.find_spec("litserve"):
                parts.append("peers")
            else:
                print("\nskipped peers: pip install -e '.[bench]' for LitServe")
        else:
            print("\nskipped HTTP parts: apt-get install wrk")
        serving = [str(BENCH / "serving.py"), "--parts", ",".join(parts)]
        serving += ["--rounds", "2", "--http-seconds", "3", "--clients", "1,8"] if quick else ["--rounds", "5", "--http-seconds", "8"]
        if quick:
            serving += ["--out", "benchmarks/results/serving-quick.json"]
        results.append(run("Serving", serving))
    else:
        print(f"\nskipped serving: needs {CHECKPOINT} (exitserve train ..., README) for the monolithic baselines")
    results.append(run("Scaling with work", [str(BENCH / "scaling.py"), "--seconds-per-row", "1" if quick else "2"]))
    if (REPO / "benchmarks/results/serving-peers.json").is_file():
        results.append(run("Plots", [str(BENCH / "plot_serving.py")]))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
