"""Serve your own model, end to end, in under a minute on a laptop CPU:

1. your data as .npz files (here sklearn's 8x8 digits: train / held-out validation / test);
2. your network, trained your way (a plain PyTorch loop);
3. exits attached after chosen layers (`exitserve.models.wrap.attach_exits`);
4. exit heads trained self-supervised: backbone frozen, heads learn the final exit's own predictions;
5. `exitserve export --model my_network:build_model` (a verified bundle of ONNX graphs);
6. `exitserve calibrate` on your held-out .npz, `exitserve evaluate` on your test .npz;
7. `exitserve serve` and a query.

Run from anywhere: python examples/own_model/run_example.py [--out DIR]  (needs the `train` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import torch.nn.functional as F
from my_network import CLASSES, build_backbone, wrap
from sklearn.datasets import load_digits

from exitserve.models.wrap import train_exits

HERE = Path(__file__).resolve().parent


def exitserve(*args: str, env: dict[str, str] | None = None) -> None:
    """Run an `exitserve` command as you would type it (from this folder, so my_network imports)."""
    print(f"\n$ exitserve {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "exitserve.service.cli", *args], cwd=HERE, check=True,
                   env={**os.environ, **(env or {})})


def make_data(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Digits as float32 [N, 1, 8, 8] in [0, 1]; 60 / 20 / 20 split; each part saved as x, y in an .npz."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    cuts = {"train": order[: int(0.6 * len(y))], "val": order[int(0.6 * len(y)) : int(0.8 * len(y))],
            "test": order[int(0.8 * len(y)) :]}
    parts = {}
    for name, idx in cuts.items():
        np.savez(out / f"{name}.npz", x=x[idx], y=y[idx])
        parts[name] = (x[idx], y[idx])
    return parts


def train_backbone(x: np.ndarray, y: np.ndarray, epochs: int = 12) -> torch.nn.Sequential:
    """Your own training, nothing exitserve-specific."""
    torch.manual_seed(0)
    net = build_backbone()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(xt)).split(64):
            loss = F.cross_entropy(net(xt[idx]), yt[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_query(bundle: Path, x: np.ndarray, y: np.ndarray) -> dict:
    port = free_port()
    print(f"\n$ exitserve serve {bundle} --port {port}", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "exitserve.service.cli", "serve", str(bundle), "--port", str(port),
                               "--log-level", "warning"],
                              cwd=HERE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with {server.returncode}")
            time.sleep(0.1)
        else:
            raise TimeoutError("the server did not become ready in 30 s")
        answer = httpx.post(f"{url}/v1/models/my-digits/predict", json={"inputs": x.tolist(), "delta": 0.9},
                            timeout=10).raise_for_status().json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"\n$ curl {url}/v1/models/my-digits/predict -d '{{\"inputs\": [...{len(x)} digits], \"delta\": 0.9}}'")
    for p, truth in zip(answer["predictions"], y, strict=True):
        print(f"  label {p['label']} (true {truth}) from exit {p['exit']} of {p['exits_total']} (exits count from 0), "
              f"estimated accuracy {p['estimated_accuracy']:.3f}, target met {p['target_met']}, "
              f"compute {p['compute_fraction']:.2f} of the full network")
    return answer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/own-model-example", help="working folder (default: %(default)s)")
    out = Path(parser.parse_args().out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    data = make_data(out)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = data["train"], data["val"], data["test"]
    backbone = train_backbone(x_train, y_train)
    print(f"your backbone: test accuracy {(backbone(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean():.3f}")

    net = wrap(backbone, torch.from_numpy(x_val[:16]))
    # Self-supervised exit heads: no labels (y=None); each head learns the final exit's predictions
    # with CE - λ·entropy while the backbone and its classifier stay frozen. regime="joint" or
    # "mixed" would train everything on labels instead.
    train_exits(net, x_train, None, regime="heads-only", epochs=15, lr=0.05, batch_size=64, augment=False,
                val=(x_val, y_val), labels=CLASSES)
    torch.save(net.state_dict(), out / "multi_exit.pt")

    bundle = out / "bundle"
    exitserve("export", "--model", "my_network:build_model", "--out", str(bundle),
              env={"MY_NETWORK_WEIGHTS": str(out / "multi_exit.pt"), "MY_NETWORK_EXAMPLES": str(out / "val.npz")})
    exitserve("calibrate", str(bundle), "--data", str(out / "val.npz"), "--no-progress")
    exitserve("evaluate", str(bundle), "--data", str(out / "test.npz"), "--out", str(out / "evaluation"), "--no-progress")
    answer = serve_and_query(bundle, x_test[:4], y_test[:4])
    (out / "answer.json").write_text(json.dumps(answer, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
