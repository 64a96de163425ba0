"""The native engine's KV cache: right-aligned rows in growable per-layer buffers, merged when the batch changes.

Row i holds its `cached` tokens in the last columns of a [rows, heads, capacity, head_dim] buffer per
layer; the columns to their left are masked padding, and positions are counted per row, so every row
computes exactly what it would compute alone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer


class BufferLayer(DynamicLayer):
    """One layer's K/V in a preallocated [rows, heads, capacity, head_dim] buffer; appends write in place."""

    def __init__(self, headroom: int = 0):
        super().__init__()
        self.headroom = headroom
        self.buf_k: Tensor | None = None
        self.buf_v: Tensor | None = None
        self.length = 0

    def adopt(self, buf_k: Tensor, buf_v: Tensor, length: int) -> None:
        self.buf_k, self.buf_v, self.length = buf_k, buf_v, length
        self.device, self.is_initialized = buf_k.device, True
        self.keys, self.values = buf_k[:, :, :length], buf_v[:, :, :length]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        n = key_states.shape[-2]
        if self.buf_k is None or self.length + n > self.buf_k.shape[2]:
            capacity = self.length + n + max(self.headroom, self.length // 4)
            buf_k = key_states.new_empty(*key_states.shape[:2], capacity, key_states.shape[-1])
            buf_v = value_states.new_empty(*value_states.shape[:2], capacity, value_states.shape[-1])
            if self.length:
                buf_k[:, :, : self.length] = self.buf_k[:, :, : self.length]
                buf_v[:, :, : self.length] = self.buf_v[:, :, : self.length]
            self.buf_k, self.buf_v = buf_k, buf_v
        self.buf_k[:, :, self.length : self.length + n] = key_states
        self.buf_v[:, :, self.length : self.length + n] = value_states
        self.adopt(self.buf_k, self.buf_v, self.length + n)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


class BatchKV(Cache):
    """The batch's KV cache: every layer right-aligned in a growable buffer (sliding-window layers
    keep all columns too; their window is applied by the attention mask)."""

    def __init__(self, num_layers: int, headroom: int = 0):
        super().__init__(layers=[BufferLayer(headroom) for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return self.layers[0].length


class KVPart(NamedTuple):
    """Rows taken from one cache when the batch is rebuilt."""

    kv: BatchKV
    rows: list[int]
    cached: list[int]
    """Tokens each of those rows holds (right-aligned in `kv`)."""


def merge_kv(parts: list[KVPart], headroom: int, order: list[int] | None = None) -> BatchKV:
    """One right-aligned cache holding the given rows of each part (concatenated, then permuted by
    `order`: new row j is old row order[j]), with `headroom` spare columns. Padding is zeroed:
    masked columns must still be finite, as 0 * NaN would poison attention."""
    parts = [p for p in parts if p.rows]
    concat = [c for p in parts for c in p.cached]
    order = order if order is not None else list(range(len(concat)))
    cached = [concat[i] for i in order]
    position = [0] * len(order)
    for new, old in enumerate(order):
        position[old] = new
    width = max(cached)
    device = parts[0].kv.layers[0].buf_k.device
    start = torch.tensor([width - c for c in cached], device=device)
    pad = (torch.arange(width, device=device)[None, :] < start[:, None])[:, None, :, None]
    plans, offset = [], 0
    for part in parts:
        n = len(part.rows)
        dest = position[offset : offset + n]
        offset += n
        whole = part.rows == list(range(n)) and n == part.kv.layers[0].buf_k.shape[0]
        source = None if whole else torch.tensor(part.rows, device=device)
        target = dest[0] if dest == list(range(dest[0], dest[0] + n)) else torch.tensor(dest, device=device)
        plans.append((part, max(part.cached), source, target))
    merged = BatchKV(len(parts[0].kv.layers), headroom)
    for li, layer in enumerate(merged.layers):
        bufs = []
        for which in ("buf_k", "buf_v"):
            ref = getattr(parts[0].kv.layers[li], which)
            buf = ref.new_empty(len(cached), ref.shape[1], width + headroom, ref.shape[3])
            for part, used, source, target in plans:
                src_layer = part.kv.layers[li]
                block = getattr(src_layer, which)[:, :, src_layer.length - used : src_layer.length]
                if source is not None:
                    block = block.index_select(0, source)
                window = buf[:, :, width - used : width]
                if isinstance(target, int):
                    window[target : target + block.shape[0]] = block
                else:
                    window.index_copy_(0, target, block)
            buf[:, :, :width].masked_fill_(pad, 0)
            bufs.append(buf)
        layer.adopt(bufs[0], bufs[1], width)
    return merged
