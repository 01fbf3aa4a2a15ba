"""The promise under shift (issue 26): per test set (and severity), per policy and δ, the share of
samples promised (target_met) and the accuracy of the promised answers, with its Markdown table.

Decisions come from `decide_all`, i.e. `Calibration.step` as the server runs it, so whatever the
step withholds (an input guard included) shows here unchanged. Foreign sets carry label -1: no
answer on them is right, so their share promised is the error of the promise.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from exitserve.calibration.evaluation import policy_row
from exitserve.calibration.replay import decide_all
from exitserve.calibration.rules import POLICIES, Calibration

SET_DELTAS: tuple[float, ...] = (0.8, 0.9, 0.95, 0.99)
TABLE_DELTAS: tuple[float, ...] = (0.8, 0.9, 0.95)


def set_row(
    calibration: Calibration,
    meta: dict,
    logits_per_exit: Sequence[np.ndarray],
    labels: np.ndarray,
    compute_fractions: Sequence[float],
    deltas: Sequence[float] = SET_DELTAS,
    policies: Sequence[str] = ("pcee-lb-tail",),
    in_distribution: np.ndarray | None = None,
) -> dict:
    """One set: its description (`meta`: name, family, severity, labelled, ...), the last exit's
    accuracy, the share the input guard withholds, and a `policy_row` per policy and δ.
    `in_distribution`: the input guard's verdict per sample, as the server applies it (None: no guard)."""
    logits = [np.asarray(z) for z in logits_per_exit]
    labels = np.asarray(labels, dtype=np.int64)
    fractions = np.asarray(compute_fractions, dtype=np.float64)
    if len(logits) != calibration.num_exits or any(z.shape[0] != labels.size for z in logits):
        raise ValueError(f"need {calibration.num_exits} exits' logits of {labels.size} rows for set {meta.get('name')!r}")
    for policy in policies:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    n = calibration.num_exits
    return {
        **meta,
        "n": int(labels.size),
        "last_exit_accuracy": float((logits[-1].argmax(axis=1) == labels).mean()),
        "guard_withheld": None if in_distribution is None else float(1.0 - np.mean(in_distribution)),
        "policies": {p: [policy_row(decide_all(calibration, p, logits, float(d), in_distribution), labels, float(d),
                                    fractions, n)
                         for d in deltas] for p in policies},
    }


def sets_report(rows: Iterable[dict], source: dict | None = None) -> dict:
    rows = list(rows)
    policies = list(rows[0]["policies"]) if rows else []
    deltas = [r["delta"] for r in rows[0]["policies"][policies[0]]] if policies else []
    return {"source": source or {}, "policies": policies, "deltas": deltas, "sets": rows}


def _cell(row: dict, labelled: bool) -> str:
    coverage = f"{row['coverage']:.3f}"
    if not labelled or row["accuracy_promised"] is None:
        return coverage
    flag = " ✗" if row["accuracy_promised"] < row["delta"] else ""
    return f"{coverage} / {row['accuracy_promised']:.3f}{flag}"


def render_sets_markdown(report: dict, title: str = "The promise under shift",
                         deltas: Sequence[float] = TABLE_DELTAS) -> str:
    """Per policy one table: a row per set, a column per δ with coverage / promised accuracy
    (✗: promised accuracy below δ); foreign sets show coverage only, which is all error."""
    lines = [f"# {title}", ""]
    for key, value in report.get("source", {}).items():
        lines.append(f"- {key}: `{value}`")
    lines += ["- cells: share of samples promised (target_met) / accuracy of the promised answers; "
              "✗ = promised accuracy below δ. Foreign sets (no CIFAR-10 label) show the share promised only: "
              "every promise on them is wrong.", ""]
    keys = {round(float(d), 6) for d in deltas}
    for policy in report["policies"]:
        chosen = [d for d in report["deltas"] if round(d, 6) in keys]
        lines += [f"## {policy}", "",
                  "| set | severity | n | last-exit accuracy | input guard withholds | "
                  + " | ".join(f"δ {d:.2f}" for d in chosen) + " |",
                  "|---|---|---|---|---|" + "---|" * len(chosen)]
        for s in report["sets"]:
            by_delta = {round(r["delta"], 6): r for r in s["policies"][policy]}
            accuracy = f"{s['last_exit_accuracy']:.3f}" if s["labelled"] else "– (foreign)"
            cells = [_cell(by_delta[round(d, 6)], s["labelled"]) for d in chosen]
            withheld = "–" if s.get("guard_withheld") is None else f"{s['guard_withheld']:.3f}"
            lines.append(f"| {s['family']} | {s['severity'] or '–'} | {s['n']} | {accuracy} | {withheld} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def promise_breaks(report: dict, deltas: Sequence[float] = TABLE_DELTAS) -> list[dict]:
    """Where the promise fails: labelled sets with promised accuracy below δ, foreign sets with any promise."""
    keys = {round(float(d), 6) for d in deltas}
    out = []
    for s in report["sets"]:
        for policy, rows in s["policies"].items():
            for r in rows:
                if round(r["delta"], 6) in keys and r["n_promised"] and (not s["labelled"] or r["violation"]):
                    out.append({"set": s["name"], "policy": policy, "delta": r["delta"], "coverage": r["coverage"],
                                "accuracy_promised": r["accuracy_promised"] if s["labelled"] else None})
    return out
