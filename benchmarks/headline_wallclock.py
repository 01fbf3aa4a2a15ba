"""The headline in wall-clock (issue 27): exitserve serving the large model at the δ where its error
equals the small model's, against the small model in the plain endpoint a user writes.

    python benchmarks/headline_wallclock.py --headline benchmarks/results/headline-cascade/headline.json \\
        --large runs/bundles/cifar10-cascade-large --small runs/bundles/cifar10-cascade-w48 --out FILE

δ is read from headline_cascade.py's result (split 0): the smallest δ at which the large model's test
error under the policy is at most the small network's. Both servers get the same ONNX Runtime thread
count; one client (wrk, one connection) sends 64-image requests for --seconds, alternating between
the servers for --rounds rounds; images per second are reported as the median over rounds, with the
ratio per round. exitserve takes the Open Inference Protocol's binary form (what tritonclient
sends), the plain endpoint raw float32 bytes (its fastest route).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_support import cpu_model, free_port, wait_ready
from serving import _cpu_seconds, _start, _stop, _wrk

from exitserve.models.bundle import load_bundle
from exitserve.models.data import load_dataset

REPO = Path(__file__).resolve().parent.parent
BATCH = 64


def matching_delta(headline: dict, small_name: str, policy: str) -> tuple[float, dict]:
    """The smallest δ of split 0 whose test error is at most the small network's, and its row."""
    split = headline["splits"][0]
    small = next(s for s in split["smalls"] if s["name"] == small_name)
    rows = [r for r in split["large"]["policies"][policy] if r["error"] <= small["error"]]
    if not rows:
        raise SystemExit(f"{policy} never reaches {small_name}'s error {small['error']:.4f}")
    row = min(rows, key=lambda r: r["delta"])
    return row["delta"], {"small_error": small["error"], "large_error": row["error"], "large_mflops": row["mflops"],
                          "small_mflops": small["mflops"]}


def v2_body(name: str, x: np.ndarray, policy: str, delta: float) -> tuple[str, bytes, dict[str, str]]:
    import tritonclient.http as triton

    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    body, json_len = triton.InferenceServerClient.generate_request_body(
        [inp], outputs=[triton.InferRequestedOutput("label", binary_data=False)], parameters={"policy": policy, "delta": delta})
    return f"/v2/models/{name}/infer", body, {"Inference-Header-Content-Length": str(json_len)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--headline", type=Path, required=True)
    parser.add_argument("--large", type=Path, required=True)
    parser.add_argument("--small", type=Path, required=True, help="a one-exit (static) bundle")
    parser.add_argument("--policy", default="pcee-lb-tail")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads, both servers")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    large, small = load_bundle(args.large, require_calibration=True), load_bundle(args.small)
    if small.manifest.num_exits != 1:
        raise SystemExit(f"{args.small} has {small.manifest.num_exits} exits; the plain endpoint serves a one-exit network")
    delta, match = matching_delta(json.loads(args.headline.read_text()), small.manifest.name, args.policy)
    x = np.ascontiguousarray(load_dataset("cifar10:test").x[:BATCH])
    ports = {"exitserve": free_port(), "plain": free_port()}
    env = {"EXITSERVE_THREADS": str(args.threads)}
    servers = {
        "exitserve": _start([sys.executable, "-m", "exitserve.service.cli", "serve", str(args.large),
                             "--port", str(ports["exitserve"])], env),
        "plain": _start([sys.executable, str(REPO / "benchmarks" / "plain_server.py"),
                         str(args.small / small.manifest.segments[0].file), "--port", str(ports["plain"]),
                         "--threads", str(args.threads)]),
    }
    requests = {
        "exitserve": v2_body(large.manifest.name, x, args.policy, delta),
        "plain": ("/predict_raw", x.tobytes(), {"x-shape": ",".join(map(str, x.shape))}),
    }
    rounds: dict[str, list[dict]] = {"exitserve": [], "plain": []}
    try:
        wait_ready(f"http://127.0.0.1:{ports['exitserve']}/readyz")
        wait_ready(f"http://127.0.0.1:{ports['plain']}/docs")
        with tempfile.TemporaryDirectory() as tmp:
            for which, (path, body, headers) in requests.items():  # warm-up
                _wrk(f"http://127.0.0.1:{ports[which]}{path}", body, headers, 1, 2, Path(tmp))
            for _ in range(args.rounds):
                for which, (path, body, headers) in requests.items():
                    cpu = _cpu_seconds(servers[which].pid)
                    result = _wrk(f"http://127.0.0.1:{ports[which]}{path}", body, headers, 1, args.seconds, Path(tmp))
                    if result["non_2xx"] or result["socket_errors"]:
                        raise SystemExit(f"{which}: failed requests {result}")
                    rounds[which].append({"images_per_s": BATCH * result["req_per_s"], "p50_ms": result["p50_us"] / 1000,
                                          "p99_ms": result["p99_us"] / 1000,
                                          "server_cpu_s": _cpu_seconds(servers[which].pid) - cpu})
    finally:
        for proc in servers.values():
            _stop(proc)
    ratios = [e["images_per_s"] / p["images_per_s"] for e, p in zip(rounds["exitserve"], rounds["plain"], strict=True)]
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{cpu_model()}, {platform.machine()}, no GPU",
        "policy": args.policy, "delta": delta, "match": match, "batch": BATCH, "threads": args.threads,
        "large_bundle": large.manifest.name, "small_bundle": small.manifest.name,
        "rounds": rounds,
        "median_images_per_s": {k: statistics.median(r["images_per_s"] for r in v) for k, v in rounds.items()},
        "p99_ms_median": {k: statistics.median(r["p99_ms"] for r in v) for k, v in rounds.items()},
        "ratio_per_round": ratios,
        "ratio_median": statistics.median(ratios),
        "goal": "exitserve with the large model at equal error serves >= 1.0x the images/s of the plain endpoint with the small model",
    }
    report["goal_met"] = report["ratio_median"] >= 1.0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    m = report["median_images_per_s"]
    print(f"δ {delta:.2f} ({args.policy}): large error {100 * match['large_error']:.2f} % at {match['large_mflops']:.1f} MFLOPs, "
          f"small {100 * match['small_error']:.2f} % at {match['small_mflops']:.1f}")
    print(f"images/s: exitserve + {large.manifest.name} {m['exitserve']:.0f}, plain + {small.manifest.name} {m['plain']:.0f}; "
          f"ratio median {report['ratio_median']:.2f} (rounds {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
