"""The hybrid cache: a short conv state per conv layer and a growing KV cache per attention layer.

One API covers full prefill, chunked prefill, continuation after a cached prefix and one-token decode:
layers read and append at `pos`, and the model advances `pos` once per forward. Snapshots are cheap
because cached keys and values below `pos` are never rewritten: a snapshot stores `pos` and the small
conv states only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CacheSnapshot:
    pos: int
    conv: dict[int, torch.Tensor]
    version: int


class HybridCache:
    def __init__(self, conv_layers: list[int], attn_layers: list[int], hidden: int, conv_width: int,
                 kv_heads: int, head_dim: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 capacity: int = 256) -> None:
        self.max_len = max_len
        self.pos = 0
        self.device, self.dtype = device, dtype
        self._conv = {i: torch.zeros(1, hidden, conv_width - 1, device=device, dtype=dtype) for i in conv_layers}
        self._kv_shape = (1, kv_heads, 0, head_dim)
        self.capacity = 0
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        self._attn_layers = attn_layers
        self._grow(min(capacity, max_len))
        self._version = 0
        self._rewinds: list[tuple[int, int]] = []  # (version, pos) whenever pos moves back

    @torch.inference_mode(False)  # normal tensors even when grown inside the model's forward (one kind for
    def _grow(self, need: int) -> None:  # the compiled step's guards, and writable outside inference mode)
        """Reallocate KV storage geometrically so appends are amortised O(1)."""
        new_cap = max(need, min(self.max_len, max(2 * self.capacity, 256)))
        b, h, _, d = self._kv_shape
        for i in self._attn_layers:
            for store in (self._k, self._v):
                # zeros, not empty: a decode step over the whole capacity (CUDA graphs) masks the unused
                # positions, and 0 * NaN from uninitialised memory would still poison the sum
                fresh = torch.zeros(b, h, new_cap, d, device=self.device, dtype=self.dtype)
                if i in store and self.pos:
                    fresh[:, :, : self.pos] = store[i][:, :, : self.pos]
                store[i] = fresh
        self.capacity = new_cap

    def reserve(self, total_len: int) -> None:
        """Make room for `total_len` positions up front (avoids copies during a long generation)."""
        if total_len > self.capacity:
            self._grow(min(max(total_len, 1), self.max_len))

    # --- used by the layers -------------------------------------------------------------------------
    def conv_state(self, layer: int) -> torch.Tensor:
        return self._conv[layer]

    def set_conv_state(self, layer: int, state: torch.Tensor) -> None:
        self._conv[layer].copy_(state)

    def append_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values at `pos` and return views over everything cached so far."""
        t = k.shape[2]
        end = self.pos + t
        if end > self.capacity:
            if end > self.max_len:
                raise ValueError(f"cache holds at most {self.max_len} positions; {end} requested")
            self._grow(end)
        kc, vc = self._k[layer], self._v[layer]
        kc[:, :, self.pos:end] = k
        vc[:, :, self.pos:end] = v
        return kc[:, :, :end], vc[:, :, :end]

    def kv_buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole key and value storage of a layer, [1, kv_heads, capacity, head_dim] (compiled decode)."""
        return self._k[layer], self._v[layer]

    def advance(self, n: int) -> None:
        self.pos += n

    # --- snapshots ----------------------------------------------------------------------------------
    def snapshot(self) -> CacheSnapshot:
        return CacheSnapshot(self.pos, {i: s.clone() for i, s in self._conv.items()}, self._version)

    def restore(self, snap: CacheSnapshot) -> None:
        """Return to a snapshot. Fails if positions below it were overwritten since it was taken."""
        for version, pos in self._rewinds:
            if version > snap.version and pos < snap.pos:
                raise ValueError("cache snapshot is stale: its positions were overwritten after a rewind")
        for i, s in snap.conv.items():
            self._conv[i].copy_(s)
        if snap.pos < self.pos:
            self._version += 1
            self._rewinds.append((self._version, snap.pos))
        self.pos = snap.pos

    def reset(self) -> None:
        for s in self._conv.values():
            s.zero_()
        self._version += 1
        self._rewinds.append((self._version, 0))
        self.pos = 0
