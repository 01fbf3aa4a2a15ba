"""Server CPU per single-image request, in process: exitserve's ASGI app against the plain endpoint's.

    python benchmarks/request_cpu.py --requests 2000 --rounds 2

No sockets and no HTTP parsing: each request is handed straight to the ASGI app (the same app
`exitserve serve` runs, engine thread included) and the process's CPU time is read around a run of
requests, so what is left is what each server does per request. exitserve gets a v1 request with
a base64 float32 tensor in JSON (`--protocol v1`, the default) or an Open Inference Protocol request
with the tensor as raw bytes after its JSON header (`--protocol v2-binary`, what tritonclient sends);
the plain endpoint (`plain_server.py`) its raw-bytes route. Rounds alternate exitserve and the plain
endpoint; the event loop's and the engine thread's own CPU are reported too. Also the model alone: the bundle's fused full-depth span graph and the plain endpoint's
monolithic graph, called directly and alternately, so the difference between the servers can be
split into the model and everything around it. Default bundle, full depth, 1 ONNX Runtime thread.
Writes benchmarks/results/request-cpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
from monolithic import ensure_baselines
from plain_server import create_app as plain_app

from exitserve.models.bundle import load_bundle
from exitserve.service.app import create_app
from exitserve.service.logs import configure_logging
from exitserve.service.runners.onnx_runtime import OnnxRunner, RunnerOptions
from exitserve.service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


async def call(app, path: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """One POST through the ASGI app; `headers` may name the content type (JSON otherwise)."""
    sent = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)  # the disconnect watch waits here; it is cancelled after the answer

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1234),
             "headers": [*([] if any(k == b"content-type" for k, _ in headers) else [(b"content-type", b"application/json")]),
                         (b"content-length", str(len(body)).encode()), *headers]}
    await app(scope, receive, send)
    if sent[0]["status"] != 200:
        raise RuntimeError(f"{path}: {sent}")


async def cpu_per_request(app, path: str, body: bytes, headers: list[tuple[bytes, bytes]], n: int,
                          engine_clock: int | None = None) -> dict:
    """Process CPU per request; also the event loop's (this thread) and, given its clock, the engine thread's."""
    for _ in range(200):
        await call(app, path, body, headers)
    engine = time.clock_gettime(engine_clock) if engine_clock is not None else 0.0
    cpu, loop, wall = time.process_time(), time.thread_time(), time.perf_counter()
    for _ in range(n):
        await call(app, path, body, headers)
    out = {"cpu_us": (time.process_time() - cpu) / n * 1e6, "loop_cpu_us": (time.thread_time() - loop) / n * 1e6,
           "wall_us": (time.perf_counter() - wall) / n * 1e6}
    if engine_clock is not None:
        out["engine_cpu_us"] = (time.clock_gettime(engine_clock) - engine) / n * 1e6
    return out


def exitserve_request(protocol: str, name: str, x: np.ndarray, input_name: str) -> tuple[str, bytes, list]:
    """(path, body, extra headers) of one single-image request, policy full."""
    shape = list(x.shape)
    if protocol == "v1":
        body = orjson.dumps({"inputs": {"b64": base64.b64encode(x.tobytes()).decode(), "dtype": "float32", "shape": shape},
                             "policy": "full"})
        return f"/v1/models/{name}/predict", body, []
    head = orjson.dumps({"inputs": [{"name": input_name, "shape": shape, "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "label"}, {"name": "exit"}], "parameters": {"policy": "full"}})
    return (f"/v2/models/{name}/infer", head + x.tobytes(),
            [(b"inference-header-content-length", str(len(head)).encode())])


def model_alone(bundle_dir: Path, plain_graph: Path, x: np.ndarray, calls: int, rounds: int) -> dict:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    plain = ort.InferenceSession(str(plain_graph), options, providers=["CPUExecutionProvider"])
    output = plain.get_outputs()[-1].name
    runner = OnnxRunner(load_bundle(bundle_dir), options=RunnerOptions(threads=1))
    last = runner.num_exits - 1
    paths = {"exitserve span graph": lambda: runner.run_span(0, last, runner.start(x))[1],
             "plain monolithic graph": lambda: plain.run([output], {"input": x})[0]}
    assert np.abs(paths["exitserve span graph"]() - paths["plain monolithic graph"]()).max() < 1e-3
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            for _ in range(50):
                fn()
            start = time.thread_time()
            for _ in range(calls):
                fn()
            samples[name].append((time.thread_time() - start) / calls * 1e6)
    return {name: float(np.median(s)) for name, s in samples.items()}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "cifar10-resnet-large")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--protocol", choices=["v1", "v2-binary"], default="v1",
                        help="v1: base64 tensor in JSON; v2-binary: Open Inference Protocol, raw tensor bytes")
    parser.add_argument("--out", type=Path, default=RESULTS / "request-cpu.json")
    args = parser.parse_args()
    configure_logging("info")  # as served: one request log line each, to a file below
    import logging
    import tempfile

    log_file = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)  # noqa: SIM115 - lives for the run
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(log_file)

    bundle = load_bundle(args.bundle)
    shape = [1, *(d if d > 0 else 1 for d in bundle.manifest.input.shape[1:])]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    plain_graph = ensure_baselines(args.bundle, ROOT / "runs" / "monolithic") / "last-exit.onnx"
    app = create_app(Settings(bundles=[args.bundle], threads=1))
    name = bundle.manifest.name
    rows = []
    async with app.router.lifespan_context(app):
        while not app.state.repository.models[name].ready:
            await asyncio.sleep(0.1)
        plain = plain_app(str(plain_graph), 1)
        raw_headers = [(b"x-shape", ",".join(map(str, shape)).encode())]
        path, body, headers = exitserve_request(args.protocol, name, x, bundle.manifest.input.name)
        if args.protocol == "v2-binary":
            headers.insert(0, (b"content-type", b"application/octet-stream"))
        engine_clock = time.pthread_getcpuclockid(app.state.repository.models[name].batcher._threads[0].ident)
        for _ in range(args.rounds):
            ours = await cpu_per_request(app, path, body, headers, args.requests, engine_clock)
            theirs = await cpu_per_request(plain, "/predict_raw", x.tobytes(), raw_headers, args.requests)
            rows.append({"exitserve": ours, "plain": theirs, "cpu_ratio": ours["cpu_us"] / theirs["cpu_us"]})
            print(f"exitserve {ours['cpu_us']:.0f} µs CPU per request (event loop {ours['loop_cpu_us']:.0f}, engine "
                  f"thread {ours['engine_cpu_us']:.0f}), plain {theirs['cpu_us']:.0f} µs: {rows[-1]['cpu_ratio']:.2f}×",
                  flush=True)
    alone = model_alone(args.bundle, plain_graph, x, 1000, 3)
    print("the model alone (µs of CPU per call): " + ", ".join(f"{k} {v:.0f}" for k, v in alone.items()))
    ratios = [row["cpu_ratio"] for row in rows]
    print(f"median ratio {float(np.median(ratios)):.2f}× over {len(rows)} rounds ({args.protocol})")
    result = {"bundle": name, "protocol": args.protocol, "requests": args.requests, "rounds": rows,
              "median_cpu_ratio": float(np.median(ratios)), "model_alone_cpu_us": alone,
              "onnxruntime_version": ort.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    import uvloop  # the loop `exitserve serve` runs on

    uvloop.run(main())
