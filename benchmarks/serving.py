"""Serving benchmarks (issue 4): the cost of cutting, early-exit efficiency, per-request overhead.

    python benchmarks/serving.py --bundle bundles/cifar10-resnet-large

The plain-endpoint baselines (one ONNX graph) are built from the bundle's own segments into
--monolithic when absent (benchmarks/monolithic.py), so a clean clone reruns the comparison.

Writes benchmarks/results/serving.json and prints Markdown tables for BENCHMARKS.md. Every
comparison is measured in the same run, variants interleaved in rounds so that noise from this
shared machine hits them alike; medians and p99 with counts. HTTP load comes from `wrk` (C, one
thread) so the client does not starve the server of the 2 cores; its CPU time is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from bench_support import cpu_model, free_port, wait_ready
from flops_spent import RouteFlops, graph_flops
from monolithic import ensure_baselines

from exitserve.calibration import Calibration
from exitserve.models.bundle import load_bundle
from exitserve.models.data import load_dataset
from exitserve.service.runners.onnx_runtime import OnnxRunner, RunnerOptions
from exitserve.service.serving.engine import ExitEngine
from exitserve.service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def stats(samples_s: list[float]) -> dict:
    a = np.asarray(samples_s) * 1000.0
    return {"n": int(a.size), "p50_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


# --- 1. the cost of cutting -----------------------------------------------------------------------


def _session(path: Path, options: RunnerOptions) -> ort.InferenceSession:
    from exitserve.service.runners.onnx_runtime import session_options

    return ort.InferenceSession(str(path), session_options(options), providers=["CPUExecutionProvider"])


def cost_of_cutting(bundle_dir: Path, mono_dir: Path, x: np.ndarray, rounds: int) -> dict:
    bundle = load_bundle(bundle_dir)
    configs = {
        "1 thread, no spinning": RunnerOptions(threads=1, spinning=False),
        "2 threads, no spinning": RunnerOptions(threads=2, spinning=False),
        "2 threads, spinning (ORT default)": RunnerOptions(threads=2, spinning=True),
    }
    out: dict = {}
    for config_name, options in configs.items():
        runner = OnnxRunner(bundle, options=options)
        all_exits = _session(mono_dir / "all-exits.onnx", options)
        last_exit = _session(mono_dir / "last-exit.onnx", options)

        def chain(batch: np.ndarray, runner: OnnxRunner = runner) -> None:
            state = runner.start(batch)
            for k in range(runner.num_exits):
                state, _ = runner.run_segment(k, state)

        def span(batch: np.ndarray, runner: OnnxRunner = runner) -> None:
            runner.run_span(0, runner.num_exits - 1, runner.start(batch))

        variants = {
            "chained segments (IOBinding)": chain,
            "fused span, no exit can fire (the server at full depth)": span,
            "monolithic, every exit": lambda b, s=all_exits: s.run(None, {"input": b}),
            "monolithic, last exit only": lambda b, s=last_exit: s.run(None, {"input": b}),
        }
        for batch_size, reps in ((1, 200), (32, 20)):
            batch = np.ascontiguousarray(x[:batch_size])
            times: dict[str, list[float]] = {name: [] for name in variants}
            for fn in variants.values():  # warm-up
                for _ in range(5):
                    fn(batch)
            for _ in range(rounds):
                for name, fn in variants.items():
                    for _ in range(reps):
                        t = time.perf_counter()
                        fn(batch)
                        times[name].append(time.perf_counter() - t)
            row = {name: stats(t) for name, t in times.items()}
            chained = row["chained segments (IOBinding)"]["p50_ms"]
            row["ratio chained / monolithic every exit"] = chained / row["monolithic, every exit"]["p50_ms"]
            row["ratio chained / monolithic last exit"] = chained / row["monolithic, last exit only"]["p50_ms"]
            row["ratio fused span / monolithic last exit"] = (row["fused span, no exit can fire (the server at full depth)"]["p50_ms"]
                                                              / row["monolithic, last exit only"]["p50_ms"])
            out.setdefault(config_name, {})[f"batch {batch_size}"] = row
    return out


# --- 2. early-exit efficiency where compute dominates ---------------------------------------------


def early_exit_efficiency(bundle_dir: Path, x: np.ndarray, deltas: list[float], rounds: int, threads: int) -> dict:
    bundle = load_bundle(bundle_dir)
    runner = OnnxRunner(bundle, options=RunnerOptions(threads=threads))
    engine = ExitEngine(runner, Calibration.from_dict(bundle.calibration, bundle.manifest.num_exits))
    fractions = np.asarray(bundle.manifest.compute_fractions())
    route = RouteFlops(bundle, engine.calibration)
    batches = [x[i : i + 64] for i in range(0, len(x) - 63, 64)]
    settings = [("full", 1.0)] + [("pcee-cond", d) for d in deltas]
    times: dict[str, list[float]] = {f"{p} δ={d}": [] for p, d in settings}
    compute: dict[str, list[float]] = {k: [] for k in times}
    flops: dict[str, list[float]] = {k: [] for k in times}
    for _ in range(rounds):
        for policy, delta in settings:
            key = f"{policy} δ={delta}"
            for batch in batches:
                t = time.perf_counter()
                result = engine.run(batch, np.full(len(batch), delta), np.full(len(batch), policy, dtype=object))
                times[key].append(time.perf_counter() - t)
                compute[key].append(float(fractions[result.exit_index].mean()))
                flops[key].append(route.mean(policy, delta, result.exit_index))
    full_p50 = np.median(times["full δ=1.0"])
    out = {}
    for key in times:
        p50 = float(np.median(times[key]))
        mean_fraction = float(np.mean(compute[key]))
        speedup = full_p50 / p50
        ideal = 1.0 / mean_fraction
        # Against the graphs really run: full depth is the fused span (no inner heads), early exit
        # pays the heads of the exits that can fire (flops_spent.py).
        flops_ideal = route.full_depth() / float(np.mean(flops[key]))
        out[key] = {**stats(times[key]), "images_per_s": 64 / p50, "mean_compute_fraction": mean_fraction,
                    "speedup_vs_full": speedup, "ideal_speedup": ideal, "share_of_ideal": speedup / ideal,
                    "mflops_per_image": float(np.mean(flops[key])) / 1e6, "flops_ideal_speedup": flops_ideal,
                    "share_of_flops_ideal": speedup / flops_ideal}
    return out


# --- 3. per-request overhead over HTTP ------------------------------------------------------------

WRK_SCRIPT = """
wrk.method = "POST"
-- BODY_FILE holds one or more bodies separated by SEPARATOR; requests cycle through them.
local f = io.open(os.getenv("BODY_FILE"), "rb"); local all = f:read("*a"); f:close()
local sep = os.getenv("SEPARATOR")
local bodies = {}
local start = 1
while true do
  local i, j = string.find(all, sep, start, true)
  if not i then table.insert(bodies, string.sub(all, start)); break end
  table.insert(bodies, string.sub(all, start, i - 1)); start = j + 1
end
for k, v in string.gmatch(os.getenv("HEADERS") or "", "([^=;]+)=([^;]+)") do wrk.headers[k] = v end
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, bodies[(n % #bodies) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "socket_errors": %d, "non_2xx": %d, "p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""
SEPARATOR = b"\n--exitserve-body--\n"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wrk(url: str, body: bytes | list[bytes], headers: dict[str, str], connections: int, seconds: int, workdir: Path) -> dict:
    body_file = workdir / "body.bin"
    body_file.write_bytes(SEPARATOR.join(body) if isinstance(body, list) else body)
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT)
    env = {**os.environ, "BODY_FILE": str(body_file), "SEPARATOR": SEPARATOR.decode(),
           "HEADERS": ";".join(f"{k}={v}" for k, v in headers.items())}
    started = time.perf_counter()
    cpu0 = os.times()
    proc = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "60s", "-s", str(script), url],
                          env=env, capture_output=True, text=True, check=True)
    cpu1 = os.times()
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("WRKJSON "))
    result = json.loads(line[len("WRKJSON "):])
    wall = time.perf_counter() - started
    result["req_per_s"] = result["requests"] / (result["duration_us"] / 1e6)
    result["client_cpu_share"] = ((cpu1.children_user + cpu1.children_system) - (cpu0.children_user + cpu0.children_system)) / wall
    return result


def http_overhead(bundle_dir: Path, mono_dir: Path, x: np.ndarray, seconds: int, threads: int) -> dict:
    import base64

    import tritonclient.http as triton

    name = load_bundle(bundle_dir).manifest.name
    one = np.ascontiguousarray(x[:1])
    inp = triton.InferInput("input", list(one.shape), "FP32")
    inp.set_data_from_numpy(one)
    v2_body, v2_json_len = triton.InferenceServerClient.generate_request_body(
        [inp], outputs=[triton.InferRequestedOutput("label"), triton.InferRequestedOutput("exit")], parameters={"policy": "full"})
    def raw64(policy: str, delta: float) -> bytes:
        batch = np.ascontiguousarray(x[:64])
        return json.dumps({"inputs": {"b64": base64.b64encode(batch.tobytes()).decode(), "dtype": "float32",
                                      "shape": list(batch.shape)}, "policy": policy, "delta": delta}).encode()

    bodies = {
        "exitserve v1 JSON": (f"/v1/models/{name}/predict", json.dumps({"inputs": one.tolist(), "policy": "full"}).encode(),
                              {"Content-Type": "application/json"}),
        "exitserve v1 raw (base64)": (f"/v1/models/{name}/predict", json.dumps({"inputs": {
            "b64": base64.b64encode(one.tobytes()).decode(), "dtype": "float32", "shape": list(one.shape)}, "policy": "full"}).encode(),
            {"Content-Type": "application/json"}),
        "exitserve v2 binary": (f"/v2/models/{name}/infer", v2_body, {"Inference-Header-Content-Length": str(v2_json_len)}),
        "exitserve v1 raw, 64 images, full depth": (f"/v1/models/{name}/predict", raw64("full", 1.0), {"Content-Type": "application/json"}),
        "exitserve v1 raw, 64 images, pcee-cond δ=0.85": (f"/v1/models/{name}/predict", raw64("pcee-cond", 0.85),
                                                          {"Content-Type": "application/json"}),
        "plain FastAPI JSON (pydantic body)": ("/predict_pydantic", json.dumps({"inputs": one.tolist()}).encode(),
                                               {"Content-Type": "application/json"}),
        "plain FastAPI JSON (orjson)": ("/predict", json.dumps({"inputs": one.tolist()}).encode(), {"Content-Type": "application/json"}),
        "plain FastAPI raw": ("/predict_raw", one.tobytes(), {"x-shape": ",".join(map(str, one.shape))}),
    }
    servers = {}
    env = {**os.environ, "EXITSERVE_THREADS": str(threads)}  # default settings otherwise, request logs included
    port = free_port()
    servers["exitserve"] = (subprocess.Popen([sys.executable, "-m", "exitserve.service.cli", "serve", str(bundle_dir), "--port", str(port)],
                                             env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port, "/readyz")
    port = free_port()
    servers["plain"] = (subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "plain_server.py"), str(mono_dir / "last-exit.onnx"),
                                          "--port", str(port), "--threads", str(threads)], cwd=REPO,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port, "/docs")
    out: dict = {}
    try:
        for _, port, ready in servers.values():
            wait_ready(f"http://127.0.0.1:{port}{ready}")
        with tempfile.TemporaryDirectory() as tmp:
            for connections in (1, 8):
                for variant, (path, body, headers) in bodies.items():
                    proc, port, _ = servers["exitserve" if variant.startswith("exitserve") else "plain"]
                    url = f"http://127.0.0.1:{port}{path}"
                    _wrk(url, body, headers, connections, 2, Path(tmp))  # warm-up
                    cpu_before = _cpu_seconds(proc.pid)
                    result = _wrk(url, body, headers, connections, seconds, Path(tmp))
                    cpu = _cpu_seconds(proc.pid) - cpu_before
                    result["p50_ms"] = result.pop("p50_us") / 1000
                    result["p99_ms"] = result.pop("p99_us") / 1000
                    result["server_cpu_ms_per_request"] = 1000 * cpu / max(result["requests"], 1)
                    out[f"{variant}, {connections} client(s)"] = result
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    return out


# --- 5. segment-level continuous batching against the simple loop (issue 16) -------------------------


def _occupancy_sums(port: int, name: str) -> tuple[float, float]:
    """(sum, count) of exitserve_segment_occupancy over every segment label, from /metrics."""
    import httpx

    total = count = 0.0
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith("exitserve_segment_occupancy_") and f'model="{name}"' in line:
            metric, value = line.rsplit(" ", 1)
            if metric.startswith("exitserve_segment_occupancy_sum"):
                total += float(value)
            elif metric.startswith("exitserve_segment_occupancy_count"):
                count += float(value)
    return total, count


CONTINUOUS_LOADS = ((1, 8), (1, 64), (64, 8))  # (images per request, clients)


def continuous(bundle_dir: Path, x: np.ndarray, seconds: int, threads: int, delta: float) -> dict:
    """Requests at δ under load: the simple loop against segment-level continuous batching, each its own
    server; throughput, latency, server CPU and segment occupancy (rows per segment run over the engine
    batch, from /metrics, over the measured run only)."""
    import base64

    name = load_bundle(bundle_dir).manifest.name

    def body(batch: np.ndarray) -> bytes:
        return json.dumps({"inputs": {"b64": base64.b64encode(np.ascontiguousarray(batch).tobytes()).decode(),
                                      "dtype": "float32", "shape": list(batch.shape)}, "delta": delta}).encode()

    headers = {"Content-Type": "application/json"}
    out: dict = {}
    for mode, flag in (("simple loop", "--no-continuous-batching"), ("continuous batching", "--continuous-batching")):
        port = free_port()
        proc = _start([sys.executable, "-m", "exitserve.service.cli", "serve", str(bundle_dir), "--port", str(port), flag],
                      {"EXITSERVE_THREADS": str(threads)})
        try:
            wait_ready(f"http://127.0.0.1:{port}/readyz")
            url = f"http://127.0.0.1:{port}/v1/models/{name}/predict"
            with tempfile.TemporaryDirectory() as tmp:
                for images, connections in CONTINUOUS_LOADS:
                    bodies = [body(x[i : i + images]) for i in range(0, min(len(x), 256 * images), images)][:256]
                    _wrk(url, bodies, headers, connections, 1, Path(tmp))  # warm-up
                    sum_before, count_before = _occupancy_sums(port, name)
                    cpu_before = _cpu_seconds_tree(proc.pid)
                    result = _wrk(url, bodies, headers, connections, seconds, Path(tmp))
                    cpu = _cpu_seconds_tree(proc.pid) - cpu_before
                    sum_after, count_after = _occupancy_sums(port, name)
                    result["p50_ms"] = result.pop("p50_us") / 1000
                    result["p99_ms"] = result.pop("p99_us") / 1000
                    result["images_per_s"] = result["req_per_s"] * images
                    result["server_cpu_ms_per_request"] = 1000 * cpu / max(result["requests"], 1)
                    result["occupancy"] = (sum_after - sum_before) / max(count_after - count_before, 1)
                    out[f"{images} image(s), {connections} clients, {mode}"] = result
        finally:
            _stop(proc)
    return out


def continuous_table(results: dict) -> list[str]:
    lines = ["**Segment-level continuous batching** (default policy; occupancy = mean rows per segment run over the "
             "engine batch of 64, during the run)", "",
             "| images/request | clients | mode | images/s | p50 ms | p99 ms | server CPU ms/request | occupancy "
             "| throughput vs simple loop |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = results["continuous"]
    for key, row in rows.items():
        images, clients, mode = key.split(", ", 2)
        simple = rows[f"{images}, {clients}, simple loop"]["images_per_s"]
        lines.append(f"| {images.split()[0]} | {clients.split()[0]} | {mode} | {row['images_per_s']:.0f} | {row['p50_ms']:.2f} "
                     f"| {row['p99_ms']:.2f} | {row['server_cpu_ms_per_request']:.2f} | {row['occupancy']:.2f} "
                     f"| {row['images_per_s'] / simple:.2f} |")
    return lines


# --- 4. exitserve against its peers at 1, 8 and 64 clients (issue 6, part 3) -----------------------

PEER_DELTAS = (0.99, 0.95, 0.90, 0.80)


def _start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    # A session of its own, so that stopping it takes its worker processes too (LitServe's outlive
    # a SIGTERM to their parent and keep polling, which skews every later measurement).
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is still there


def peers(bundle_dir: Path, mono_dir: Path, x: np.ndarray, seconds: int, threads: int, clients: tuple[int, ...]) -> dict:
    import base64

    import httpx

    bundle = load_bundle(bundle_dir)
    name = bundle.manifest.name
    route = RouteFlops(bundle, Calibration.from_dict(bundle.calibration, bundle.manifest.num_exits))
    default_policy = Settings().default_policy
    plain_mflops = graph_flops(mono_dir / "last-exit.onnx") / 1e6  # what the plain and LitServe servers run per image

    def raw_body(batch: np.ndarray, **extra: object) -> bytes:
        return json.dumps({"inputs": {"b64": base64.b64encode(batch.tobytes()).decode(), "dtype": "float32",
                                      "shape": list(batch.shape)}, **extra}).encode()

    commands = {
        "exitserve": lambda port: ([sys.executable, "-m", "exitserve.service.cli", "serve", str(bundle_dir), "--port", str(port)],
                                   {"EXITSERVE_THREADS": str(threads)}),
        "plain": lambda port: ([sys.executable, str(REPO / "benchmarks" / "plain_server.py"), str(mono_dir / "last-exit.onnx"),
                                "--port", str(port), "--threads", str(threads)], None),
        "litserve": lambda port: ([sys.executable, str(REPO / "benchmarks" / "litserve_server.py"), str(mono_dir / "last-exit.onnx"),
                                   "--port", str(port), "--threads", str(threads), "--max-batch-size", "64"], None),
    }
    ready = {"exitserve": "/readyz", "plain": "/docs", "litserve": "/health"}
    json_headers = {"Content-Type": "application/json"}
    out: dict = {}
    # One server alive at a time: LitServe's worker processes poll, and an idle peer must not eat the cores.
    for server, command in commands.items():
        port = free_port()
        cmd, env = command(port)
        proc = _start(cmd, env)
        try:
            wait_ready(f"http://127.0.0.1:{port}{ready[server]}")
            for images in (1, 64):
                # Different images per request (cycled by wrk), so exits and compute are those of real traffic.
                batches = [np.ascontiguousarray(x[i : i + images]) for i in range(0, min(len(x), 256 * images), images)][:256]
                variants: dict[str, tuple[str, list[bytes], dict]] = {}
                if server == "exitserve":
                    path = f"/v1/models/{name}/predict"
                    variants["exitserve full depth"] = (path, [raw_body(b, policy="full") for b in batches], json_headers)
                    routes = {"exitserve full depth": ("full", 1.0)}
                    for delta in PEER_DELTAS:
                        variants[f"exitserve δ={delta}"] = (path, [raw_body(b, delta=delta) for b in batches], json_headers)
                        routes[f"exitserve δ={delta}"] = (default_policy, delta)
                elif server == "plain":
                    variants["plain FastAPI (raw bytes)"] = ("/predict_raw", [b.tobytes() for b in batches],
                                                             {"x-shape": ",".join(map(str, batches[0].shape))})
                else:
                    variants["LitServe (max batch 64)"] = ("/predict", [raw_body(b) for b in batches], json_headers)
                with tempfile.TemporaryDirectory() as tmp:
                    for variant, (path, bodies, headers) in variants.items():
                        url = f"http://127.0.0.1:{port}{path}"
                        fraction = None
                        mflops = plain_mflops
                        if server == "exitserve":
                            answered = [httpx.post(url, content=body, headers=headers, timeout=60).json() for body in bodies]
                            fraction = float(np.mean([p["compute_fraction"] for a in answered for p in a["predictions"]]))
                            exits = np.array([p["exit"] for a in answered for p in a["predictions"]])
                            mflops = route.mean(*routes[variant], exits) / 1e6
                        for connections in clients:
                            _wrk(url, bodies, headers, connections, 1, Path(tmp))  # warm-up
                            cpu_before = _cpu_seconds_tree(proc.pid)
                            result = _wrk(url, bodies, headers, connections, seconds, Path(tmp))
                            cpu = _cpu_seconds_tree(proc.pid) - cpu_before
                            result["p50_ms"] = result.pop("p50_us") / 1000
                            result["p99_ms"] = result.pop("p99_us") / 1000
                            result["images_per_s"] = result["req_per_s"] * images
                            result["server_cpu_ms_per_request"] = 1000 * cpu / max(result["requests"], 1)
                            result["mean_compute_fraction"] = fraction
                            result["mflops_per_image"] = mflops
                            out[f"{images} image(s), {connections} client(s), {variant}"] = result
        finally:
            _stop(proc)
    return dict(sorted(out.items(), key=lambda kv: _peer_order(kv[0])))


def _peer_order(key: str) -> tuple[int, int, int]:
    images, clients, variant = (part.strip() for part in key.split(",", 2))
    rank = 0 if variant.startswith("exitserve full") else 1 if variant.startswith("exitserve") else 2 if variant.startswith("plain") else 3
    return int(images.split()[0]), int(clients.split()[0]), rank


def _cpu_seconds_tree(pid: int) -> float:
    """CPU seconds of a process and its children (LitServe runs its API server and worker as processes)."""
    total = _cpu_seconds(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else []:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a child that just exited
            total += _cpu_seconds_tree(int(child))
    return total


def peers_table(results: dict) -> list[str]:
    lines = ["", "**exitserve against its peers** (wrk, 1 thread; raw float32 tensors; exitserve's δ rows use the "
             "default policy; gain = exitserve images/s over the peer's, ideal = 1 / mean compute fraction, FLOPs ideal = "
             "the plain graph's FLOPs over those of the graphs exitserve ran, per image: benchmarks/flops_spent.py)", "",
             "| images/request | clients | variant | req/s | images/s | p50 ms | p99 ms | server CPU ms/request | errors | compute fraction "
             "| gain vs plain | gain vs LitServe | ideal | MFLOPs/image run | FLOPs ideal | gain / FLOPs ideal |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = results["peers"]
    for key, row in rows.items():
        images, clients, variant = (part.strip() for part in key.split(",", 2))
        plain = rows[f"{images}, {clients}, plain FastAPI (raw bytes)"]["images_per_s"]
        lit = rows[f"{images}, {clients}, LitServe (max batch 64)"]["images_per_s"]
        fraction = row["mean_compute_fraction"]
        is_exitserve = variant.startswith("exitserve")
        gains = (f"{row['images_per_s'] / plain:.2f} | {row['images_per_s'] / lit:.2f}" if is_exitserve and plain and lit else "– | –")
        lines.append(f"| {images.split()[0]} | {clients.split()[0]} | {variant} | {row['req_per_s']:.0f} | {row['images_per_s']:.0f} "
                     f"| {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['server_cpu_ms_per_request']:.2f} "
                     f"| {row['socket_errors'] + row['non_2xx']} | {'–' if fraction is None else f'{fraction:.3f}'} | {gains} | {'–' if not fraction else f'{1 / fraction:.2f}'} "
                     f"| {_flops_columns(row, rows[f'{images}, {clients}, plain FastAPI (raw bytes)'], plain if is_exitserve else None)} |")
    return lines


def _flops_columns(row: dict, plain_row: dict, plain_images_per_s: float | None) -> str:
    """MFLOPs per image run, the FLOPs-ideal gain over the plain endpoint, and the share of it reached."""
    mflops = row.get("mflops_per_image")
    if mflops is None:  # results written before the FLOPs were counted
        return "– | – | –"
    if plain_images_per_s is None or not plain_images_per_s or "mflops_per_image" not in plain_row:
        return f"{mflops:.1f} | – | –"
    ideal = plain_row["mflops_per_image"] / mflops
    return f"{mflops:.1f} | {ideal:.2f} | {row['images_per_s'] / plain_images_per_s / ideal:.2f}"


# --- report -----------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}. Command: `{results['command']}`", ""]
    if "cost_of_cutting" in results:
        lines += cutting_table(results)
    if "early_exit" in results:
        lines += early_table(results)
    if "http" in results:
        lines += http_table(results)
    if "peers" in results:
        lines += peers_table(results)
    if "continuous" in results:
        lines += ["", *continuous_table(results)]
    return "\n".join(lines)


def cutting_table(results: dict) -> list[str]:
    lines = ["**Cost of cutting** (p50 / p99 ms per batch; ratios of p50)", "",
              "| threads | batch | chained | fused span (full depth) | monolithic every exit | monolithic last exit "
              "| chained / every exit | chained / last exit | fused span / last exit |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    span_name = "fused span, no exit can fire (the server at full depth)"
    for config, batches in results["cost_of_cutting"].items():
        for batch, row in batches.items():
            c, f, a, last = (row[k] for k in ("chained segments (IOBinding)", span_name, "monolithic, every exit",
                                              "monolithic, last exit only"))
            lines.append(f"| {config} | {batch.split()[1]} | {c['p50_ms']:.3f} / {c['p99_ms']:.3f} | {f['p50_ms']:.3f} / {f['p99_ms']:.3f} "
                         f"| {a['p50_ms']:.3f} / {a['p99_ms']:.3f} "
                         f"| {last['p50_ms']:.3f} / {last['p99_ms']:.3f} | {row['ratio chained / monolithic every exit']:.3f} "
                         f"| {row['ratio chained / monolithic last exit']:.3f} | {row['ratio fused span / monolithic last exit']:.3f} |")
    return lines


def early_table(results: dict) -> list[str]:
    lines = ["", "**Early exit with 64-image batches** (in-process engine, pcee-cond)", "",
              "| setting | p50 ms | p99 ms | images/s | mean compute fraction | speedup vs full | ideal (1/fraction) | share of ideal "
              "| MFLOPs/image run | FLOPs ideal | share of FLOPs ideal |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, row in results["early_exit"].items():
        lines.append(f"| {key} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['images_per_s']:.0f} | {row['mean_compute_fraction']:.3f} "
                     f"| {row['speedup_vs_full']:.2f} | {row['ideal_speedup']:.2f} | {row['share_of_ideal']:.2f} "
                     f"| {row['mflops_per_image']:.1f} | {row['flops_ideal_speedup']:.2f} | {row['share_of_flops_ideal']:.2f} |")
    return lines


def http_table(results: dict) -> list[str]:
    lines = ["", "**Requests over HTTP** (wrk, 1 thread; single images with exitserve at full depth unless the row says otherwise)", "",
             "| variant | req/s | p50 ms | p99 ms | server CPU ms/request | client CPU share | errors |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, row in results["http"].items():
        lines.append(f"| {key} | {row['req_per_s']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
                     f"{row['server_cpu_ms_per_request']:.2f} | {row['client_cpu_share']:.2f} | {row['socket_errors'] + row['non_2xx']} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", default=str(REPO / "bundles" / "cifar10-resnet-large"))
    parser.add_argument("--monolithic", default=str(REPO / "runs" / "monolithic"))
    parser.add_argument("--data", default="cifar10:test")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--deltas", default="0.8,0.85,0.9")
    parser.add_argument("--http-seconds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for every variant")
    parser.add_argument("--parts", default="cutting,early,http",
                        help="comma-separated: cutting, early, http, peers, continuous")
    parser.add_argument("--continuous-delta", type=float, default=0.9)
    parser.add_argument("--clients", default="1,8,64", help="peers: concurrent clients")
    parser.add_argument("--out", default=str(RESULTS / "serving.json"))
    args = parser.parse_args()
    data = load_dataset(args.data)
    x = data.x[:1024]
    ensure_baselines(Path(args.bundle), Path(args.monolithic))
    parts = set(args.parts.split(","))
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_model()}, onnxruntime {ort.__version__}",
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
    }
    if "cutting" in parts:
        results["cost_of_cutting"] = cost_of_cutting(Path(args.bundle), Path(args.monolithic), x, args.rounds)
    if "early" in parts:
        results["early_exit"] = early_exit_efficiency(Path(args.bundle), x, [float(d) for d in args.deltas.split(",")], args.rounds, args.threads)
    if "http" in parts:
        if shutil.which("wrk") is None:
            raise SystemExit("wrk is needed for the HTTP part (apt-get install wrk), or pass --skip-http")
        results["http"] = http_overhead(Path(args.bundle), Path(args.monolithic), x, args.http_seconds, args.threads)
    if "peers" in parts:
        results["peers"] = peers(Path(args.bundle), Path(args.monolithic), x, args.http_seconds, args.threads,
                                 tuple(int(c) for c in args.clients.split(",")))
    if "continuous" in parts:
        results["continuous"] = continuous(Path(args.bundle), x, args.http_seconds, args.threads, args.continuous_delta)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(markdown(results))


if __name__ == "__main__":
    main()
