"""The promise under shift (issue 26, item 2): the committed default bundle over CIFAR-10 test images
corrupted at 5 severities (CIFAR-10-C's families that numpy and Pillow make) and over foreign inputs
(noise, constant and gradient images, MNIST digits as 32x32 RGB), per set and δ the share of samples
promised (target_met) and the accuracy of the promised answers, for every policy.

    python benchmarks/shifted.py                 # 10,000 images a set, 36 sets: 4-6 minutes on 2 cores
    python benchmarks/shifted.py --size 2000     # a seeded subset of 2,000 images a set: under a minute

Decisions go through `decide_all` (the server's `Calibration.step`), so once the bundle carries an
input guard the same command measures it. Writes benchmarks/results/shifted/default.json and .md and
prints the BENCHMARKS.md table (default policy, δ 0.8 / 0.9 / 0.95).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench_support import cpu_model

from exitserve.calibration.rules import POLICIES
from exitserve.calibration.sets import TABLE_DELTAS, promise_breaks
from exitserve.models.shifted import build_sets
from exitserve.service.settings import DEFAULT_BUNDLE, Settings
from exitserve.service.tools.shifted import evaluate_sets, write_sets_report

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "shifted"
DEFAULT_POLICY = Settings.model_fields["default_policy"].default


def benchmarks_table(report: dict, policy: str = DEFAULT_POLICY) -> str:
    """set | severity | last-exit accuracy | coverage / promised accuracy at each table δ (✗ below δ;
    significant at 5 % in bold: the one-sided binomial p-value of the promised answers)."""
    lines = ["| set | severity | last-exit accuracy | " + " | ".join(f"δ {d:.2f}: coverage / promised" for d in TABLE_DELTAS) + " |",
             "|---|---|---|" + "---|" * len(TABLE_DELTAS)]
    for s in report["sets"]:
        rows = {round(r["delta"], 6): r for r in s["policies"][policy]}
        cells = []
        for d in TABLE_DELTAS:
            r = rows[round(d, 6)]
            if not s["labelled"]:
                cells.append(f"{r['coverage']:.3f} (all wrong)" if r["n_promised"] else "0")
            elif r["accuracy_promised"] is None:
                cells.append("0 / –")
            else:
                text = f"{r['coverage']:.3f} / {r['accuracy_promised']:.3f}"
                p = r.get("violation_p_value")
                cells.append(f"**{text} ✗**" if p is not None and p < 0.05 else f"{text} ✗" if r["violation"] else text)
        accuracy = f"{s['last_exit_accuracy']:.3f}" if s["labelled"] else "foreign"
        lines.append(f"| {s['family']} | {s['severity'] or '–'} | {accuracy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=10000, help="images per set (a seeded subset of the CIFAR-10 test set)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for default.json and default.md")
    parser.add_argument("--name", default="default", help="file stem of the results")
    args = parser.parse_args()
    started = time.perf_counter()
    policies = [DEFAULT_POLICY, *(p for p in POLICIES if p != DEFAULT_POLICY)]
    command = "python benchmarks/shifted.py " + " ".join(sys.argv[1:])
    report = evaluate_sets(args.bundle, build_sets(args.size, args.seed), policies=policies,
                           source={"command": command.strip(), "size": args.size, "seed": args.seed,
                                   "machine": f"{cpu_model()}, {os.cpu_count()} cores"})
    breaks = promise_breaks(report)
    report["promise_breaks"] = {p: sum(b["policy"] == p for b in breaks) for p in policies}
    report["source"]["seconds"] = round(time.perf_counter() - started, 1)
    json_path, md_path = write_sets_report(report, args.out, args.name,
                                           title=f"The promise under shift: {report['source']['bundle']}, {args.size} images a set")
    print(benchmarks_table(report))
    print(f"\nbroken promises at δ {', '.join(map(str, TABLE_DELTAS))} over {len(report['sets'])} sets, per policy: "
          + ", ".join(f"{p} {n}" for p, n in report["promise_breaks"].items()))
    print(f"wrote {json_path} and {md_path} in {report['source']['seconds']:.0f} s")


if __name__ == "__main__":
    main()
