"""Train the headline's models (issue 17) in parallel processes: each (model, recipe) pair, same epochs.

    python benchmarks/train_headline.py --device cuda --epochs 41 --runs resnet-small:ge,resnet-deep-late:ge --out runs/headline
    python benchmarks/train_headline.py --device cuda --models resnet-small,resnet-deep --recipes plain,sd-ge,sd-mixed --out DIR

Each run is one process running `models.recipes.run_training`, the code behind `exitserve train
--arch A --recipe R --epochs E --batch-size 512 --lr 0.4 --bf16`, so a run can be repeated (and
resumed: DIR/A-R/resume.pt) with that command. On a GPU these small networks are launch-bound, so
several processes share it well (BENCHMARKS.md §4.1: 4 runs at once took 1.7-2.7 s per epoch).
Without --epochs, E is the largest count that fits --budget seconds if the runs went one after
another, from a timing probe of each model's training step. At --deadline seconds, runs still going
are stopped; their resume.pt holds the last finished epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("resnet-small", "resnet-deep")
BATCH, LR = 512, 0.4
TRAIN_SIZE = 45_000  # CIFAR-10 training images less the 5,000 held out for calibration


def probe_step_seconds(arch: str, device: str, steps: int = 20) -> float:
    """Seconds per training step (batch BATCH, bf16, self-distillation + GE: the dearest recipe)."""
    import torch

    from exitserve.models.architectures import build_architecture
    from exitserve.models.exit_training import (
        forward_with_equilibrium,
        random_crop_flip,
        self_distilled_losses,
    )

    torch.backends.cudnn.benchmark = True
    net = build_architecture(arch, 10).to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x_all = torch.rand(BATCH * 2, 3, 32, 32, device=device)
    y_all = torch.randint(0, 10, (BATCH * 2,), device=device)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randperm(BATCH * 2, device=device)[:BATCH]
        x = random_crop_flip(x_all[idx], gen).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            logits = forward_with_equilibrium(net, x)
            loss = self_distilled_losses(logits, y_all[idx], [1.0] * len(logits), 0.5, 3.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def run_one(arch: str, recipe: str, epochs: int, device: str, out: Path, threads: int, limit: int | None, seed: int) -> None:
    import torch

    from exitserve.models.recipes import apply_recipe, run_training
    from exitserve.models.training import TrainConfig

    if threads:
        torch.set_num_threads(threads)
    config = apply_recipe(TrainConfig(epochs=epochs, batch_size=BATCH, lr=LR, bf16=True, device=device, seed=seed), recipe)
    run_training(arch, "cifar10", out, config, train_limit=limit, progress=False, log=lambda m: print(m, flush=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--recipes", default="plain,sd-ge,sd-mixed")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runs", help="ARCH:RECIPE,... instead of every model under every recipe")
    parser.add_argument("--epochs", type=int, help="fixed epoch count (default: fit --budget)")
    parser.add_argument("--budget", type=float, default=390.0, help="seconds of training, counted as if serial")
    parser.add_argument("--max-epochs", type=int, default=60)
    parser.add_argument("--deadline", type=float, default=470.0, help="stop runs still going after this many seconds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run process (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (runs are named ...-s<seed> when not 0)")
    parser.add_argument("--train-limit", type=int, help="first N training images only (a quick check)")
    parser.add_argument("--serial", action="store_true",
                        help="one run after another (a CPU: parallel runs would only share its cores)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--one", nargs=2, metavar=("ARCH", "RECIPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one[0], args.one[1], args.epochs, args.device, args.out, args.threads, args.train_limit, args.seed)
        return

    started = time.perf_counter()
    from exitserve.models.data import load_cifar10_arrays

    load_cifar10_arrays()  # decode once into the cache before the runs start reading it
    print(f"data ready in {time.perf_counter() - started:.0f} s", flush=True)
    models, recipes = args.models.split(","), args.recipes.split(",")
    pairs = [tuple(r.split(":")) for r in args.runs.split(",")] if args.runs else [(a, r) for r in recipes for a in models]
    steps_per_epoch = math.ceil(TRAIN_SIZE / BATCH)
    probe: dict[str, float] = {}
    epochs = args.epochs
    if not epochs:
        probe = {arch: probe_step_seconds(arch, args.device) for arch in {a for a, _ in pairs}}
        serial_epoch = 1.1 * steps_per_epoch * sum(probe[a] for a, _ in pairs)  # +10 % for validation
        epochs = max(1, min(args.max_epochs, int(args.budget // serial_epoch)))
        print(f"probe: seconds per step {json.dumps({k: round(v, 4) for k, v in probe.items()})}; "
              f"serial epoch of all runs {serial_epoch:.1f} s -> {epochs} epochs", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for arch, recipe in pairs:
        name = f"{arch}-{recipe}" + (f"-s{args.seed}" if args.seed else "")
        cmd = [sys.executable, __file__, "--one", arch, recipe, "--epochs", str(epochs), "--device", args.device,
               "--threads", str(args.threads), "--seed", str(args.seed), "--out", str(args.out / name)]
        if args.train_limit:
            cmd += ["--train-limit", str(args.train_limit)]
        log = (args.out / f"{name}.log").open("w")
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        if args.serial:
            procs[name].wait()
    while any(p.poll() is None for p in procs.values()):
        if time.perf_counter() - started > args.deadline:
            for name, p in procs.items():
                if p.poll() is None:
                    print(f"deadline: stopping {name}", flush=True)
                    p.terminate()
            break
        time.sleep(2)
    for p in procs.values():
        p.wait()
    summary = {"epochs": epochs, "batch_size": BATCH, "lr": LR, "device": args.device, "probe_step_seconds": probe,
               "steps_per_epoch": steps_per_epoch, "wall_seconds": time.perf_counter() - started, "runs": {}}
    for name, p in procs.items():
        run_dir = args.out / name
        history = json.loads((run_dir / "history.json").read_text()) if (run_dir / "history.json").is_file() else None
        summary["runs"][name] = {
            "returncode": p.returncode, "finished": (run_dir / "checkpoint.pt").is_file(),
            "epoch_seconds": [e["seconds"] for e in history["epochs"]] if history else None,
            "final_val_accuracy": history["epochs"][-1]["val_accuracy"] if history else None,
        }
        print(f"{name}: rc {p.returncode}, final val acc "
              f"{summary['runs'][name]['final_val_accuracy']}", flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"done in {summary['wall_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
