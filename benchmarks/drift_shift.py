"""The stream view of issue 26 (item 6): how many single-image requests of a shifted stream it takes
before the label-free drift alert's condition holds.

    python benchmarks/drift_shift.py                          # 3-6 minutes on 2 cores
    python benchmarks/drift_shift.py --requests 1000 --deltas 0.9

A real `exitserve serve` on 127.0.0.1 with the committed default bundle and EXITSERVE_SHADOW_FRACTION
set (one server per fraction) answers streams of single CIFAR-shaped images, one stream after the
other: clean CIFAR-10 test images (the false-alarm control), each CIFAR-10-C family at severity 3 and
MNIST digits as 32x32 RGB (`exitserve.models.shifted`, seeded). Every --scrape-every requests /metrics
is scraped and the conditions of deploy/prometheus/rules.yml are computed from the counters since
the stream began (thresholds read from the file, as tests/deploy/test_deploy_drift.py does):

- ExitserveShadowAgreementDrop (label-free, per early exit): expected minus realised agreement with
  the last exit above the margin, on at least the minimum number of shadowed samples;
- ExitserveInputsUnlikeCalibration (label-free, no shadow work; issue 26): share of answers the input
  guard withheld as out of distribution above its threshold, on at least its minimum of answers;
- ExitserveTargetMissedRatioHigh (label-free too): share of samples answered with target_met=false
  above its threshold, counted here from 200 samples on (the rule itself smooths over 15 minutes);
- a candidate, not in rules.yml: the share promised more than 5 points below the clean stream's
  share at the same δ (measured first in the same run; on the clean stream, against its own final
  share, for its false alarm).

Requests-to-fire is the first scrape at which the condition holds (its `for:` then adds wall time,
not requests). The scraped series of each stream go to `promtool test rules` as a unit test of the
rule's own PromQL (`increase(...[30m])`, the stream compressed into 29 minutes), which must agree with
the counts computed here. Writes benchmarks/results/drift-shift.json and prints Markdown.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml
from bench_support import cpu_model, free_port, wait_ready
from prometheus_client.parser import text_string_to_metric_families

from exitserve.models.shifted import build_sets, cifar_subset, corrupt
from exitserve.service.settings import DEFAULT_BUNDLE

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
OUT = REPO / "benchmarks" / "results" / "drift-shift.json"
MODEL = "cifar10-resnet-large"
SEVERITY = 3
FAMILIES = ("gaussian-noise", "defocus-blur", "jpeg", "contrast", "brightness", "pixelate")
MISSED_MIN_SAMPLES = 200
SHARE_DROP = 0.05  # candidate rule: share promised this far below the clean stream's at the same δ
SHADOW_SERIES = ("exitserve_shadow_expected_agreement_sum", "exitserve_shadow_expected_agreement_count",
                 "exitserve_shadow_total")


def rule(alert: str) -> str:
    [expr] = [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if r.get("alert") == alert]
    return str(expr)


def shadow_thresholds() -> tuple[float, float]:
    expr = rule("ExitserveShadowAgreementDrop")
    return float(re.search(r"\)\s*>\s*([0-9.]+)", expr).group(1)), float(re.search(r">=\s*([0-9.]+)", expr).group(1))  # type: ignore[union-attr]


def guard_thresholds() -> tuple[float, float]:
    expr = rule("ExitserveInputsUnlikeCalibration")
    return float(re.search(r"\)\)\s*>\s*([0-9.]+)", expr).group(1)), float(re.search(r">=\s*([0-9.]+)", expr).group(1))  # type: ignore[union-attr]


def missed_threshold() -> float:
    return float(re.search(r">\s*([0-9.]+)\s*$", rule("ExitserveTargetMissedRatioHigh").strip()).group(1))  # type: ignore[union-attr]


def streams(size: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded shuffles: the clean test subset, each family at severity 3, MNIST as CIFAR."""
    x, _ = cifar_subset(size, seed)
    order = np.random.default_rng(seed).permutation(len(x))  # cifar_subset keeps the files' class order
    x = x[order]
    out = {"clean": x}
    for family in FAMILIES:
        out[f"{family}-{SEVERITY}"] = corrupt(x, family, SEVERITY, seed)
    out["mnist"] = next(build_sets(size, seed, families=[], foreign=["mnist"])).x
    return out


def counters(text: str) -> dict[tuple[str, str, str], float]:
    """(sample name, exit, outcome) -> value, for the model's shadow, exit and target-missed series."""
    out: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") == MODEL and s.name.startswith(
                    ("exitserve_shadow", "exitserve_exits_total", "exitserve_target_missed_total",
                     "exitserve_promise_withheld_total")):
                # the withheld counter's reason goes where the outcome would
                key = (s.name, s.labels.get("exit", ""), s.labels.get("outcome", s.labels.get("reason", "")))
                out[key] = out.get(key, 0.0) + s.value
    return out


def since(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def total(c: dict, name: str, exit_: str | None = None, outcome: str | None = None) -> float:
    return sum(v for k, v in c.items() if k[0] == name and (exit_ is None or k[1] == exit_) and (outcome is None or k[2] == outcome))


def shadow_gaps(c: dict, exits: list[str]) -> dict[str, tuple[float, float]]:
    """Per early exit: (expected - realised agreement, shadowed samples)."""
    out = {}
    for k in exits:
        n = total(c, "exitserve_shadow_expected_agreement_count", k)
        gap = (total(c, "exitserve_shadow_expected_agreement_sum", k) - total(c, "exitserve_shadow_total", k, "agree")) / max(n, 1.0)
        out[k] = (gap, n)
    return out


def promised_share(c: dict) -> tuple[float, float]:
    """(share of samples answered with target_met=true, samples answered)."""
    answered = total(c, "exitserve_exits_total")
    return 1.0 - total(c, "exitserve_target_missed_total") / max(answered, 1.0), answered


def run_stream(client: httpx.Client, x: np.ndarray, delta: float, requests: int, scrape_every: int, exits: list[str],
               reference_share: float | None = None) -> dict:
    """Stream x one image a request; stop at `requests` or once every condition tracked has held.

    `reference_share` (the clean stream's share promised at this δ) turns on the candidate rule:
    share promised more than SHARE_DROP below it, from MISSED_MIN_SAMPLES samples on."""
    margin, minimum = shadow_thresholds()
    missed_margin = missed_threshold()
    guard_margin, guard_minimum = guard_thresholds()
    start = counters(client.get("/metrics").text)
    scrapes: list[tuple[int, dict]] = [(0, {})]
    fired_shadow = fired_missed = fired_share = fired_guard = None
    fired_exits: list[str] = []
    started = time.perf_counter()
    sent = 0
    for i in range(min(requests, len(x))):
        body = {"inputs": {"b64": base64.b64encode(np.ascontiguousarray(x[i:i + 1], "<f4").tobytes()).decode(),
                           "dtype": "float32", "shape": [1, 3, 32, 32]}, "delta": delta}
        r = client.post(f"/v1/models/{MODEL}/predict", json=body)
        r.raise_for_status()
        sent = i + 1
        if sent % scrape_every and sent != min(requests, len(x)):
            continue
        c = since(counters(client.get("/metrics").text), start)
        scrapes.append((sent, c))
        alarmed = [k for k, (gap, n) in shadow_gaps(c, exits).items() if gap > margin and n >= minimum]
        if alarmed and fired_shadow is None:
            fired_shadow, fired_exits = sent, alarmed
        share, answered = promised_share(c)
        if fired_missed is None and answered >= MISSED_MIN_SAMPLES and 1.0 - share > missed_margin:
            fired_missed = sent
        if fired_share is None and reference_share is not None and answered >= MISSED_MIN_SAMPLES and reference_share - share > SHARE_DROP:
            fired_share = sent
        withheld = total(c, "exitserve_promise_withheld_total", outcome="out_of_distribution") / max(answered, 1.0)
        if fired_guard is None and answered >= guard_minimum and withheld > guard_margin:
            fired_guard = sent
        if fired_shadow is not None and fired_missed is not None and fired_guard is not None and (
                reference_share is None or fired_share is not None):
            break
    final = scrapes[-1][1]
    answered = total(final, "exitserve_exits_total")
    return {
        "requests": sent, "seconds": round(time.perf_counter() - started, 1),
        "shadow_fired_after": fired_shadow, "shadow_fired_exits": fired_exits,
        "missed_fired_after": fired_missed,
        "guard_fired_after": fired_guard,
        "final_guard_withheld": round(total(final, "exitserve_promise_withheld_total", outcome="out_of_distribution")
                                      / max(total(final, "exitserve_exits_total"), 1.0), 4),
        "share_drop_fired_after": fired_share, "reference_share": reference_share,
        "final_promised_share": round(promised_share(final)[0], 4),
        "final_shadow_gaps": {k: {"gap": round(g, 4), "n": int(n)} for k, (g, n) in shadow_gaps(final, exits).items()},
        "final_missed_share": round(total(final, "exitserve_target_missed_total") / max(answered, 1.0), 4),
        "exit_shares": [round(total(final, "exitserve_exits_total", str(k)) / max(answered, 1.0), 4) for k in range(len(exits) + 1)],
        "_scrapes": scrapes,
    }


# --- promtool: the rule's own PromQL over the scraped series --------------------------------------

def share_drop_false_alarm(scrapes: list[tuple[int, dict]], reference: float) -> int | None:
    """The candidate rule on the clean stream itself, against its own final share: its false alarm."""
    for sent, c in scrapes:
        share, answered = promised_share(c)
        if answered >= MISSED_MIN_SAMPLES and reference - share > SHARE_DROP:
            return sent
    return None


def alarmed_samples(c: dict, exits: list[str]) -> list[dict]:
    """promtool's expected samples of `count by (model, exit) (EXPR)`: 1 for each exit the counts alarm."""
    margin, minimum = shadow_thresholds()
    return [{"labels": f'{{model="{MODEL}",exit="{k}"}}', "value": 1}
            for k, (gap, n) in shadow_gaps(c, exits).items() if gap > margin and n >= minimum]


def promtool_tests(results: list[dict], exits: list[str], scrape_every: int) -> dict:
    """One test group per stream: input series = the scraped counters since the stream began, one
    sample per scrape, spaced so the whole stream fits in the rule's 30-minute window; the alert's
    expression must name the exits computed here at the firing scrape and none at the scrape before
    (or none at the last scrape of a stream that never fired)."""
    expr = " ".join(rule("ExitserveShadowAgreementDrop").split())
    tests = []
    for res in results:
        scrapes = res["_scrapes"]
        interval = max(1, 1740 // len(scrapes))
        labels = f'model="{MODEL}",job="exitserve",instance="bench"'
        series = []
        for k in exits:
            for name in SHADOW_SERIES:
                outcome = ',outcome="agree"' if name == "exitserve_shadow_total" else ""
                values = [total(c, name, k, "agree" if outcome else None) for _, c in scrapes]
                series.append({"series": f'{name}{{{labels},exit="{k}"{outcome}}}',
                               "values": " ".join(repr(float(v)) for v in values)})  # full precision: gaps sit on the margin
        positions = [n for n, _ in scrapes]
        if res["shadow_fired_after"] is not None:
            at = positions.index(res["shadow_fired_after"])
            checks = [(j, alarmed_samples(scrapes[j][1], exits)) for j in (at - 1, at)]
        else:
            checks = [(len(scrapes) - 1, alarmed_samples(scrapes[-1][1], exits))]
        tests.append({"name": f"{res['stream']} at delta {res['delta']}", "interval": f"{interval}s", "input_series": series,
                      "promql_exp_test": [{"expr": f"count by (model, exit) ({expr})", "eval_time": f"{j * interval}s",
                                           "exp_samples": samples} for j, samples in checks]})
    promtool = shutil.which("promtool")
    if promtool is None:
        return {"ran": False, "why": "promtool not installed (Debian package prometheus)"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "drift_shift_test.yml"
        # promtool loads the input series step by step of evaluation_interval and answers an expression
        # test on the data loaded so far: a step finer than any scrape spacing keeps every sample in.
        text = yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1s", "tests": tests}, sort_keys=False)
        path.write_text(text.replace("promql_exp_test", "promql_expr_test"))
        done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=300)
    return {"ran": True, "passed": done.returncode == 0, "groups": len(tests),
            "output": (done.stdout + done.stderr).strip().splitlines()[-12:]}


# --- the whole run --------------------------------------------------------------------------------

def serve(fraction: float, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "EXITSERVE_SHADOW_FRACTION": str(fraction)}
    proc = subprocess.Popen([sys.executable, "-m", "exitserve.service.cli", "serve", str(DEFAULT_BUNDLE), "--port", str(port)],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/readyz")
    except TimeoutError:
        proc.terminate()
        raise SystemExit(f"server did not start; its log:\n{log.read_text()[-2000:]}") from None
    return proc, url


def markdown(results: dict) -> str:
    goal = results["goal_requests"]
    lines = ["| shadow fraction | δ | stream | last-exit share | shadow alert: requests to fire (exits) | worst shadow gap at the end (exit, n) "
             "| target-missed share | target-missed alert: requests to fire | share promised | candidate: share promised 5 points below clean, requests "
             "| input guard withholds | input-guard alert: requests to fire |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["streams"]:
        seen = {k: g for k, g in r["final_shadow_gaps"].items() if g["n"]} or r["final_shadow_gaps"]
        worst_k, worst = max(seen.items(), key=lambda kv: kv[1]["gap"])
        fired = (f"**{r['shadow_fired_after']}** ({', '.join(r['shadow_fired_exits'])})" if r["shadow_fired_after"]
                 else f"not within {r['requests']}")
        if r["shadow_fired_after"] and r["shadow_fired_after"] > goal:
            fired += " ✗"
        missed = str(r["missed_fired_after"]) if r["missed_fired_after"] else f"not within {r['requests']}"
        drop = str(r["share_drop_fired_after"]) if r["share_drop_fired_after"] else f"not within {r['requests']}"
        guard = f"**{r['guard_fired_after']}**" if r.get("guard_fired_after") else f"not within {r['requests']}"
        lines.append(f"| {r['shadow_fraction']} | {r['delta']} | {r['stream']} | {r['exit_shares'][-1]:.2f} | {fired} | "
                     f"{worst['gap']:+.3f} (exit {worst_k}, {worst['n']}) | {r['final_missed_share']:.3f} | {missed} | "
                     f"{r['final_promised_share']:.3f} | {drop} | {r.get('final_guard_withheld', 0.0):.3f} | {guard} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2500, help="single-image requests per stream at most")
    parser.add_argument("--goal", type=int, default=2000, help="the issue's goal: fire within this many requests")
    parser.add_argument("--deltas", type=float, nargs="+", default=[0.9, 0.8])
    parser.add_argument("--shadow-fractions", type=float, nargs="+", default=[1.0])
    parser.add_argument("--scrape-every", type=int, default=10)
    parser.add_argument("--streams", nargs="+", help="only these streams (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    data = streams(args.requests, args.seed)
    names = args.streams or list(data)
    margin, minimum = shadow_thresholds()
    results: dict = {"machine": f"{cpu_model()}, {os.cpu_count()} cores",
                     "command": ("python benchmarks/drift_shift.py " + " ".join(sys.argv[1:])).strip(),
                     "bundle": str(DEFAULT_BUNDLE.relative_to(REPO)), "severity": SEVERITY, "goal_requests": args.goal,
                     "shadow_rule": {"margin": margin, "min_samples": minimum},
                     "missed_rule": {"threshold": missed_threshold(), "min_samples_here": MISSED_MIN_SAMPLES},
                     "guard_rule": dict(zip(("threshold", "min_samples"), guard_thresholds(), strict=True)),
                     "scrape_every": args.scrape_every, "streams": []}
    with tempfile.TemporaryDirectory() as tmp:
        for fraction in args.shadow_fractions:
            proc, url = serve(fraction, Path(tmp) / "server.log")
            try:
                with httpx.Client(base_url=url, timeout=60) as client:
                    exits = sorted({k[1] for k in counters(client.get("/metrics").text) if k[0] == "exitserve_exits_total"}, key=int)[:-1]
                    for delta in args.deltas:
                        reference = None
                        for name in ["clean", *(n for n in names if n != "clean")] if "clean" in names else names:
                            res = {"shadow_fraction": fraction, "delta": delta, "stream": name,
                                   **run_stream(client, data[name], delta, args.requests, args.scrape_every, exits, reference)}
                            if name == "clean":
                                reference = res["final_promised_share"]
                                res["share_drop_fired_after"] = share_drop_false_alarm(res["_scrapes"], reference)
                            results["streams"].append(res)
                            print(f"shadow {fraction} δ {delta} {name}: shadow fired after {res['shadow_fired_after']}, "
                                  f"input guard after {res['guard_fired_after']}, "
                                  f"missed after {res['missed_fired_after']}, share drop after {res['share_drop_fired_after']} "
                                  f"({res['requests']} requests, {res['seconds']} s)", flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    results["promtool"] = promtool_tests(results["streams"], exits, args.scrape_every)
    for r in results["streams"]:
        del r["_scrapes"]
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    print(f"promtool: {results['promtool']}")


if __name__ == "__main__":
    main()
