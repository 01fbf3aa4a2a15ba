"""A tiny Llama-shaped decoder with random weights, exit heads and label-free tables, built in seconds."""

from __future__ import annotations

import numpy as np
import torch

from exitserve.calibration import Calibration
from exitserve.models.llm.heads import ExitHeads
from exitserve.models.llm.llama import LlamaConfig, LlamaModel
from exitserve.service.serving.generation.calibrate import fit_token_calibration

TINY = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_layers=6, num_heads=4, num_kv_heads=2,
                   head_dim=12, rms_norm_eps=1e-5, rope_theta=10000.0, max_positions=512, tie_word_embeddings=True)
EXIT_LAYERS = [1, 3, 5]


def tiny_model(seed: int = 0, config: LlamaConfig = TINY) -> LlamaModel:
    torch.manual_seed(seed)
    model = LlamaModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:  # wide enough that logits are far from ties: greedy comparisons stay meaningful
                p.normal_(0.0, 0.3 if "embed" in name else 0.15)
    return model.eval().requires_grad_(False)


def tiny_heads(model: LlamaModel, vocab_size: int = 64, seed: int = 1) -> ExitHeads:
    torch.manual_seed(seed)
    heads = ExitHeads(model.config.hidden_size, 32, model.config.rms_norm_eps, torch.arange(vocab_size),
                      len(EXIT_LAYERS) - 1).init_from(model)
    with torch.no_grad():
        for head in heads.heads:
            head.down.weight.normal_(0.0, 0.05)
    return heads.eval().requires_grad_(False)


def tiny_calibration(model: LlamaModel, heads: ExitHeads, tokens: int = 3000, seed: int = 2) -> Calibration:
    """Tables counted on random token streams, teacher-forced (what the real pipeline does on WikiText)."""
    generator = torch.Generator().manual_seed(seed)
    per_exit: list[list[np.ndarray]] = [[] for _ in EXIT_LAYERS[:-1]]
    full = []
    for _ in range(tokens // 100):
        ids = torch.randint(model.config.vocab_size, (100,), generator=generator)
        logits, hidden = model(ids, hidden_layers=EXIT_LAYERS[:-1])
        with torch.no_grad():
            for k, h in enumerate(hidden):
                per_exit[k].append(heads.logits(k, h).numpy())
        full.append(logits.argmax(-1).numpy())
    return fit_token_calibration([np.concatenate(z) for z in per_exit], heads.vocab.numpy(), np.concatenate(full),
                                 model.config.vocab_size, bins=10)


def random_prompts(count: int, seed: int = 3, vocab: int = TINY.vocab_size) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, 12))).tolist() for _ in range(count)]
