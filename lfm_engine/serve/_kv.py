"""KV cache of the Engine's running batch: transformers Cache objects with batch surgery.

EngineCache is a DynamicCache whose layers (GrowLayer) keep capacity headroom, so a decode
step writes its column in place; rows can be selected (finished sequences leave), the common
left padding trimmed, and two caches merged row-wise with left padding (joining requests).
"""
from __future__ import annotations

from typing import List

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer




class GrowLayer(DynamicLayer):
    """DynamicLayer with capacity headroom: update() writes into a preallocated buffer
    ([B, H, cap, D]) and exposes the filled prefix as keys/values (a view)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self._kb = self._vb = None
        self._len = 0
        self.keys = self.values = None
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        L = self._len
        if self._kb is None or L + n > self._kb.shape[2]:
            # bounded headroom (a quarter + 64 columns), not doubling: the engine's KV budget
            # counts on it (engine._kv_columns)
            cap = L + n + (L + n) // 4 + 64
            B, H, _, D = key_states.shape
            kb = key_states.new_zeros(B, H, cap, D)
            vb = value_states.new_zeros(B, H, cap, value_states.shape[-1])
            if L:
                kb[:, :, :L].copy_(self._kb[:, :, :L])
                vb[:, :, :L].copy_(self._vb[:, :, :L])
            self._kb, self._vb = kb, vb
        self._kb[:, :, L:L + n].copy_(key_states)
        self._vb[:, :, L:L + n].copy_(value_states)
        self._len = L + n
        self.keys = self._kb[:, :, : self._len]
        self.values = self._vb[:, :, : self._len]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._len if self.is_initialized else 0

    # engine-side batch surgery -------------------------------------------------------
    def set_rows(self, k: torch.Tensor, v: torch.Tensor, headroom: int = 16) -> None:
        B, H, L, D = k.shape
        self._kb = k.new_zeros(B, H, L + headroom, D)
        self._vb = v.new_zeros(B, H, L + headroom, v.shape[-1])
        self._kb[:, :, :L].copy_(k)
        self._vb[:, :, :L].copy_(v)
        self._len = L
        self.keys = self._kb[:, :, :L]
        self.values = self._vb[:, :, :L]
        self.device, self.dtype, self.is_initialized = k.device, k.dtype, True

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._kb is not None:
            self._kb = self._kb.index_select(0, indices)
            self._vb = self._vb.index_select(0, indices)
            self.keys = self._kb[:, :, : self._len]
            self.values = self._vb[:, :, : self._len]

    def trim_left(self, m: int) -> None:
        if m and self._kb is not None:
            self._kb = self._kb[:, :, m:]
            self._vb = self._vb[:, :, m:]
            self._len -= m
            self.keys = self._kb[:, :, : self._len]
            self.values = self._vb[:, :, : self._len]


class EngineCache(DynamicCache):
    """A DynamicCache whose layers are GrowLayer (full attention history per layer; sliding
    windows are applied by the model's attention mask)."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=GrowLayer)


def merge_caches(a: EngineCache, a_pad: List[int], b: EngineCache, b_pad: List[int]):
    """Rows of a then rows of b, left-padded to a common length. Returns (cache, pads)."""
    La, Lb = a.get_seq_length(), b.get_seq_length()
    L = max(La, Lb)
    for la, lb in zip(a.layers, b.layers):
        ka, va, kb, vb = la.keys, la.values, lb.keys, lb.values
        Ba, Bb = ka.shape[0], kb.shape[0]
        k = ka.new_zeros(Ba + Bb, ka.shape[1], L, ka.shape[3])
        v = va.new_zeros(Ba + Bb, va.shape[1], L, va.shape[3])
        k[:Ba, :, L - La:] = ka
        v[:Ba, :, L - La:] = va
        k[Ba:, :, L - Lb:] = kb
        v[Ba:, :, L - Lb:] = vb
        la.set_rows(k, v)
    pads = [p + (L - La) for p in a_pad] + [p + (L - Lb) for p in b_pad]
    return a, pads


# failure isolation (Engine._decode_rows_apart) ---------------------------------------

def lengths(cache: EngineCache) -> List[int]:
    """Filled length of every layer (to undo a forward that failed half-way)."""
    return [layer.get_seq_length() for layer in cache.layers]


def restore(cache: EngineCache, lens: List[int]) -> None:
    """Forget the columns a failed forward appended (the buffers keep them, unread)."""
    for layer, n in zip(cache.layers, lens):
        if layer.is_initialized and layer._len != n:
            layer._len = n
            layer.keys = layer._kb[:, :, :n]
            layer.values = layer._vb[:, :, :n]


def select(cache: EngineCache, rows: List[int]) -> EngineCache:
    """A new cache holding copies of the given rows."""
    out = EngineCache()
    idx = torch.tensor(rows, dtype=torch.long, device=cache.layers[0].keys.device)
    for layer in cache.layers:
        g = GrowLayer()
        g.set_rows(layer.keys.index_select(0, idx), layer.values.index_select(0, idx))
        out.layers.append(g)
    return out


def concat(caches: List[EngineCache]) -> EngineCache:
    """Rows of every cache, in order; all must have the same length."""
    out = EngineCache()
    for per_layer in zip(*(c.layers for c in caches)):
        g = GrowLayer()
        g.set_rows(torch.cat([x.keys for x in per_layer]), torch.cat([x.values for x in per_layer]))
        out.layers.append(g)
    return out
