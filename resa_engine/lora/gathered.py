"""Gathered multi-LoRA: many LoRA adapters applied at once over one frozen base model (punica /
S-LoRA style), the math of it.

Each target Linear keeps, for every adapter slot, its A [r_max, in] and scaled B^T [r_max, out]
stacked in one tensor. For every token t whose row uses an adapter,
    y[t] += (x[t] @ A[slot(t)]^T) @ B[slot(t)]^T * scale[slot(t)]
Tokens are grouped by slot and padded to the largest group, so a whole batch costs two `bmm` per
module whatever the adapter mix; rows with no adapter are simply in no group. Ranks below r_max
are zero-padded (exact).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class Routing(NamedTuple):
    """Which tokens of the current forward use which slot, shared by every hooked module."""

    slots: Tensor
    """[k] slot ids present, ascending."""
    span: tuple[int, int] | None
    """(lo, hi) when `slots` is exactly lo..hi-1, so the stacks are sliced instead of gathered."""
    groups: int
    width: int
    """Tokens per group (the largest group; smaller ones are padded)."""
    start: int
    """Dense layout only: the routed tokens are [start, start + groups * width), group after group."""
    tokens: Tensor | None
    """[k * m] token index (into the flattened batch x seq) of each group member; padding points at
    token 0. None for the dense layout, where slices replace gathers."""
    valid: Tensor | None
    """[k, m, 1] 1 for real members, 0 for padding; None when no group is padded."""


def make_routing(row_slots: list[int], seq_len: int, device: torch.device, dtype: torch.dtype) -> Routing | None:
    """Group the tokens of a [rows, seq_len] forward by adapter slot (-1: no adapter)."""
    members: dict[int, list[int]] = {}
    for row, slot in enumerate(row_slots):
        if slot >= 0:
            members.setdefault(slot, []).extend(range(row * seq_len, (row + 1) * seq_len))
    if not members:
        return None
    slots = sorted(members)
    width = max(len(v) for v in members.values())
    span = (slots[0], slots[-1] + 1) if slots[-1] - slots[0] + 1 == len(slots) else None
    order = [t for slot in slots for t in members[slot]]
    start = order[0]
    common = dict(slots=torch.tensor(slots, device=device), span=span, groups=len(slots), width=width, start=start)
    if order == list(range(start, start + len(order))) and len(order) == width * len(slots):
        # Rows sorted by slot, equal groups (the scheduler keeps its batch sorted): no gather, no padding.
        return Routing(**common, tokens=None, valid=None)
    tokens = torch.zeros(len(slots), width, dtype=torch.long)
    valid = torch.zeros(len(slots), width, 1)
    for g, slot in enumerate(slots):
        n = len(members[slot])
        tokens[g, :n] = torch.tensor(members[slot])
        valid[g, :n] = 1
    padded = bool((valid == 0).any())
    return Routing(**common, tokens=tokens.view(-1).to(device), valid=valid.to(device=device, dtype=dtype) if padded else None)


class ModuleStack:
    """Stacked LoRA factors of one Linear for every slot: A [slots, r, in], B^T*scale [slots, r, out]."""

    def __init__(self, linear: nn.Linear, capacity: int, rank: int):
        w = linear.weight
        self.a = torch.zeros(capacity, rank, linear.in_features, device=w.device, dtype=w.dtype)
        self.b = torch.zeros(capacity, rank, linear.out_features, device=w.device, dtype=w.dtype)

    def grow_rank(self, rank: int) -> None:
        # Zero columns of A / rows of B add nothing, so padding every slot to the new rank is exact.
        a = self.a.new_zeros(self.a.shape[0], rank, self.a.shape[2])
        b = self.b.new_zeros(self.b.shape[0], rank, self.b.shape[2])
        a[:, : self.a.shape[1]] = self.a
        b[:, : self.b.shape[1]] = self.b
        self.a, self.b = a, b

    def factors(self, routing: Routing) -> tuple[Tensor, Tensor]:
        if routing.span is not None:
            lo, hi = routing.span
            if lo == 0 and hi == self.a.shape[0]:
                return self.a, self.b
            return self.a[lo:hi], self.b[lo:hi]
        return self.a.index_select(0, routing.slots), self.b.index_select(0, routing.slots)


def add_lora_(out: Tensor, x: Tensor, stack: ModuleStack, routing: Routing) -> None:
    """out[t] += (x[t] @ A[slot(t)]^T) @ (B[slot(t)]^T * scale), in place, for every routed token t."""
    a, b = stack.factors(routing)
    g, w = routing.groups, routing.width
    if routing.tokens is None:
        # Dense layout: plain views (every token routed, e.g. a decode step with an adapter on every row).
        if routing.start == 0 and g * w * x.shape[-1] == x.numel():
            out.view(g, w, -1).baddbmm_(_down(a, x.reshape(g, w, -1)), b)
            return
        end = routing.start + g * w
        xs = x.reshape(-1, x.shape[-1])[routing.start : end].view(g, w, -1)
        out.view(-1, out.shape[-1])[routing.start : end].view(g, w, -1).baddbmm_(_down(a, xs), b)
        return
    flat = x.reshape(-1, x.shape[-1])
    flat_out = out.view(-1, out.shape[-1])
    h = _down(a, flat.index_select(0, routing.tokens).view(g, w, -1))
    if routing.valid is not None:
        h = h * routing.valid  # padding members contribute exact zeros
    flat_out.index_add_(0, routing.tokens, torch.bmm(h, b).view(-1, b.shape[-1]))


def _down(a: Tensor, xs: Tensor) -> Tensor:
    """[g, w, in] x [g, r, in] -> [g, w, r], as (A @ x^T)^T: A in PEFT's own [r, in] layout streams
    best through the small-row GEMMs of decoding (a few rows per adapter)."""
    return torch.bmm(a, xs.transpose(1, 2)).transpose(1, 2)


