"""Runner choice for token generation: one decoder layer + an exit head at batch 1, torch vs ONNX Runtime.

    python benchmarks/llm_runner.py runs/bundles/smollm2 --positions 300 --threads 1

One SmolLM2 decoder step for a single token with a KV cache of `--positions` earlier positions,
followed by a restricted-vocabulary exit head (the bundle's head 0 if it has heads, else the model's
final norm + the first 4,096 LM-head rows), in:
- torch, the decoder's own path (`DecoderLayer.run` with a `LayerSpan`, then `ExitHeads.logits`);
- torch, a functional one-token step (the graph that is exported);
- ONNX Runtime on the exported graph (torch.onnx, opset 17, ir_version <= 13), the KV cache bound as
  OrtValues with I/O binding (no copy per call), outputs bound to preallocated OrtValues too.
The three agree numerically (checked). Medians and p99 of per-call times, interleaved rounds.
Writes benchmarks/results/llm-runner.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from exitserve.models.llm.llama import DecoderLayer, LayerSpan, LlamaModel, load_llama

RESULTS = Path(__file__).resolve().parent / "results"


class OneTokenStep(nn.Module):
    """A decoder layer for one new token over a fixed KV cache, then an exit head over K rows."""

    def __init__(self, layer: DecoderLayer, norm: nn.Module, rows: torch.Tensor):
        super().__init__()
        self.layer, self.norm = layer, norm
        self.rows = nn.Parameter(rows, requires_grad=False)
        attn = layer.self_attn
        self.h, self.kvh, self.d = attn.num_heads, attn.num_kv_heads, attn.head_dim

    def forward(self, x, past_k, past_v, cos, sin):
        attn, layer = self.layer.self_attn, self.layer
        normed = _norm(layer.input_layernorm, x)
        q = attn.q_proj(normed).view(self.h, 1, self.d)
        k = attn.k_proj(normed).view(self.kvh, 1, self.d)
        v = attn.v_proj(normed).view(self.kvh, 1, self.d)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        keys = torch.cat([past_k, k], dim=1).repeat_interleave(self.h // self.kvh, dim=0)
        values = torch.cat([past_v, v], dim=1).repeat_interleave(self.h // self.kvh, dim=0)
        scores = torch.softmax((q @ keys.transpose(1, 2)) / (self.d ** 0.5), dim=-1)
        out = (scores @ values).transpose(0, 1).reshape(1, self.h * self.d)
        x = x + attn.o_proj(out)
        x = x + layer.mlp(_norm(layer.post_attention_layernorm, x))
        return _norm(self.norm, x) @ self.rows.T, x, k, v


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm in float32 without the dtype casts (the TorchScript exporter drops a float->float Cast
    but keeps its output as an input of the next node: an invalid graph)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def summary(samples: list[float]) -> dict:
    ms = np.asarray(samples) * 1000
    return {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "calls": int(ms.size)}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--positions", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "llm-runner.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnx
    import onnxruntime as ort

    model: LlamaModel = load_llama(Path(args.bundle))
    config, layer, p = model.config, model.layers[args.layer], args.positions
    rows = model.lm_head.weight[:4096].detach().clone()
    step = OneTokenStep(layer, model.model.norm, rows).eval()
    rotary = model.rotary()
    torch.manual_seed(0)
    x = torch.randn(1, config.hidden_size)
    past_k = torch.randn(config.num_kv_heads, p, config.head_dim)
    past_v = torch.randn(config.num_kv_heads, p, config.head_dim)
    cos, sin = rotary.cos[p:p + 1], rotary.sin[p:p + 1]

    # torch, the decoder's own path: a KV buffer of capacity p + 1, the new token at position p
    keys = torch.zeros(config.num_kv_heads, p + 1, config.head_dim)
    values = torch.zeros_like(keys)
    keys[:, :p], values[:, :p] = past_k, past_v
    positions = torch.tensor([p])

    def decoder_path():
        y = layer.run(x, [LayerSpan((0, 1), positions, keys, values)], rotary)
        return model.model.norm(y) @ rows.T, y

    # ONNX export of the functional step; the KV cache and outputs bound as OrtValues
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step.onnx"
        torch.onnx.export(step, (x, past_k, past_v, cos, sin), str(path), dynamo=False, opset_version=17,
                          input_names=["x", "past_k", "past_v", "cos", "sin"],
                          output_names=["head_logits", "hidden", "k_new", "v_new"])
        graph = onnx.load(str(path))
        assert graph.ir_version <= 13, graph.ir_version
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {"x": x.numpy(), "past_k": past_k.numpy(), "past_v": past_v.numpy(), "cos": cos.numpy(), "sin": sin.numpy()}
    bound = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)) for name, value in feeds.items()}
    reference = step(x, past_k, past_v, cos, sin)
    outputs = {name: ort.OrtValue.ortvalue_from_numpy(np.zeros(t.shape, dtype=np.float32))
               for name, t in zip(["head_logits", "hidden", "k_new", "v_new"], reference, strict=True)}
    binding = session.io_binding()
    for name, value in bound.items():
        binding.bind_ortvalue_input(name, value)
    for name, value in outputs.items():
        binding.bind_ortvalue_output(name, value)

    def ort_path():
        session.run_with_iobinding(binding)

    ort_path()
    mine, _ = decoder_path()
    checks = {"ort_vs_step_max_abs": float(np.abs(outputs["head_logits"].numpy() - reference[0].numpy()).max()),
              "decoder_vs_step_max_abs": float((mine - reference[0]).abs().max())}
    assert checks["ort_vs_step_max_abs"] < 1e-2 and checks["decoder_vs_step_max_abs"] < 1e-2, checks
    paths = {"torch, decoder path (layer.run + head)": decoder_path,
             "torch, functional step": lambda: step(x, past_k, past_v, cos, sin),
             "ONNX Runtime, I/O binding (OrtValue KV)": ort_path}
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for fn in paths.values():
        timed(fn, 20)
    for _ in range(args.rounds):  # interleaved, so that load on the shared machine hits all alike
        for name, fn in paths.items():
            samples[name].extend(timed(fn, args.reps // args.rounds))
    result = {"bundle": str(args.bundle), "layer": args.layer, "positions": p, "threads": args.threads,
              "head_rows": int(rows.shape[0]), "checks": checks, "ort_version": ort.__version__,
              "torch_version": torch.__version__, "paths": {name: summary(s) for name, s in samples.items()}}
    base = result["paths"]["torch, decoder path (layer.run + head)"]["median_ms"]
    print(f"one layer + exit head, batch 1, {p} cached positions, {args.threads} thread(s):")
    print("| runner | median (ms) | p99 (ms) | ratio to the decoder path |")
    print("| --- | --- | --- | --- |")
    for name, s in result["paths"].items():
        print(f"| {name} | {s['median_ms']:.3f} | {s['p99_ms']:.3f} | {s['median_ms'] / base:.2f}× |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
