"""Reliability III (issue 30): a failing decision store, large bodies, fuzzed bodies, overload logs.

    python benchmarks/reliability_iii.py                       # every part, ~15 minutes on 2 cores
    python benchmarks/reliability_iii.py --parts redis --seconds 30

redis   real `exitserve serve` (default bundle, EXITSERVE_DECISION_STORE=redis, a feedback log) and a real
        redis-server: 8 closed-loop clients of single-image v1 requests for --seconds with Redis healthy,
        then the same with Redis stopped (SIGSTOP) for the whole run; feedback is sent twice during the
        outage; then SIGCONT and the time until a new answer's feedback is scored again. Log lines of the
        outage are counted from the server's log: all of them, and those that are not the per-request line.
bodies  the default bundle with default limits: for each route and content type one body at its route's
        limit (peak RSS growth from /proc/PID/status VmHWM, reset through /proc/PID/clear_refs), the
        issue's 60 MiB JSON refused after parsing, then 16 maximum-size JSON bodies at once; meanwhile a
        client sends a single image every 50 ms and records its latency.
fuzz    --fuzz-bodies hostile bodies (tests/fuzz_support.py: Hypothesis mutations of valid v1, v2 JSON,
        v2 binary, feedback, completions and chat bodies, with random Unicode incl. lone surrogates and
        random bytes) against one server of the digits test bundle and a tiny generation bundle; counts
        statuses (the goal: no 500).
burst   300 concurrent 16-image requests against a queue of 4 (the default bundle): statuses and the
        server's log lines by level (the goal: no `error` line).
Writes benchmarks/results/reliability-iii.json (merged per part) and prints what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from bench_support import cpu_model, free_port, wait_ready

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # fuzz_support, llm_support, service/redis_support: what the tests use
RESULTS = REPO / "benchmarks" / "results" / "reliability-iii.json"
MODEL = "cifar10-resnet-large"
K8S_MEMORY_LIMIT = 2 << 30  # deploy/k8s/deployment.yaml: resources.limits.memory 2Gi


class Server:
    """`exitserve serve` on a free loopback port, its log in a file."""

    def __init__(self, bundles: list[Path] | None = None, env: dict[str, str] | None = None, args: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="exitserve-bench-", suffix=".log")[1])
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "exitserve.service.cli", "serve", *map(str, bundles or []), "--port", str(self.port),
             *(args or [])], cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        wait_ready(f"{self.url}/readyz", timeout=180)

    def lines(self) -> list[str]:
        self._log.flush()
        return self.log_path.read_text().splitlines()

    def entries(self, start: int = 0) -> list[dict]:
        return [json.loads(line) for line in self.lines()[start:] if line.startswith("{")]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self._log.close()


@contextlib.contextmanager
def serving(*args, **kwargs) -> Iterator[Server]:  # noqa: ANN002, ANN003
    server = Server(*args, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def cifar_images(n: int) -> np.ndarray:
    from exitserve.models.data import load_dataset

    return load_dataset("cifar10:test").x[:n].astype(np.float32)


def raw_tensor(x: np.ndarray) -> dict:
    return {"b64": base64.b64encode(np.ascontiguousarray(x, "<f4").tobytes()).decode(), "dtype": "float32",
            "shape": list(x.shape)}


def percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0}
    a = np.asarray(seconds) * 1000
    return {"n": len(a), "p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "max_ms": round(float(a.max()), 2)}


# --- redis ------------------------------------------------------------------------------------------

async def closed_loop(url: str, bodies: list[bytes], seconds: float, clients: int, prefix: str) -> dict:
    latencies: list[float] = []
    statuses: Counter[int | str] = Counter()
    deadline = time.monotonic() + seconds

    async def client(c: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            i = 0
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    r = await http.post(f"/v1/models/{MODEL}/predict", content=bodies[(c + i) % len(bodies)],
                                        headers={"Content-Type": "application/json", "X-Request-Id": f"{prefix}-{c}-{i}"})
                    statuses[r.status_code] += 1
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - started)
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                i += 1

    await asyncio.gather(*(client(c) for c in range(clients)))
    return {"statuses": {str(k): v for k, v in statuses.items()}, "latency": percentiles(latencies),
            "throughput_rps": round(len(latencies) / seconds, 1)}


def part_redis(seconds: float) -> dict:
    from service.redis_support import RedisProcess

    x = cifar_images(64)
    bodies = [json.dumps({"inputs": raw_tensor(x[i:i + 1])}).encode() for i in range(64)]
    out: dict = {"clients": 8, "seconds": seconds}
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisProcess(Path(tmp))
        feedback_log = Path(tmp) / "feedback.jsonl"
        env = {"EXITSERVE_DECISION_STORE": "redis", "EXITSERVE_REDIS_URL": redis.url, "EXITSERVE_FEEDBACK_LOG": str(feedback_log)}
        try:
            with serving([], env=env) as server, httpx.Client(base_url=server.url, timeout=30) as http:
                asyncio.run(closed_loop(server.url, bodies, 3, 8, "warm"))
                out["healthy"] = asyncio.run(closed_loop(server.url, bodies, seconds, 8, "healthy"))
                label = {"request_id": "healthy-0-0", "index": 0, "label": 3}
                out["feedback_before"] = http.post(f"/v1/models/{MODEL}/feedback", json=[label]).status_code
                mark = len(server.lines())
                os.kill(redis.process.pid, signal.SIGSTOP)
                stopped = time.monotonic()
                feedback_during: list[dict] = []

                def feedback_twice() -> None:
                    for wait, index in ((seconds / 4, 1), (seconds / 2, 2)):
                        time.sleep(wait)
                        started = time.perf_counter()
                        r = httpx.post(f"{server.url}/v1/models/{MODEL}/feedback", timeout=30,
                                       json=[{"request_id": f"healthy-0-{index}", "index": 0, "label": 5}])
                        feedback_during.append({"status": r.status_code, "seconds": round(time.perf_counter() - started, 3),
                                                "error": r.json().get("error")})

                side = threading.Thread(target=feedback_twice)
                side.start()
                out["outage"] = asyncio.run(closed_loop(server.url, bodies, seconds, 8, "outage"))
                side.join()
                out["readyz_during_outage"] = http.get("/readyz").json()
                os.kill(redis.process.pid, signal.SIGCONT)
                resumed = time.monotonic()
                out["outage_seconds"] = round(resumed - stopped, 1)
                outage_entries = server.entries(mark)
                recovered = None
                for attempt in range(200):
                    rid = f"after-{attempt}"
                    http.post(f"/v1/models/{MODEL}/predict", content=bodies[0],
                              headers={"Content-Type": "application/json", "X-Request-Id": rid})
                    r = http.post(f"/v1/models/{MODEL}/feedback", json=[{"request_id": rid, "index": 0, "label": 1}])
                    if r.status_code == 200 and r.json()["scored"] == 1:
                        recovered = round(time.monotonic() - resumed, 2)
                        break
                    time.sleep(0.1)
                out["store_used_again_after_s"] = recovered
                out["readyz_after"] = http.get("/readyz").json()
                out["feedback_during_outage"] = feedback_during
                logged = [json.loads(line) for line in feedback_log.read_text().splitlines()]
                out["feedback_log_unscored_lines"] = [{k: e[k] for k in ("request_id", "label", "scored")}
                                                      for e in logged if e.get("scored") is False]
                levels = Counter(e["level"] for e in outage_entries)
                other = [e for e in outage_entries if e.get("message") != "request"]
                out["outage_log"] = {"lines": len(outage_entries), "by_level": dict(levels),
                                     "request_lines": len(outage_entries) - len(other), "other_lines": len(other),
                                     "other": [{"level": e["level"], "message": e["message"][:160]} for e in other],
                                     "tracebacks": sum("exception" in e for e in outage_entries)}
                metrics = http.get("/metrics").text
                out["dropped_records"] = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
                                          for line in metrics.splitlines()
                                          if line.startswith("exitserve_decision_records_dropped_total{")}
        finally:
            redis.stop()
    healthy, outage = out["healthy"]["latency"], out["outage"]["latency"]
    failed = sum(v for k, v in out["outage"]["statuses"].items() if k != "200")
    out["goals"] = {
        "p99_ratio": round(outage["p99_ms"] / healthy["p99_ms"], 3), "p99_ratio_met": outage["p99_ms"] <= 1.2 * healthy["p99_ms"],
        "failed_inference": failed, "non_request_log_lines": out["outage_log"]["other_lines"],
        "log_lines_met": out["outage_log"]["other_lines"] <= 5,
        "feedback_503": all(f["status"] == 503 for f in feedback_during) and len(feedback_during) == 2,
        "feedback_in_log": len(out["feedback_log_unscored_lines"]) == 2,
        "recovered_within_10s": recovered is not None and recovered <= 10,
    }
    return out


# --- bodies -----------------------------------------------------------------------------------------

def peak_reset(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class SmallProbe:
    """Small requests every 50 ms from their own threads (the other clients): a single image to the same
    model (any status: its latency includes waiting behind the large request's compute, or a 503 from
    admission), and GET /healthz (the event loop's responsiveness: a parse stall shows here)."""

    def __init__(self, url: str, body: bytes):
        self.url, self.body = url, body
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.health: list[float] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._predict), threading.Thread(target=self._healthz)]

    def _predict(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self._stop.is_set():
                started = time.perf_counter()
                r = http.post(f"/v1/models/{MODEL}/predict", content=self.body, headers={"Content-Type": "application/json"})
                self.latencies.append(time.perf_counter() - started)
                self.statuses[r.status_code] += 1
                self._stop.wait(0.05)

    def _healthz(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self._stop.is_set():
                started = time.perf_counter()
                http.get("/healthz")
                self.health.append(time.perf_counter() - started)
                self._stop.wait(0.05)

    def summary(self) -> dict:
        return {"predict": {**percentiles(self.latencies), "statuses": {str(k): v for k, v in self.statuses.items()}},
                "healthz": percentiles(self.health)}

    def __enter__(self) -> SmallProbe:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, float, str]:
    started = time.perf_counter()
    try:
        r = httpx.post(url, content=body, headers=headers, timeout=300)
        return r.status_code, round(time.perf_counter() - started, 2), r.text[:120] if r.status_code != 200 else ""
    except httpx.HTTPError as exc:
        return -1, round(time.perf_counter() - started, 2), type(exc).__name__


def _json_numbers(n: int, x: np.ndarray) -> bytes:
    """n CIFAR images (cycled) as nested JSON lists of float64-printed float32 pixels (~19 bytes a number)."""
    rows = [x[i % len(x)].astype(np.float64).tolist() for i in range(n)]
    return json.dumps({"inputs": rows}).encode()


def part_bodies() -> dict:
    from exitserve.service.protocols.feedback import MAX_ITEMS

    x = cifar_images(64)
    small = json.dumps({"inputs": raw_tensor(x[:1])}).encode()
    limit = 64 << 20  # min(EXITSERVE_MAX_BODY_BYTES, 1024 x 3072 x 24 + 64 KiB): the CIFAR routes' limit
    per_image = len(_json_numbers(1, x)) - len(b'{"inputs": []}')
    images = min(1024, (limit - 64) // (per_image + 2))
    bodies: dict[str, tuple[str, bytes, dict[str, str]]] = {}
    v1_json = _json_numbers(images, x)
    bodies["v1 JSON nested lists (served)"] = (f"/v1/models/{MODEL}/predict", v1_json, {"Content-Type": "application/json"})
    bad = bytearray(v1_json)
    bad[bad.rindex(b"]") - 3: bad.rindex(b"]") - 3] = b"], [0.5"  # one ragged row at the end: refused after reading
    bodies["v1 JSON, 60+ MiB refused (issue's case)"] = (f"/v1/models/{MODEL}/predict", bytes(bad), {"Content-Type": "application/json"})
    many = np.resize(x, (1024, 3, 32, 32))
    bodies["v1 base64 tensor, 1024 images"] = (f"/v1/models/{MODEL}/predict", json.dumps({"inputs": raw_tensor(many)}).encode(),
                                                {"Content-Type": "application/json"})
    v2 = {"inputs": [{"name": "input", "shape": [images, 3, 32, 32], "datatype": "FP32",
                      "data": np.resize(x, (images, 3, 32, 32)).astype(np.float64).ravel().tolist()}]}
    bodies["v2 JSON flat data"] = (f"/v2/models/{MODEL}/infer", json.dumps(v2).encode(), {"Content-Type": "application/json"})
    header = json.dumps({"inputs": [{"name": "input", "shape": [1024, 3, 32, 32], "datatype": "FP32",
                                     "parameters": {"binary_data_size": many.nbytes}}]}).encode()
    bodies["v2 binary, 1024 images"] = (f"/v2/models/{MODEL}/infer", header + many.tobytes(),
                                        {"Inference-Header-Content-Length": str(len(header))})
    items = [{"request_id": "f" * 128, "index": i, "label": "automobile"} for i in range(MAX_ITEMS)]
    bodies["feedback, 10,000 items"] = (f"/v1/models/{MODEL}/feedback", json.dumps(items).encode(), {"Content-Type": "application/json"})
    out: dict = {"route_limit_bytes": limit, "images_in_json_body": images, "single": {}}
    with serving([]) as server:
        pid = server.process.pid
        for _ in range(3):
            httpx.post(f"{server.url}/v1/models/{MODEL}/predict", content=small, headers={"Content-Type": "application/json"})
        for name, (path, body, headers) in bodies.items():
            time.sleep(1)
            baseline = status_kib(pid, "VmRSS")
            peak_reset(pid)
            with SmallProbe(server.url, small) as probe:
                for _ in range(5):  # a 503 when the probe's own request held the queue: try again
                    status, seconds, error = _post(server.url + path, body, headers)
                    if status != 503:
                        break
                    time.sleep(0.2)
            growth = (status_kib(pid, "VmHWM") - baseline) * 1024
            out["single"][name] = {"bytes": len(body), "status": status, "seconds": seconds, "error": error,
                                   "peak_growth_bytes": growth, "peak_growth_x_body": round(growth / len(body), 2),
                                   "small_requests": probe.summary()}
            print(name, out["single"][name], flush=True)
        time.sleep(1)
        baseline = status_kib(pid, "VmRSS")
        peak_reset(pid)
        path, body, headers = bodies["v1 JSON nested lists (served)"]
        with SmallProbe(server.url, small) as probe, concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda _: _post(server.url + path, body, headers), range(16)))
        peak = status_kib(pid, "VmHWM") * 1024
        out["sixteen_at_once"] = {"bytes_each": len(body), "statuses": dict(Counter(str(r[0]) for r in results)),
                                  "errors": sorted({r[2] for r in results if r[2]}), "seconds_max": max(r[1] for r in results),
                                  "rss_before_bytes": baseline * 1024, "peak_rss_bytes": peak,
                                  "k8s_memory_limit_bytes": K8S_MEMORY_LIMIT, "within_limit": peak < K8S_MEMORY_LIMIT,
                                  "small_requests": probe.summary()}
        print("16 at once", out["sixteen_at_once"], flush=True)
    worst = max(v["peak_growth_x_body"] for v in out["single"].values())
    probes = [v["small_requests"] for v in out["single"].values()] + [out["sixteen_at_once"]["small_requests"]]
    health_max = max(p["healthz"].get("max_ms", 0) for p in probes)
    predict_max = max(p["predict"].get("max_ms", 0) for p in probes)
    out["goals"] = {"worst_peak_growth_x_body": worst, "peak_growth_met": worst <= 3,
                    "sixteen_within_limit": out["sixteen_at_once"]["within_limit"],
                    "small_healthz_max_ms": health_max, "small_predict_max_ms": predict_max,
                    "small_request_met": health_max < 100 and predict_max < 100}
    return out


# --- fuzz -------------------------------------------------------------------------------------------

def _digits_bundle(root: Path) -> Path:
    """The test suite's digits bundle (tests/conftest.py), trained, exported and calibrated by the CLI."""
    bundle = root / "digits"
    cli = [sys.executable, "-m", "exitserve.service.cli"]
    subprocess.run([*cli, "train", "--arch", "digits-compact", "--data", "digits", "--epochs", "4", "--lr", "0.1",
                    "--batch-size", "64", "--out", str(root / "run"), "--export", str(bundle), "--name", "digits",
                    "--no-progress", "--threads", "1"], check=True, cwd=REPO, capture_output=True)
    subprocess.run([*cli, "calibrate", str(bundle), "--data", "digits:val", "--no-progress"], check=True, cwd=REPO,
                   capture_output=True)
    return bundle


def _generate(route: str, count: int, seed: int) -> list[tuple[str, bytes, dict[str, str]]]:
    from fuzz_support import fuzzed_bodies
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    out: list[tuple[str, bytes, dict[str, str]]] = []

    @hypothesis_seed(seed)
    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=fuzzed_bodies(route))
    def collect(case: tuple[str, bytes, dict[str, str]]) -> None:
        out.append(case)

    collect()
    return out


def part_fuzz(total: int) -> dict:
    from fuzz_support import ROUTES
    from llm_support import write_tiny_generation_bundle

    routes = sorted(ROUTES)
    statuses: dict[str, Counter] = {route: Counter() for route in routes}
    examples_500: list[dict] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        digits = _digits_bundle(Path(tmp))
        llm = write_tiny_generation_bundle(Path(tmp) / "tiny-llm")
        with serving([digits, llm]) as server:
            session = threading.local()

            def send(case: tuple[str, bytes, dict[str, str]]) -> tuple[str, int, bytes]:
                route, content, headers = case
                if not hasattr(session, "http"):
                    session.http = httpx.Client(base_url=server.url, timeout=60)
                try:
                    return route, session.http.post(ROUTES[route], content=content, headers=headers).status_code, content
                except httpx.HTTPError:
                    return route, -1, content

            sent, round_ = 0, 0
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                while sent < total:
                    batch = []
                    for route in routes:
                        batch += _generate(route, min(500, (total - sent) // len(routes) + 1), seed=round_ * 100 + routes.index(route))
                    batch = batch[:total - sent]
                    for route, status, content in pool.map(send, batch):
                        statuses[route][status] += 1
                        if status >= 500 and len(examples_500) < 10:
                            examples_500.append({"route": route, "status": status, "body": content[:300].decode("latin-1")})
                    sent += len(batch)
                    round_ += 1
                    print(f"fuzz: {sent} sent, {sum(c[500] for c in statuses.values())} x 500", flush=True)
            logs = server.lines()
    out = {"bodies": sent, "seconds": round(time.monotonic() - started, 1),
           "statuses": {route: {str(k): v for k, v in sorted(c.items(), key=lambda kv: str(kv[0]))} for route, c in statuses.items()},
           "responses_500": sum(c[500] for c in statuses.values()),
           "responses_5xx": sum(v for c in statuses.values() for k, v in c.items() if isinstance(k, int) and k >= 500),
           "transport_errors": sum(c[-1] for c in statuses.values()), "examples_500": examples_500,
           "unhandled_error_lines": sum('"unhandled error"' in line for line in logs)}
    out["goals"] = {"zero_500": out["responses_500"] == 0}
    return out


# --- burst ------------------------------------------------------------------------------------------

async def _burst(port: int, bodies: list[bytes]) -> list[int]:
    """Every request written on its own connection at once (raw sockets: no client-side pacing)."""

    async def one(i: int, body: bytes) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write((f"POST /v1/models/{MODEL}/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"X-Request-ID: burst-{i}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
        await writer.drain()
        line = await reader.readline()
        writer.close()
        return int(line.split()[1]) if line else -1

    return await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))


def part_burst(count: int) -> dict:
    x = cifar_images(64)
    bodies = [json.dumps({"inputs": raw_tensor(x[(i % 4) * 16:(i % 4) * 16 + 16])}).encode() for i in range(count)]
    with serving([], args=["--queue-limit", "4", "--max-batch-size", "16"]) as server:
        mark = len(server.lines())
        statuses = asyncio.run(_burst(server.port, bodies))
        time.sleep(11)  # the refusal summary's interval (10 s): its line for the burst's tail too
        entries = server.entries(mark)
    levels = Counter(e["level"] for e in entries)
    out = {"requests": count, "statuses": dict(Counter(str(s) for s in statuses)), "log_lines_by_level": dict(levels),
           "warning_lines": [e["message"] + " " + json.dumps(e.get("refused")) for e in entries if e["level"] == "warning"],
           "error_lines": levels.get("error", 0)}
    out["goals"] = {"zero_error_lines": out["error_lines"] == 0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["redis", "bodies", "fuzz", "burst"],
                        choices=["redis", "bodies", "fuzz", "burst"])
    parser.add_argument("--seconds", type=float, default=30.0, help="redis: each run's length (the outage's too)")
    parser.add_argument("--fuzz-bodies", type=int, default=100_000)
    parser.add_argument("--burst", type=int, default=300)
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["machine"] = {"cpu": cpu_model(), "cores": os.cpu_count()}
    for part in args.parts:
        started = time.monotonic()
        if part == "redis":
            result = part_redis(args.seconds)
        elif part == "bodies":
            result = part_bodies()
        elif part == "fuzz":
            result = part_fuzz(args.fuzz_bodies)
        else:
            result = part_burst(args.burst)
        result["command"] = f"python benchmarks/reliability_iii.py --parts {part}"
        result["wall_seconds"] = round(time.monotonic() - started, 1)
        results[part] = result
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps({part: result.get("goals")}, indent=1), flush=True)


if __name__ == "__main__":
    main()
