"""A plain PyTorch Llama decoder (SmolLM2 and other Llama-shaped models) with layer-level access.

No `transformers` at run time: the weights load from safetensors with the checkpoint's key names
(`model.layers.N.self_attn.q_proj.weight`, ...). The engine drives the model one layer at a time
(`LlamaModel.layers[l]`), because early exit decides between layers; `forward` runs every layer
and exists for conversion parity checks and teacher-forced measurements.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    max_positions: int = 8192
    tie_word_embeddings: bool = True

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> LlamaConfig:
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown Llama config fields: {sorted(unknown)}")
        return cls(**raw)


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics, as the reference implementation computes them
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class Rotary:
    """cos/sin tables for rotary position embeddings, indexed by absolute position."""

    def __init__(self, config: LlamaConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        inv = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim))
        angles = torch.outer(torch.arange(config.max_positions, dtype=torch.float64), inv)
        angles = torch.cat([angles, angles], dim=-1)
        self.cos = angles.cos().to(device=device, dtype=dtype)
        self.sin = angles.sin().to(device=device, dtype=dtype)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [rows, heads, head_dim] at `positions` [rows]."""
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        self.q_proj = nn.Linear(h, config.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_heads * d, h, bias=False)

    def key_value(self, normed: torch.Tensor, positions: torch.Tensor, rotary: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated) and values [rows, kv_heads, head_dim] of normed hidden states [rows, width]."""
        rows = normed.shape[0]
        k = self.k_proj(normed).view(rows, self.num_kv_heads, self.head_dim)
        v = self.v_proj(normed).view(rows, self.num_kv_heads, self.head_dim)
        return rotary.apply(k, positions), v


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One pre-norm Llama layer that reads and writes a KV cache.

    `run` takes the hidden states of some rows of one or more sequences (`spans`: per sequence the
    row range, its cache and the absolute positions of those rows) so that many sequences, each
    with its own rows, share the projections and the MLP; attention runs per sequence.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def run(self, x: torch.Tensor, spans: list[LayerSpan], rotary: Rotary) -> torch.Tensor:
        q, k, v = self.project(x, span_positions(spans), rotary)
        return self.finish(x, attend(q, k, v, spans))

    def project(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys (both rotated) and values [rows, heads, head_dim] of hidden states [rows, width]."""
        attn = self.self_attn
        normed = self.input_layernorm(x)
        rows = x.shape[0]
        q = attn.q_proj(normed).view(rows, attn.num_heads, attn.head_dim)
        k, v = attn.key_value(normed, positions, rotary)
        return rotary.apply(q, positions), k, v

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of the layer after attention: output projection, residual, MLP."""
        x = x + self.self_attn.o_proj(attended)
        return x + self.mlp(self.post_attention_layernorm(x))


def span_positions(spans: list[LayerSpan]) -> torch.Tensor:
    return torch.cat([s.positions for s in spans]) if len(spans) > 1 else spans[0].positions


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: list[LayerSpan]) -> torch.Tensor:
    """Write each span's keys and values into its cache, attend over the cache; -> [rows, heads * head_dim].

    q [rows, heads, d], k and v [rows, kv_heads, d]; attention runs per sequence (each has its own
    cache length), causal among a span's new rows, every earlier cached position visible."""
    if q.device.type == "cpu" and q.dtype == torch.float32 and all(s.rows[1] - s.rows[0] == 1 for s in spans):
        return _attend_one_row_each(q, k, v, spans)
    return _attend_sdpa(q, k, v, spans)


def _attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: list[LayerSpan]) -> torch.Tensor:
    out = torch.empty_like(q)
    for span in spans:
        a, b = span.rows
        first, last = span.start, span.start + b - a - 1
        span.keys[:, first:last + 1] = k[a:b].transpose(0, 1)
        span.values[:, first:last + 1] = v[a:b].transpose(0, 1)
        keys, values = span.keys[:, : last + 1], span.values[:, : last + 1]
        query = q[a:b].transpose(0, 1)  # [heads, r, d]
        mask = None
        if b - a > 1:
            mask = torch.arange(last + 1, device=q.device)[None, :] <= span.positions[:, None]
        y = F.scaled_dot_product_attention(query[None], keys[None], values[None], attn_mask=mask, enable_gqa=True)
        out[a:b] = y[0].transpose(0, 1)
    return out.reshape(q.shape[0], -1)


def _attend_one_row_each(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: list[LayerSpan]) -> torch.Tensor:
    """`attend` for decoding steps on CPU (one new row per sequence), in numpy on views of the caches.

    The same arithmetic with about a fifth of the per-call dispatch cost of torch's operators: a
    sequence's attention is a few hundred multiply-adds, so dispatch is all there is (measured: 16
    sequences 0.52 vs 1.06 ms a layer, one sequence 36 vs 64 µs)."""
    queries, keys_new, values_new = q.numpy(), k.numpy(), v.numpy()
    rows, heads, d = queries.shape
    kv_heads = keys_new.shape[1]
    scale = np.float32(1.0 / math.sqrt(d))
    out = np.empty_like(queries)
    for span in spans:
        row, position = span.rows[0], span.start
        keys, values = span.keys.numpy(), span.values.numpy()
        keys[:, position] = keys_new[row]
        values[:, position] = values_new[row]
        # query heads grouped by the key/value head they share: [kv_heads, group, d]
        grouped = queries[row].reshape(kv_heads, heads // kv_heads, d) * scale
        scores = np.matmul(grouped, keys[:, : position + 1].transpose(0, 2, 1))
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out[row] = np.matmul(scores, values[:, : position + 1]).reshape(heads, d)
    return torch.from_numpy(out).reshape(rows, -1)


@dataclass
class LayerSpan:
    """One sequence's rows in a layer call: x[rows[0]:rows[1]] sit at positions start, start + 1, ..."""

    rows: tuple[int, int]
    # The first position as a host int: reading it off a tensor on a GPU would wait for the device
    # to drain its queue, once per sequence and layer (measured: 50 ms a token on an H200).
    start: int
    keys: torch.Tensor  # [kv_heads, capacity, head_dim] of this layer
    values: torch.Tensor
    positions: torch.Tensor  # the same positions on the cache's device, for the rotary tables

    @classmethod
    def starting_at(cls, rows: tuple[int, int], start: int, keys: torch.Tensor, values: torch.Tensor) -> LayerSpan:
        positions = torch.arange(start, start + rows[1] - rows[0], device=keys.device)
        return cls(rows, start, keys, values, positions)


def batch_spans(rows: int, starts: list[int], keys: torch.Tensor, values: torch.Tensor) -> list[LayerSpan]:
    """Spans of one sequence's `rows` rows from starts[0] (keys/values [kv_heads, capacity, d]), or
    of one row each of len(starts) sequences (keys/values [batch, kv_heads, capacity, d])."""
    if keys.dim() == 3:
        return [LayerSpan.starting_at((0, rows), starts[0], keys, values)]
    return [LayerSpan.starting_at((i, i + 1), start, keys[i], values[i]) for i, start in enumerate(starts)]


class LlamaBody(nn.Module):
    """The checkpoint's `model.*` part: embedding, decoder layers, final norm (typed attributes)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head with the checkpoint's parameter names."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaBody(config)
        # The same modules, typed (a ModuleList only knows they are modules); looked up per token.
        self._layers = [layer for layer in self.model.layers if isinstance(layer, DecoderLayer)]
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rotary: Rotary | None = None

    @property
    def layers(self) -> list[DecoderLayer]:
        return self._layers

    def rotary(self) -> Rotary:
        weight = self.model.embed_tokens.weight
        if self._rotary is None or self._rotary.cos.device != weight.device or self._rotary.cos.dtype != weight.dtype:
            self._rotary = Rotary(self.config, weight.device, weight.dtype)
        return self._rotary

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(hidden))

    def new_cache(self, capacity: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.config
        weight = self.model.embed_tokens.weight
        shape = (c.num_kv_heads, capacity, c.head_dim)
        return [(torch.zeros(shape, dtype=weight.dtype, device=weight.device),
                 torch.zeros(shape, dtype=weight.dtype, device=weight.device)) for _ in range(c.num_layers)]

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, *, hidden_layers: list[int] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Teacher-forced pass over one sequence `ids` [n]: (logits [n, vocab], hidden after each asked layer)."""
        n = ids.shape[0]
        cache = self.new_cache(n)
        rotary = self.rotary()
        x = self.embed(ids)
        kept = []
        wanted = set(hidden_layers or [])
        for index, layer in enumerate(self.layers):
            keys, values = cache[index]
            x = layer.run(x, [LayerSpan.starting_at((0, n), 0, keys, values)], rotary)
            if index in wanted:
                kept.append(x)
        return self.logits(x), kept


def load_llama(directory: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LlamaModel:
    """Load `config.json` + `model.safetensors` of a generation bundle (weights only, no pickle)."""
    from safetensors.torch import load_file

    config = LlamaConfig.from_json(json.loads((directory / "config.json").read_text()))
    model = LlamaModel(config)
    weights = load_file(str(directory / "model.safetensors"))
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{directory / 'model.safetensors'}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
