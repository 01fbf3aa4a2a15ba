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

    def joined(self, other: HiddenCache) -> HiddenCache:
        """This cache's tokens, then `other`'s (the layers both hold)."""
        layers = [layer for layer in self.layers if layer in other.layers]
        return HiddenCache(layers, {layer: torch.cat([self.hidden[layer], other.hidden[layer]]) for layer in layers},
                           torch.cat([self.full_argmax, other.full_argmax]),
                           hashlib.sha256(f"{self.fingerprint}+{other.fingerprint}".encode()).hexdigest()[:16])

    @classmethod
    def load(cls, path: Path) -> HiddenCache:
        raw = torch.load(path, weights_only=True)
        return cls(raw["layers"], {int(k): v for k, v in raw["hidden"].items()}, raw["full_argmax"], raw["fingerprint"])


def read_text(path: Path) -> str:
    """A text file's paragraphs; for a .tsv (AG News, SST-2), the first column of each row."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".tsv":
        return "\n".join(line.split("\t", 1)[0] for line in text.splitlines() if line.strip())
    return text


def text_tokens(tokenizer: Tokenizer, path: Path, *, skip: int = 0, limit: int | None = None) -> np.ndarray:
    """Token ids of a text file (paragraphs joined by newlines), tokens [skip, skip + limit) (to the end: None);
    a negative `skip` counts from the end."""
    ids = np.asarray(tokenizer.encode(read_text(path), add_special_tokens=False).ids, dtype=np.int64)
    start = ids.size + skip if skip < 0 else skip
    end = ids.size if limit is None else start + limit
    if start < 0 or ids.size < end:
        raise ValueError(f"{path}: {ids.size} tokens, need [{start}, {end})")
    return ids[start:end]


def corpus_tokens(tokenizer: Tokenizer, files: list[Path], limit: int, *, hold_out: int = 0) -> np.ndarray:
    """Up to `limit` training tokens from several files in order; the first file's last `hold_out` tokens
    stay out (they are the held-out calibration text)."""
    parts, total = [], 0
    for n, path in enumerate(files):
        ids = text_tokens(tokenizer, path)
        if n == 0 and hold_out:
            ids = ids[:-hold_out]
        parts.append(ids[: limit - total])
        total += parts[-1].size
        if total >= limit:
            break
    return np.concatenate(parts)


@torch.inference_mode()
def cache_hidden(model: LlamaModel, ids: np.ndarray, layers: list[int], *, context: int = 512,
                 progress: bool = True) -> HiddenCache:
    last = model.config.num_layers - 1
    wanted = sorted(set(layers) | {last})
    # preallocated float16 (no list + cat: that would hold the cache twice at its largest)
    hidden = {layer: torch.empty(ids.size, model.config.hidden_size, dtype=torch.float16) for layer in wanted}
    argmax = torch.empty(ids.size, dtype=torch.int64)
    start = time.perf_counter()
    for n, first in enumerate(range(0, ids.size, context)):
        chunk = ids[first: first + context]
        logits, kept = model(torch.from_numpy(chunk), hidden_layers=wanted)
        for layer, h in zip(wanted, kept, strict=True):
            hidden[layer][first: first + chunk.size] = h
        argmax[first: first + chunk.size] = logits.argmax(-1)
        if progress and n % 32 == 0:
            done = first + chunk.size
            print(f"  cached {done}/{ids.size} tokens, {done / (time.perf_counter() - start):.0f} tokens/s", flush=True)
    fingerprint = hashlib.sha256(ids.tobytes()).hexdigest()[:16]
    return HiddenCache(wanted, hidden, argmax, fingerprint)
