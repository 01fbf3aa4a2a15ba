"""One KV cache for many sequences: per layer a keys and a values tensor [slots, kv_heads, capacity, d].

A sequence's cache is one slot's views, so everything that works on a sequence's own cache works
on it unchanged; what the pool adds is that sequences in consecutive slots are one tensor per
layer, which a fused segment (ONNX Runtime's GroupQueryAttention, `runners.py`) takes as a batch:
a decoding step of 16 streams becomes a few calls with attention inside, instead of two calls a
layer with attention per sequence outside (BENCHMARKS.md, "Language models").

Memory: the tensors are allocated uninitialised at full capacity. The allocation is address space,
not memory; a page is backed when a sequence first writes a position in it, so resident memory
follows the longest sequence each slot has held (as per-sequence caches of that length would).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from exitserve.models.llm.llama import LlamaConfig


class KVPool:
    def __init__(self, config: LlamaConfig, slots: int, capacity: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if slots < 1 or capacity < 1:
            raise ValueError(f"a KV pool needs at least one slot and one position, not {slots} x {capacity}")
        shape = (slots, config.num_kv_heads, capacity, config.head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.slots, self.capacity = slots, capacity
        self._free = list(range(slots))
        self._owners: dict[int, weakref.ref] = {}
        self._lock = threading.Lock()  # a slot may come back from another thread (a finalizer)
        self._batches: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def acquire(self, owner: Any) -> int | None:
        """The lowest free slot (consecutive slots batch together), held until `release` or until
        `owner` is garbage; None when every slot is taken."""
        with self._lock:
            if not self._free:
                return None
            slot = min(self._free)
            self._own(slot, owner)
        return slot

    def take(self, slot: int, owner: Any) -> None:
        """Acquire this free slot (a sequence moving down, `move`)."""
        with self._lock:
            if slot not in self._free:
                raise ValueError(f"slot {slot} is not free")
            self._own(slot, owner)

    def _own(self, slot: int, owner: Any) -> None:
        """Give a free slot to `owner` (the lock held); it comes back when `owner` is garbage, unless
        released and handed on before that."""
        self._free.remove(slot)
        ref = self._owners[slot] = weakref.ref(owner)
        weakref.finalize(owner, self.release, slot, ref)

    def lowest_free(self) -> int | None:
        with self._lock:
            return min(self._free) if self._free else None

    def move(self, owner: Any, source: int, target: int, positions: int) -> None:
        """Move `owner`'s cache from slot `source` to the free slot `target`: its first `positions`
        positions at every layer are copied, the source slot is freed."""
        self.take(target, owner)
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target, :, :positions] = keys[source, :, :positions]
            values[target, :, :positions] = values[source, :, :positions]
        self.release(source)

    def release(self, slot: int, ref: weakref.ref | None = None) -> None:
        """Free the slot; with `ref` (a finalizer's), only if it still belongs to that owner."""
        with self._lock:
            if slot in self._owners and (ref is None or self._owners[slot] is ref):
                del self._owners[slot]
                self._free.append(slot)

    def owner(self, slot: int) -> Any | None:
        ref = self._owners.get(slot)
        return ref() if ref is not None else None

    @property
    def in_use(self) -> int:
        return len(self._owners)

    def cache(self, slot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One slot's cache: per layer (keys, values) [kv_heads, capacity, d], views into the pool."""
        return [(k[slot], v[slot]) for k, v in zip(self.keys, self.values, strict=True)]

    def batch(self, first: int, last: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Slots first..last as one batch: per layer (keys, values) [last - first + 1, kv_heads, capacity, d].
        Kept per range (views of tensors that never move; at most slots² of them): a decoding step
        asks for the same range every segment."""
        views = self._batches.get((first, last))
        if views is None:
            views = [(k[first:last + 1], v[first:last + 1]) for k, v in zip(self.keys, self.values, strict=True)]
            self._batches[first, last] = views
        return views
