"""Online accuracy monitoring (issue 8): what shadow checks cost, how fast drift is found, and what
recalibration from feedback buys.

    python benchmarks/monitoring.py                      # all three parts, ~6 minutes on 2 cores
    python benchmarks/monitoring.py --parts cost --seconds 8

cost          real `exitserve serve` processes on the default bundle, one alive at a time, with decision
              recording off / on, shadow fraction 0 / 0.1 / 1.0, and the feedback log on (per-exit
              traces): closed-loop clients send 16-image CIFAR-10 requests at the default δ for
              --seconds; 1 client (latency) and 4 clients (throughput), two interleaved rounds.
detection     CIFAR-10 test images with added Gaussian noise (σ 0.1) after clean ones, decided by the
              server's own exit rule offline (`decide_all`, which the engine tests show equal to
              the server): samples until the rules.yml conditions hold (all 10,000 test images, 200 random
              orders per setting), and how often clean streams of the same length set them off.
recalibration feedback logs as the server writes them (each sample observed up to its exit, all exits
              for shadowed ones) from noisy images, tables recounted with `refit_document` exactly as
              `exitserve calibrate --from-feedback` does, judged on other noisy images.
Writes benchmarks/results/monitoring.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from bench_support import cpu_model, free_port, wait_ready

from exitserve.calibration import Calibration, decide_all
from exitserve.calibration.fitting import Observations, observe_logits, refit_document
from exitserve.models.bundle import load_bundle
from exitserve.models.data import load_dataset
from exitserve.service.settings import DEFAULT_BUNDLE
from exitserve.service.tools.offline import bundle_logits

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
NOISE = 0.1
POLICY = "pcee-lb-cond"
FEEDBACK_MARGIN, SHADOW_MARGIN, MIN_SAMPLES = 0.05, 0.05, 200  # as in deploy/prometheus/rules.yml


def noisy(x: np.ndarray, seed: int) -> np.ndarray:
    return np.clip(x + np.random.default_rng(seed).normal(0.0, NOISE, x.shape).astype(np.float32), 0.0, 1.0)


# --- cost of shadow checks ------------------------------------------------------------------------

COST_CONFIGS = {
    "recording off": {"EXITSERVE_FEEDBACK_CAPACITY": "0"},
    "recording on (default)": {},
    "shadow 0.1": {"EXITSERVE_SHADOW_FRACTION": "0.1"},
    "shadow 1.0": {"EXITSERVE_SHADOW_FRACTION": "1.0"},
    "shadow 0.1 + feedback log": {"EXITSERVE_SHADOW_FRACTION": "0.1", "EXITSERVE_FEEDBACK_LOG": "LOG"},
}


async def closed_loop(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    exits: list[int] = []
    stop = time.perf_counter() + seconds

    async def client(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            k = i
            while time.perf_counter() < stop:
                started = time.perf_counter()
                r = await http.post("/v1/models/cifar10-resnet-large/predict", content=bodies[k % len(bodies)],
                                    headers={"content-type": "application/json"})
                latencies.append(time.perf_counter() - started)
                r.raise_for_status()
                exits.extend(p["exit"] for p in r.json()["predictions"])
                k += clients

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {"requests": len(ms), "images_per_s": len(exits) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_exit": float(np.mean(exits))}


def shadow_cost(seconds: float, rounds: int, tmp: Path) -> list[dict]:
    x = load_dataset("cifar10:test").x[:1024]
    bodies = [json.dumps({"inputs": {"b64": base64.b64encode(np.ascontiguousarray(x[i:i + 16], "<f4").tobytes()).decode(),
                                     "dtype": "float32", "shape": [16, 3, 32, 32]}}).encode() for i in range(0, 1024, 16)]
    rows: dict[str, dict[str, list[dict]]] = {name: {"1": [], "4": []} for name in COST_CONFIGS}
    for _ in range(rounds):
        for name, env in COST_CONFIGS.items():
            env = {k: (str(tmp / "feedback.jsonl") if v == "LOG" else v) for k, v in env.items()}
            port = free_port()
            log = (tmp / "server.log").open("w")
            proc = subprocess.Popen([sys.executable, "-m", "exitserve.service.cli", "serve", "--port", str(port)], cwd=REPO,
                                    env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
            try:
                url = f"http://127.0.0.1:{port}"
                wait_ready(f"{url}/readyz")
                asyncio.run(closed_loop(url, bodies, 4, 2.0))  # warm the sockets and the allocator
                for clients in (1, 4):
                    rows[name][str(clients)].append(asyncio.run(closed_loop(url, bodies, clients, seconds)))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
                log.close()
    out = []
    for name, by_clients in rows.items():
        row = {"setting": name}
        for clients, runs in by_clients.items():
            row[f"c{clients}"] = {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
        out.append(row)
    return out


# --- detection -------------------------------------------------------------------------------------

def agreement_tables(cal: Calibration) -> list[np.ndarray]:
    return [cal.agreement(k)[0] for k in range(cal.num_exits)]


def per_sample(cal: Calibration, logits: list[np.ndarray], labels: np.ndarray, delta: float) -> dict:
    """Per sample what the server would count: exit, correct, promised, shadow agreement and its expectation."""
    d = decide_all(cal, POLICY, logits, delta)
    last = cal.num_exits - 1
    tables = agreement_tables(cal)
    agree = np.zeros(len(labels), bool)
    expected = np.zeros(len(labels))
    for k in range(last):
        m = d.exit_index == k
        agree[m] = logits[k][m].argmax(1) == logits[last][m].argmax(1)
        expected[m] = tables[k][cal.bin_index(k, d.confidence[m])]
    return {"exit": d.exit_index, "correct": d.prediction == labels, "estimate": d.estimate,
            "agree": agree, "expected": expected}


def first_alarm(s: dict, order: np.ndarray, shadow_fraction: float, rng: np.random.Generator) -> tuple[int | None, int | None]:
    """Samples until the feedback condition, and until the shadow condition, hold on the cumulative counts."""
    exit_, correct, estimate = s["exit"][order], s["correct"][order], s["estimate"][order]
    n = len(order)
    gap = np.cumsum(estimate - correct) / np.arange(1, n + 1)
    hits = np.flatnonzero((gap > FEEDBACK_MARGIN) & (np.arange(1, n + 1) >= MIN_SAMPLES))
    by_feedback = int(hits[0]) + 1 if len(hits) else None
    shadowed = (exit_ < exit_.max()) & (rng.random(n) < shadow_fraction)
    by_shadow = None
    for k in np.unique(exit_[shadowed]):
        m = shadowed & (exit_ == k)
        count = np.cumsum(m)
        diff = np.cumsum(np.where(m, s["expected"][order] - s["agree"][order], 0.0))
        ok = np.flatnonzero((count >= MIN_SAMPLES) & (diff > SHADOW_MARGIN * np.maximum(count, 1)))
        if len(ok) and (by_shadow is None or ok[0] + 1 < by_shadow):
            by_shadow = int(ok[0]) + 1
    return by_feedback, by_shadow


def detection(cal: Calibration, clean: tuple, shifted: tuple, trials: int = 200) -> list[dict]:
    rows = []
    for delta in (0.8, 0.9):
        sc, ss = per_sample(cal, *clean, delta), per_sample(cal, *shifted, delta)
        for fraction in (1.0, 0.25, 0.1):
            rng = np.random.default_rng(0)
            found_f, found_s, false_f, false_s = [], [], 0, 0
            for _ in range(trials):
                f, s = first_alarm(ss, rng.permutation(len(ss["exit"])), fraction, rng)
                found_f.append(f)
                found_s.append(s)
                cf, cs = first_alarm(sc, rng.permutation(len(sc["exit"])), fraction, rng)
                false_f += cf is not None
                false_s += cs is not None

            def summary(found: list[int | None]) -> dict:
                got = [v for v in found if v is not None]
                return {"found_share": len(got) / len(found),
                        "median_samples": float(np.median(got)) if got else None,
                        "p90_samples": float(np.percentile(got, 90)) if got else None}

            rows.append({"delta": delta, "shadow_fraction": fraction, "stream": len(ss["exit"]),
                         "feedback": summary(found_f), "shadow": summary(found_s),
                         "clean_false_alarm_share": {"feedback": false_f / trials, "shadow": false_s / trials},
                         "clean_stream": len(sc["exit"])})
    return rows


# --- recalibration -----------------------------------------------------------------------------------

def served_log(cal: Calibration, logits: list[np.ndarray], delta: float, fraction: float, seed: int) -> Observations:
    """What the feedback log holds: exits 0..answered, all of them for shadowed samples."""
    d = decide_all(cal, POLICY, logits, delta)
    last = cal.num_exits - 1
    shadowed = (d.exit_index < last) & (np.random.default_rng(seed).random(len(d.exit_index)) < fraction)
    depth = np.where(shadowed, last, d.exit_index)
    full = observe_logits(logits, cal.temperatures, cal.measure)
    exits = range(cal.num_exits)
    return Observations([np.where(k <= depth, full.confidence[k], np.nan) for k in exits],
                        [np.where(k <= depth, full.margin[k], np.nan) for k in exits],
                        [np.where(k <= depth, full.prediction[k], -1) for k in exits])


def judge(cal: Calibration, logits: list[np.ndarray], labels: np.ndarray, fractions: np.ndarray, delta: float) -> dict:
    d = decide_all(cal, POLICY, logits, delta)
    correct = d.prediction == labels
    met = d.target_met
    return {"promised_accuracy": float(correct[met].mean()) if met.any() else None, "coverage": float(met.mean()),
            "accuracy": float(correct.mean()), "compute": float(fractions[d.exit_index].mean()),
            "violation": bool(met.any() and correct[met].mean() < delta)}


def recalibration(cal: Calibration, fractions: np.ndarray, pool: tuple, fresh: tuple, validation: tuple) -> list[dict]:
    rows = []
    vobs = observe_logits(validation[0], cal.temperatures, cal.measure)
    for delta in (0.7, 0.8, 0.9):
        rows.append({"tables": "bundle (clean validation)", "delta": delta, **judge(cal, *fresh, fractions, delta)})
        for size in (1000, 2000, 4000):
            logits, labels = [z[:size] for z in pool[0]], pool[1][:size]
            for fraction in (0.0, 0.1, 1.0):
                obs = served_log(cal, logits, 0.8, fraction, seed=size)
                new = Calibration.from_dict(refit_document(cal.to_dict(), obs, labels, data_fingerprint="fb"), cal.num_exits)
                rows.append({"tables": "feedback", "feedback": size, "shadow_fraction": fraction, "delta": delta,
                             **judge(new, *fresh, fractions, delta)})
            obs = Observations.concatenate([vobs, served_log(cal, logits, 0.8, 0.1, seed=size)])
            merged = Calibration.from_dict(refit_document(cal.to_dict(), obs, np.concatenate([validation[1], labels]),
                                                          data_fingerprint="m"), cal.num_exits)
            rows.append({"tables": "feedback + validation (--merge)", "feedback": size, "shadow_fraction": 0.1,
                         "delta": delta, **judge(merged, *fresh, fractions, delta)})
    return rows


# --- report ------------------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    out = []
    if "cost" in results:
        out += ["| setting | 1 client: p50 / p99 ms | 1 client: images/s | 4 clients: images/s | 4 clients: p99 ms |",
                "| --- | --- | --- | --- | --- |"]
        for r in results["cost"]:
            c1, c4 = r["c1"], r["c4"]
            out.append(f"| {r['setting']} | {c1['p50_ms']:.1f} / {c1['p99_ms']:.1f} | {c1['images_per_s']:.0f} | "
                       f"{c4['images_per_s']:.0f} | {c4['p99_ms']:.1f} |")
        out.append("")
    if "detection" in results:
        out += ["| δ | shadow fraction | labelled feedback: samples to alarm (median / p90) | shadow only: samples to alarm "
                "(median / p90), found | clean streams alarmed (feedback / shadow) |", "| --- | --- | --- | --- | --- |"]
        for r in results["detection"]:
            f, s = r["feedback"], r["shadow"]
            out.append(f"| {r['delta']} | {r['shadow_fraction']} | {f['median_samples']:.0f} / {f['p90_samples']:.0f} | "
                       + (f"{s['median_samples']:.0f} / {s['p90_samples']:.0f}, {s['found_share']:.1%}" if s["median_samples"]
                          else f"not within {r['stream']}") + f" | {r['clean_false_alarm_share']['feedback']:.1%} / "
                       f"{r['clean_false_alarm_share']['shadow']:.1%} |")
        out.append("")
    if "recalibration" in results:
        out += ["| δ | tables | feedback samples | shadow fraction | promised accuracy | coverage | accuracy | compute |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in results["recalibration"]:
            pa = "–" if r["promised_accuracy"] is None else f"{r['promised_accuracy']:.3f}" + (" ✗" if r["violation"] else "")
            out.append(f"| {r['delta']} | {r['tables']} | {r.get('feedback', '–')} | {r.get('shadow_fraction', '–')} | "
                       f"{pa} | {r['coverage']:.3f} | {r['accuracy']:.3f} | {r['compute']:.3f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", default=["cost", "detection", "recalibration"])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "monitoring.json")
    args = parser.parse_args()
    results: dict = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["machine"] = f"{cpu_model()}, {os.cpu_count()} cores"
    results["command"] = "python benchmarks/monitoring.py " + " ".join(sys.argv[1:])
    if "cost" in args.parts:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            results["cost"] = shadow_cost(args.seconds, args.rounds, Path(tmp))
    if {"detection", "recalibration"} & set(args.parts):
        bundle = load_bundle(DEFAULT_BUNDLE)
        cal = Calibration.from_dict(bundle.calibration, bundle.manifest.num_exits)
        fractions = np.asarray(bundle.manifest.compute_fractions())
        test = load_dataset("cifar10:test")
        order = np.random.default_rng(0).permutation(len(test))
        a, b = order[:5000], order[5000:]
        clean = (bundle_logits(bundle, test.x[order], progress=False), test.y[order])
        shifted_a = (bundle_logits(bundle, noisy(test.x[a], 1), progress=False), test.y[a])
        shifted_b = (bundle_logits(bundle, noisy(test.x[b], 2), progress=False), test.y[b])
        if "detection" in args.parts:
            every_shifted = ([np.concatenate(z) for z in zip(shifted_a[0], shifted_b[0], strict=True)],
                             np.concatenate([shifted_a[1], shifted_b[1]]))
            results["detection"] = detection(cal, clean, every_shifted)
        if "recalibration" in args.parts:
            val = load_dataset("cifar10:val", seed=0)
            validation = (bundle_logits(bundle, val.x, progress=False), val.y)
            results["recalibration"] = recalibration(cal, fractions, shifted_a, shifted_b, validation)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
