"""Issue 17: what the exit heads cost the headline, with FLOPs as the server runs them.

    python benchmarks/exit_heads.py      # about 1 min: bundles/cifar10-resnet-deep-late, features cached under runs/cache

The deep-late bundle's inner heads are a 3×3 conv, ReLU, global pool and linear layer (1.2 MFLOPs
each after the early stages, 4.7 after the last stage's blocks); its last head is pool + linear
(0.01 MFLOPs). A sample pays the head of every exit that can fire on its way, so heads are part of
the cost the headline compares. This keeps the bundle's backbone frozen, fits pool + linear heads
on its hidden states (cifar10:train, multinomial logistic regression), and compares test error
against FLOPs as served (flops_spent.py: body FLOPs plus the heads of exits that can fire at δ) for
three head sets: the bundle's conv heads, linear heads at every inner exit, and conv heads on the
first three exits with linear heads after. The small model's reference (its plain cost and error)
is read from `--reference`, the committed headline result of the 120-epoch pair (BENCHMARKS.md §4.1a).
Writes benchmarks/results/exit-heads.json.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flops_spent import RouteFlops
from headline import error_at
from logits_cache import DEFAULT_CACHE

from exitserve.calibration import Calibration, decide_all, fit_calibration
from exitserve.calibration.evaluation import DEFAULT_EVAL_DELTAS
from exitserve.models.bundle import Bundle, load_bundle
from exitserve.models.data import load_dataset
from exitserve.service.runners.onnx_runtime import OnnxRunner, RunnerOptions

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
POLICIES = ("pcee", "pcee-lb-cond", "confidence")
SPLITS = ("train", "val", "test")


def hidden_features(bundle: Bundle, cache: Path) -> dict[str, np.ndarray]:
    """Per split: each inner exit's hidden state, globally average-pooled, and every exit's own logits."""
    path = cache / f"exit-heads-{bundle.manifest.name}.npz"
    if path.exists():
        return dict(np.load(path))
    runner = OnnxRunner(bundle, options=RunnerOptions(threads=2))
    exits = bundle.manifest.num_exits
    out: dict[str, np.ndarray] = {}
    for split in SPLITS:
        data = load_dataset(f"cifar10:{split}")
        pooled: list[list[np.ndarray]] = [[] for _ in range(exits - 1)]
        logits: list[list[np.ndarray]] = [[] for _ in range(exits)]
        for lo in range(0, len(data.x), 250):
            state = runner.start(data.x[lo : lo + 250])
            for k in range(exits):
                state, exit_logits = runner.run_segment(k, state)
                logits[k].append(exit_logits)
                if k < exits - 1:
                    pooled[k].append(next(iter(state.values())).numpy().mean(axis=(2, 3)))
        out |= {f"{split}_pooled{k}": np.concatenate(p) for k, p in enumerate(pooled)}
        out |= {f"{split}_logits{k}": np.concatenate(z) for k, z in enumerate(logits)}
        out[f"{split}_labels"] = data.y
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def fit_linear_head(x: np.ndarray, y: np.ndarray, classes: int, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """Multinomial logistic regression on standardised pooled features (full-batch L-BFGS, small L2)."""
    torch.manual_seed(seed)
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    features = torch.tensor((x - mean) / scale, dtype=torch.float32)
    targets = torch.tensor(y)
    layer = torch.nn.Linear(features.shape[1], classes)
    optimiser = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=200, history_size=20, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        value = torch.nn.functional.cross_entropy(layer(features), targets) + 1e-4 * (layer.weight**2).sum()
        value.backward()
        return value

    optimiser.step(loss)

    def apply(z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return layer(torch.tensor((z - mean) / scale, dtype=torch.float32)).numpy()

    return apply


def curve(logits: dict[str, list[np.ndarray]], labels: dict[str, np.ndarray], body: list[int], heads: list[int],
          policy: str) -> list[dict]:
    """Calibrated on val, decided on test over δ: error and mean MFLOPs as served (heads of firing exits only)."""
    calibration = fit_calibration(logits["val"], labels["val"])
    rows = []
    for delta in DEFAULT_EVAL_DELTAS:
        decisions = decide_all(calibration, policy, logits["test"], float(delta))
        fires = calibration.firing_exits(policy, float(delta))
        cost = np.cumsum([b + (h if fire else 0) for b, h, fire in zip(body, heads, fires, strict=True)])
        rows.append({"delta": float(delta), "mflops": float(cost[decisions.exit_index].mean()) / 1e6,
                     "error": float((decisions.prediction != labels["test"]).mean())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "cifar10-resnet-deep-late")
    parser.add_argument("--reference", type=Path, default=RESULTS / "headline-e120-ge.json",
                        help="headline.py result whose small model is the reference (plain cost and error)")
    parser.add_argument("--conv-exits", type=int, default=3, help="the mixed set keeps conv heads on this many first exits")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=RESULTS / "exit-heads.json")
    args = parser.parse_args()
    reference = json.loads(args.reference.read_text())["models"]["small"]
    small_mflops, small_error = reference["full_mflops_run"], reference["exits"][-1]["error"]

    bundle = load_bundle(args.bundle, require_calibration=True)
    exits, classes = bundle.manifest.num_exits, len(bundle.manifest.labels)
    data = hidden_features(bundle, args.cache)
    labels = {s: data[f"{s}_labels"] for s in SPLITS}
    linear = [fit_linear_head(data[f"train_pooled{k}"], labels["train"], classes) for k in range(exits - 1)]
    route = RouteFlops(bundle, Calibration.from_dict(bundle.calibration, exits))
    body, conv_heads = route.bodies(), route.heads()
    linear_heads = [2 * data[f"train_pooled{k}"].shape[1] * classes for k in range(exits - 1)] + [0]

    def head_set(linear_from: int) -> dict[str, list[np.ndarray]]:
        return {s: [data[f"{s}_logits{k}"] if k < linear_from or k == exits - 1 else linear[k](data[f"{s}_pooled{k}"])
                    for k in range(exits)] for s in ("val", "test")}

    sets = {
        "conv heads (the bundle's)": (head_set(exits), conv_heads),
        "linear heads at every exit": (head_set(0), linear_heads),
        f"conv heads on exits 0-{args.conv_exits - 1}, linear after": (
            head_set(args.conv_exits), conv_heads[: args.conv_exits] + linear_heads[args.conv_exits :]),
    }
    result: dict = {"command": "python benchmarks/exit_heads.py", "bundle": bundle.manifest.name,
                    "reference": {"file": str(args.reference.relative_to(REPO)), "small_plain_mflops": small_mflops,
                                  "small_error": small_error},
                    "conv_head_mflops": [h / 1e6 for h in conv_heads[:-1]], "sets": {}}
    print(f"small model (reference): {small_error:.2%} at {small_mflops:.1f} MFLOPs; conv heads "
          f"{', '.join(f'{h / 1e6:.2f}' for h in conv_heads[:-1])} MFLOPs")
    print("| heads | test accuracy per exit (%) | policy | error at the small model's cost | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for name, (logits, heads) in sets.items():
        accuracy = [float((z.argmax(axis=1) == labels["test"]).mean()) for z in logits["test"]]
        entry: dict = {"test_accuracy": accuracy, "head_mflops": [h / 1e6 for h in heads[:-1]], "policies": {}}
        for policy in POLICIES:
            rows = curve(logits, labels, body, heads, policy)
            error = error_at(rows, small_mflops)
            ratio = None if error is None else error / small_error
            entry["policies"][policy] = {"rows": rows, "error_at_small_cost": error, "ratio": ratio}
            print(f"| {name} | {' / '.join(f'{100 * a:.1f}' for a in accuracy)} | {policy} | "
                  f"{'out of reach' if error is None else f'{100 * error:.2f} %'} | {'–' if ratio is None else f'{ratio:.3f}'} |")
        result["sets"][name] = entry
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
