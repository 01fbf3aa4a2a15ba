"""Offline evaluation of every policy over a sweep of δ on labelled test logits, and its markdown report.

All decisions go through `decide_all`, i.e. through `Calibration.step` exactly as the server runs it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from exitserve.calibration.binning import bin_index
from exitserve.calibration.bounds import betainc
from exitserve.calibration.metrics import aurc, auroc, ece
from exitserve.calibration.replay import Decisions, decide_all
from exitserve.calibration.rules import POLICIES, Calibration

DEFAULT_EVAL_DELTAS: np.ndarray = np.round(np.linspace(0.50, 0.99, 50), 2)  # 0.50, 0.51, ..., 0.99
KEY_DELTAS: tuple[float, ...] = (0.80, 0.85, 0.90, 0.95, 0.99)
CONDITIONAL_PAIRS: tuple[tuple[str, str], ...] = (
    ("pcee", "pcee-cond"), ("pcee-ws", "pcee-ws-cond"), ("pcee-lb", "pcee-lb-cond"),
)


def _num(value: float) -> float | None:
    """JSON has no NaN: undefined values are null."""
    return None if value is None or not math.isfinite(value) else float(value)


def binomial_lower_tail(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p): how surprising k correct out of n is if the true rate were p."""
    if k >= n:
        return 1.0
    return float(betainc(n - k, k + 1, 1.0 - p))


def policy_row(decisions: Decisions, labels: np.ndarray, delta: float, compute_fractions: np.ndarray, num_exits: int) -> dict:
    correct = decisions.prediction == labels
    promised = decisions.target_met
    n, n_promised = labels.size, int(promised.sum())
    accuracy_promised = float(correct[promised].mean()) if n_promised else None
    violation = accuracy_promised is not None and accuracy_promised < delta
    return {
        "delta": float(delta),
        "accuracy": float(correct.mean()),
        "accuracy_promised": accuracy_promised,
        "coverage": n_promised / n,
        "mean_exit": float(decisions.exit_index.mean()),
        "compute_fraction": float(compute_fractions[decisions.exit_index].mean()),
        "violation": bool(violation),
        "exit_histogram": np.bincount(decisions.exit_index, minlength=num_exits).tolist(),
        "n": int(n),
        "n_promised": n_promised,
        # One-sided binomial p-value of the violation (small = unlikely to be noise); null without one.
        "violation_p_value": binomial_lower_tail(int(correct[promised].sum()), n_promised, delta) if violation else None,
    }


def exit_report(calibration: Calibration, k: int, logits: np.ndarray, labels: np.ndarray, compute_fraction: float) -> dict:
    conf = calibration.confidence(k, logits)
    correct = logits.argmax(axis=1) == labels
    edges = calibration.edges(k)
    m = edges.size - 1
    b = bin_index(edges, conf)
    keep = b < m
    counts = np.bincount(b[keep], minlength=m)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_accuracy = np.bincount(b[keep], weights=correct[keep].astype(float), minlength=m) / counts
        bin_confidence = np.bincount(b[keep], weights=conf[keep], minlength=m) / counts
    return {
        "index": k,
        "compute_fraction": float(compute_fraction),
        "accuracy": float(correct.mean()),
        "temperature": float(calibration.temperatures[k]),
        "mean_confidence": float(conf.mean()),
        "ece": _num(ece(conf, correct)),
        "auroc": _num(auroc(conf, correct)),
        "aurc": _num(aurc(conf, correct)),
        "reliability": {
            "edges": edges.tolist(),
            "counts": counts.tolist(),
            "accuracy": [_num(v) for v in bin_accuracy],
            "confidence": [_num(v) for v in bin_confidence],
            "calibration_accuracy": [_num(v) for v in calibration.table("accuracy", k)],
        },
    }


def over_promise(decisions: Decisions, labels: np.ndarray, num_exits: int) -> list[dict]:
    """Per exit: mean estimate minus realised accuracy of the samples answered there."""
    rows = []
    correct = decisions.prediction == labels
    for k in range(num_exits):
        at = decisions.exit_index == k
        n = int(at.sum())
        mean_estimate = float(decisions.estimate[at].mean()) if n else None
        accuracy = float(correct[at].mean()) if n else None
        rows.append({
            "exit": k, "n": n, "mean_estimate": mean_estimate, "accuracy": accuracy,
            "over_promise": None if mean_estimate is None or accuracy is None else mean_estimate - accuracy,
        })
    return rows


def _paired_order(policies: Sequence[str]) -> list[str]:
    """Plain and conditional variants next to each other, then the rest in their given order."""
    order = [p for pair in CONDITIONAL_PAIRS for p in pair if p in policies]
    return order + [p for p in policies if p not in order]


def promise_check(report: dict) -> list[dict]:
    """Per policy over the whole sweep: violations, and the worst promised accuracy minus δ."""
    out = []
    for policy, rows in report["policies"].items():
        margins = [r["accuracy_promised"] - r["delta"] for r in rows if r["accuracy_promised"] is not None]
        out.append({"policy": policy, "deltas": len(rows), "violations": sum(r["violation"] for r in rows),
                    "worst_margin": min(margins) if margins else None})
    return out


def evaluate_policies(
    calibration: Calibration,
    test_logits_per_exit: Sequence[np.ndarray],
    labels: np.ndarray,
    compute_fractions: Sequence[float],
    deltas: Sequence[float] | np.ndarray = DEFAULT_EVAL_DELTAS,
    *,
    policies: Sequence[str] = POLICIES,
    over_promise_deltas: Sequence[float] = KEY_DELTAS,
    in_distribution: np.ndarray | None = None,
) -> dict:
    """Sweep δ for every policy on labelled test logits; JSON-serialisable (evaluation.json).

    `in_distribution`: the input guard's verdict per test sample, as the server applies it (None: no guard)."""
    num_exits = calibration.num_exits
    logits = [np.asarray(z) for z in test_logits_per_exit]
    labels = np.asarray(labels, dtype=np.int64)
    fractions = np.asarray(compute_fractions, dtype=np.float64)
    if len(logits) != num_exits or fractions.shape != (num_exits,):
        raise ValueError(f"need logits and compute fractions of {num_exits} exits, got {len(logits)} and {fractions.size}")
    if any(z.ndim != 2 or z.shape[0] != labels.size for z in logits):
        raise ValueError(f"every exit's logits must be [{labels.size}, classes]")
    if labels.size == 0:
        raise ValueError("need at least one test sample")
    for policy in policies:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")

    deltas = [float(d) for d in deltas]
    decisions: dict[tuple[str, float], Decisions] = {}

    def decide(policy: str, delta: float) -> Decisions:
        if (policy, delta) not in decisions:
            decisions[(policy, delta)] = decide_all(calibration, policy, logits, delta, in_distribution)
        return decisions[(policy, delta)]

    report_policies = {
        policy: [policy_row(decide(policy, d), labels, d, fractions, num_exits) for d in deltas] for policy in policies
    }
    # Every policy: its promise holds or it does not, whatever rule chose the exit (issue 15).
    promise_rows = [
        {"policy": policy, "delta": float(d), "per_exit": over_promise(decide(policy, float(d)), labels, num_exits)}
        for policy in _paired_order(policies) for d in over_promise_deltas
    ]
    return {
        "n": int(labels.size),
        "num_exits": num_exits,
        "calibration": {
            "confidence": calibration.measure,
            "validation_size": calibration.validation_size,
            "data_fingerprint": calibration.data_fingerprint,
            "labels_known": calibration.labels_known,
            "alpha": calibration.alpha,
            "window": calibration.window,
            "schema_version": calibration.schema_version,
            "input_guard": None if in_distribution is None else {
                "quantile": calibration.input_guard.quantile if calibration.input_guard else None,
                "withheld": float(1.0 - np.mean(in_distribution)),
            },
        },
        "deltas": deltas,
        "exits": [exit_report(calibration, k, logits[k], labels, fractions[k]) for k in range(num_exits)],
        "policies": report_policies,
        "over_promise": promise_rows,
        "promise_check": promise_check({"policies": report_policies}),
    }


# --- markdown ---------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3, scale: float = 1.0) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _policy_rows(rows: list[dict]) -> list[list[str]]:
    return [[
        f"{r['delta']:.2f}", _fmt(r["accuracy"]), _fmt(r["accuracy_promised"]), _fmt(r["coverage"]),
        ("**yes**" if r["violation"] else "no") + (f" (p={r['violation_p_value']:.2g})" if r.get("violation_p_value") is not None else ""),
        _fmt(r["mean_exit"], 2), _fmt(r["compute_fraction"]), " ".join(map(str, r["exit_histogram"])),
    ] for r in rows]


def render_markdown(report: dict, title: str = "Evaluation", key_deltas: Sequence[float] = KEY_DELTAS) -> str:
    """evaluation.md: per-exit quality, each policy at the key δ, over-promise, and the full sweep."""
    cal = report["calibration"]
    lines = [f"# {title}", ""]
    if report.get("source"):
        for key, value in report["source"].items():
            lines.append(f"- {key}: `{value}`")
    lines += [
        f"- test samples: {report['n']}; exits: {report['num_exits']}",
        f"- calibration: {cal['validation_size']} validation samples, confidence `{cal['confidence']}`, "
        f"labels {'known' if cal['labels_known'] else 'unknown (self-supervised)'}, alpha {cal['alpha']}, window ±{cal['window']}",
        "- `promised` is the accuracy of the samples answered with target_met, `coverage` their share; "
        "a violation is promised accuracy below δ (p: one-sided binomial p-value of seeing it if the true rate were δ).",
        "", "## Exits", "",
    ]
    lines += _table(
        ["exit", "compute", "accuracy", "T", "ECE", "AUROC", "AURC"],
        [[str(e["index"]), _fmt(e["compute_fraction"]), _fmt(e["accuracy"]), _fmt(e["temperature"], 2), _fmt(e["ece"]),
          _fmt(e["auroc"]), _fmt(e["aurc"])] for e in report["exits"]],
    )
    lines += ["", "## Promise check (every policy)", "",
              "Samples answered with target_met must be correct at a rate >= δ whatever rule chose the exit: "
              "violations over the whole sweep, and the worst promised accuracy minus δ (points).", ""]
    lines += _table(
        ["policy", "violations", "worst promised − δ"],
        [[c["policy"], f"{c['violations']} of {c['deltas']}", _fmt(c["worst_margin"], 1, 100)]
         for c in report.get("promise_check") or promise_check(report)],
    )
    header = ["δ", "accuracy", "promised", "coverage", "violation", "mean exit", "compute", "exit histogram"]
    lines += ["", "## Policies at key δ", ""]
    keys = {round(float(d), 6) for d in key_deltas}
    for policy, rows in report["policies"].items():
        chosen = [r for r in rows if round(r["delta"], 6) in keys]
        if chosen:
            lines += [f"### {policy}", "", *_table(header, _policy_rows(chosen)), ""]
    if report["over_promise"]:
        num_exits = report["num_exits"]
        lines += ["## Over-promise per exit", "",
                  "Mean estimated accuracy minus realised accuracy of the samples answered at each exit, "
                  "in points (n in brackets). Positive = the estimate was too optimistic.", ""]
        lines += _table(
            ["policy", "δ", *[f"exit {k}" for k in range(num_exits)]],
            [[row["policy"], f"{row['delta']:.2f}",
              *[f"{_fmt(e['over_promise'], 1, 100)} ({e['n']})" for e in row["per_exit"]]] for row in report["over_promise"]],
        )
        lines.append("")
    lines += ["## Full sweep", ""]
    for policy, rows in report["policies"].items():
        lines += [f"<details><summary>{policy}</summary>", "", *_table(header, _policy_rows(rows)), "", "</details>", ""]
    return "\n".join(lines)
