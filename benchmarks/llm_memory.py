"""Resident memory of a generation bundle served with and without fused segments, per weight precision.

    python benchmarks/llm_memory.py runs/bundles/smollm2-deff

Each configuration loads in a fresh process (the same `GenerationModel` the server builds), decodes
8 tokens of one sequence, and reports its resident set size then (`/proc/self/statm`) and its peak.
Fused segments hold a second copy of the layer weights: ONNX Runtime prepacks each session's own.

Writes benchmarks/results/llm-memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from llm import RESULTS

CONFIGS = [("float32", False, True), ("float32", False, False), ("int4", True, True), ("int4", True, False)]


def measure(bundle: str, precision: str, int8_activations: bool, fused: bool) -> dict:
    import torch
    from prometheus_client import CollectorRegistry

    from exitserve.models.bundle import load_bundle
    from exitserve.service.serving.generation.model import GenerationModel

    torch.set_num_threads(1)
    gm = GenerationModel(load_bundle(bundle), CollectorRegistry(), precision=precision, threads=1,
                         int8_activations=int8_activations, fuse_segments=fused)
    seq = gm.decoder.new_sequence(gm.encode("Hello there, how"), capacity=64, mode="full")
    for _ in range(8):
        gm.decoder.step([seq])
    resident = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"precision": precision, "int8_activations": int8_activations, "fused_segments": fused,
            "rss_mib": resident / 2**20, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # precision,int8act,fused: one measurement, in this process
    parser.add_argument("--out", default=str(RESULTS / "llm-memory.json"))
    args = parser.parse_args()
    if args.one:
        precision, int8act, fused = args.one.split(",")
        print(json.dumps(measure(args.bundle, precision, int8act == "1", fused == "1")))
        return
    rows = []
    for precision, int8act, fused in CONFIGS:
        done = subprocess.run([sys.executable, __file__, args.bundle, "--one", f"{precision},{int(int8act)},{int(fused)}"],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    Path(args.out).write_text(json.dumps({"bundle": args.bundle, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
