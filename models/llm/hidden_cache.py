"""Hidden states of the frozen decoder, computed once and cached, for training and calibrating exit heads.

Text is tokenised, cut into independent chunks of `context` tokens and run teacher-forced. For every
token we keep the hidden state after each candidate layer and after the last layer (float16), from
which the full model's logits over any vocabulary subset are recomputed cheaply (final norm + rows of
the LM head), so the full [tokens, 49152] logits never need storing.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from exitserve.models.llm.llama import LlamaModel


@dataclass
class HiddenCache:
    layers: list[int]
    hidden: dict[int, torch.Tensor]  # layer -> [tokens, width] float16 (the last layer included)
    full_argmax: torch.Tensor  # [tokens] the full model's next-token prediction at each position
    fingerprint: str

    @property
    def size(self) -> int:
        return int(self.full_argmax.shape[0])

    def save(self, path: Path) -> None:
        torch.save({"layers": self.layers, "hidden": self.hidden, "full_argmax": self.full_argmax,
                    "fingerprint": self.fingerprint}, path)

    @classmethod
    def load(cls, path: Path) -> HiddenCache:
        raw = torch.load(path, weights_only=True)
        return cls(raw["layers"], {int(k): v for k, v in raw["hidden"].items()}, raw["full_argmax"], raw["fingerprint"])


def text_tokens(tokenizer: Tokenizer, path: Path, *, skip: int = 0, limit: int) -> np.ndarray:
    """Token ids of a text file (paragraphs joined by newlines), tokens [skip, skip + limit)."""
    text = path.read_text(encoding="utf-8")
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    if ids.size < skip + limit:
        raise ValueError(f"{path}: {ids.size} tokens, need {skip + limit}")
    return ids[skip: skip + limit]


@torch.inference_mode()
def cache_hidden(model: LlamaModel, ids: np.ndarray, layers: list[int], *, context: int = 512,
                 progress: bool = True) -> HiddenCache:
    last = model.config.num_layers - 1
    wanted = sorted(set(layers) | {last})
    hidden: dict[int, list[torch.Tensor]] = {layer: [] for layer in wanted}
    argmax = []
    start = time.perf_counter()
    chunks = [ids[i: i + context] for i in range(0, ids.size, context)]
    for n, chunk in enumerate(chunks):
        logits, kept = model(torch.from_numpy(chunk), hidden_layers=wanted)
        for layer, h in zip(wanted, kept, strict=True):
            hidden[layer].append(h.to(torch.float16))
        argmax.append(logits.argmax(-1))
        if progress and (n % 8 == 0 or n == len(chunks) - 1):
            done = sum(c.size for c in chunks[: n + 1])
            print(f"  cached {done}/{ids.size} tokens, {done / (time.perf_counter() - start):.0f} tokens/s", flush=True)
    fingerprint = hashlib.sha256(ids.tobytes()).hexdigest()[:16]
    return HiddenCache(wanted, {k: torch.cat(v) for k, v in hidden.items()}, torch.cat(argmax), fingerprint)
