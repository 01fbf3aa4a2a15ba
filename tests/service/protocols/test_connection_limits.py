"""Hostile sizes and idle connections against a real server: huge or numerous headers are refused
with 431 before the parser pays for them, connections that never send a byte are closed, a
40 MiB text is refused before it is tokenised, and /healthz keeps answering meanwhile."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import httpx
from conftest import running_server
from reliability_support import percentiles

HEADER_TIMEOUT = 2.0


def _healthz_latencies(url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            started = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            out.append(time.perf_counter() - started)
            time.sleep(0.02)


def _raw(port: int, head: bytes, timeout: float = 30.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):  # closed by the server mid-send: read its answer
            s.sendall(head)
        try:
            return s.recv(65536)
        except OSError:
            return b""


def test_huge_and_numerous_headers_are_431_and_idle_connections_close(digits_bundle: Path) -> None:
    with running_server([digits_bundle], env={"EXITSERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT)}) as server:
        stop, latencies = threading.Event(), []
        prober = threading.Thread(target=_healthz_latencies, args=(server.url, stop, latencies))
        prober.start()
        try:
            time.sleep(0.2)
            big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 << 20) + b"\r\n\r\n"
            many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(5000)) + b"\r\n"
            started = time.perf_counter()
            answers = [_raw(server.port, big), _raw(server.port, many)]
            refused_in = time.perf_counter() - started
            # Under the limits: still served.
            fine = _raw(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Ok: 1\r\n" * 50 + b"\r\n")
            # A connection that never sends a byte, and one that stops half way through its headers.
            idle = socket.create_connection(("127.0.0.1", server.port), timeout=HEADER_TIMEOUT + 10)
            partial = socket.create_connection(("127.0.0.1", server.port), timeout=HEADER_TIMEOUT + 10)
            partial.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            opened = time.perf_counter()
            closed = [idle.recv(1), partial.recv(1)]  # b"" once the server closes them
            held = time.perf_counter() - opened
            idle.close()
            partial.close()
        finally:
            stop.set()
            prober.join()
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
    assert fine.startswith(b"HTTP/1.1 200"), fine[:100]
    assert closed == [b"", b""] and held < HEADER_TIMEOUT + 5
    summary = percentiles(latencies)
    print(f"\nheaders: 8 MiB header and 5,000 headers refused with 431 in {refused_in * 1000:.0f} ms; idle connections "
          f"closed after {held:.1f} s (header timeout {HEADER_TIMEOUT:g} s); /healthz meanwhile {summary}")
    assert summary["max_ms"] < 1000


def test_a_huge_text_is_refused_before_tokenising(text_bundle: Path) -> None:
    """40 MiB of text: 413 as it arrives (a text model's body limit is sized by what its inputs can
    hold); 800 kB in one sample: 400 before the tokenizer sees it; /healthz unaffected by either."""
    # Bodies built before the prober starts: making 40 MiB of JSON holds this process's GIL, and the
    # prober (a thread here) would time our own stall instead of the server's.
    bodies = [json.dumps({"texts": ["good movie " * repeat]}).encode() for repeat in (4 << 20, 80_000)]
    with running_server([text_bundle]) as server:
        stop, latencies = threading.Event(), []
        prober = threading.Thread(target=_healthz_latencies, args=(server.url, stop, latencies))
        prober.start()
        try:
            time.sleep(0.2)
            outcomes = []
            for body in bodies:
                started = time.perf_counter()
                try:
                    r = httpx.post(f"{server.url}/v1/models/sst2-tiny/predict", content=body,
                                   headers={"Content-Type": "application/json"}, timeout=60)
                    outcomes.append((r.status_code, r.json()["error"], time.perf_counter() - started))
                except httpx.TransportError:  # answered 413 and closed while the body was still going out
                    outcomes.append((413, "body exceeds the limit", time.perf_counter() - started))
            time.sleep(0.2)
        finally:
            stop.set()
            prober.join()
        ok = httpx.post(f"{server.url}/v1/models/sst2-tiny/predict", json={"texts": ["a fine film"]}, timeout=30)
    (huge, huge_error, huge_s), (long, long_error, long_s) = outcomes
    assert huge == 413 and "exceeds the limit" in huge_error, huge_error
    assert long == 400 and "characters cannot fit" in long_error, long_error
    assert ok.status_code == 200
    summary = percentiles(latencies)
    print(f"\n40 MiB text refused (413) in {huge_s * 1000:.0f} ms, 860 kB text (400) in {long_s * 1000:.0f} ms; "
          f"/healthz meanwhile {summary}")
    assert summary["max_ms"] < 1000
