"""Gathered multi-LoRA: many PEFT LoRA adapters served at once over one frozen base model.

Each target Linear keeps, for every adapter slot, its A [r_max, in] and scaled B^T
[r_max, out] stacked in one tensor (punica / S-LoRA style). A forward hook adds
    y[t] += (x[t] @ A[slot(t)]^T) @ B[slot(t)]^T * scale[slot(t)]
for every token t whose row uses an adapter. Tokens are grouped by slot and padded to the
largest group, so a whole batch costs two `bmm` per module whatever the adapter mix; rows
with no adapter are simply in no group. Ranks below r_max are zero-padded (exact).
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .adapter import AdapterError
from .models import LoadedModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# PEFT options that change the computation beyond y += B A x * scale; refused rather than served wrong.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "modules_to_save": "modules_to_save",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on parameters",
    "lora_bias": "LoRA bias",
}


class AdapterMismatch(AdapterError):
    """An adapter folder cannot be served on this model; the message names the module or option."""


@dataclass
class LoraWeights:
    """One PEFT LoRA adapter read from disk, checked against a model, ready to install in a bank."""

    modules: dict[str, tuple[Tensor, Tensor]]
    """Base-model module name -> (A [r, in], B^T * scale [r, out]) on the model's device and dtype."""
    rank: int
    """Largest rank over the modules."""
    config: dict
    """The adapter_config.json as written by PEFT."""

    @property
    def num_parameters(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.modules.values())


def read_lora(folder: Path | str, model: LoadedModel) -> LoraWeights:
    """Read a PEFT LoRA folder and check every module name and shape against `model`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise AdapterMismatch(f"{folder} is not a PEFT adapter folder (no {CONFIG_FILE})") from None
    except json.JSONDecodeError as exc:
        raise AdapterMismatch(f"{folder / CONFIG_FILE}: invalid JSON ({exc})") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterMismatch(f"adapter {folder.name}: peft_type {config.get('peft_type')!r} is not LORA")
    for option, what in _UNSUPPORTED.items():
        if config.get(option):
            raise AdapterMismatch(f"adapter {folder.name}: {what} ({option}) is not supported by the serving engine")
    if config.get("bias", "none") != "none":
        raise AdapterMismatch(f"adapter {folder.name}: bias={config['bias']!r} is not supported (only 'none')")
    if not (folder / WEIGHTS_FILE).is_file():
        raise AdapterMismatch(f"adapter {folder.name}: no {WEIGHTS_FILE} (only safetensors adapters are served)")
    tensors = load_file(str(folder / WEIGHTS_FILE), device="cpu")

    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY_RE.match(key)
        if not match:
            raise AdapterMismatch(f"adapter {folder.name}: unexpected tensor {key!r} (only lora_A/lora_B of Linear layers are served)")
        pairs.setdefault(match["module"], {})[match["ab"]] = value
    if not pairs:
        raise AdapterMismatch(f"adapter {folder.name}: {WEIGHTS_FILE} holds no LoRA weights")

    base_modules = dict(model.base.named_modules())
    alpha, use_rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora", False))
    alpha_pattern = config.get("alpha_pattern") or {}
    device, dtype = model.device, model.dtype
    modules = {}
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterMismatch(f"adapter {folder.name}: module {name} has lora_{''.join(ab)} but not both A and B")
        target = base_modules.get(name)
        if not isinstance(target, nn.Linear):
            what = "does not exist" if target is None else f"is a {type(target).__name__}, not a Linear"
            raise AdapterMismatch(f"adapter {folder.name}: module {name} {what} in model {model.name}")
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != target.in_features or b.shape != (target.out_features, r):
            raise AdapterMismatch(
                f"adapter {folder.name}: module {name} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, "
                f"model {model.name} needs [r, {target.in_features}] / [{target.out_features}, r]"
            )
        # PEFT's per-module alpha (alpha_pattern keys match a module-name suffix); rank comes from the tensors.
        module_alpha = next((float(v) for k, v in alpha_pattern.items() if re.match(rf"(.*\.)?({k})$", name)), alpha)
        scale = module_alpha / (math.sqrt(r) if use_rslora else r)
        a = a.to(device=device, dtype=dtype).contiguous()
        b_t = (b.float() * scale).t().to(device=device, dtype=dtype).contiguous()
        modules[name] = (a, b_t)
    return LoraWeights(modules=modules, rank=max(a.shape[0] for a, _ in modules.values()), config=config)


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


class _ModuleStack:
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


class LoraBank:
    """Adapter slots over one model: install/clear weights per slot, route rows to slots per forward.

    Hooks are added to a Linear the first time an installed adapter targets it and removed by
    `close()`. Routing is thread-local: only the thread that set it sees adapters applied, so
    other users of the same model (with no routing) get the plain base output. A routed forward
    holds the bank's lock, so an install (on the loader thread) waits at most one step.
    """

    def __init__(self, model: LoadedModel, capacity: int):
        if capacity < 1:
            raise ValueError(f"adapter capacity must be at least 1, got {capacity}")
        if hasattr(model.model, "peft_config"):
            raise ValueError(f"model {model.name} is wrapped by PEFT; serve the plain base model (adapters are routed per row)")
        self.model = model
        self.capacity = capacity
        self.rank = 0
        self._stacks: dict[str, _ModuleStack] = {}
        self._hooks: list = []
        self._linears = {name: m for name, m in model.base.named_modules() if isinstance(m, nn.Linear)}
        self._local = threading.local()
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- slots

    def install(self, slot: int, weights: LoraWeights) -> None:
        """Write an adapter into `slot`; the slot must not be routed to by a running forward."""
        if not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot} out of range 0..{self.capacity - 1}")
        # Under the routing lock: a forward never sees a stack half-grown. Inference tensors throughout,
        # so later in-place writes are legal whichever thread (and mode) installs.
        with self._lock, torch.inference_mode():
            if weights.rank > self.rank:
                for stack in self._stacks.values():
                    stack.grow_rank(weights.rank)
                self.rank = weights.rank
            for name in weights.modules:
                if name not in self._stacks:
                    self._add_module(name)
            for name, stack in self._stacks.items():
                stack.a[slot].zero_()
                stack.b[slot].zero_()
                if name in weights.modules:
                    a, b_t = weights.modules[name]
                    stack.a[slot, : a.shape[0]] = a
                    stack.b[slot, : b_t.shape[0]] = b_t

    def _add_module(self, name: str) -> None:
        linear = self._linears[name]
        stack = _ModuleStack(linear, self.capacity, self.rank)
        self._hooks.append(linear.register_forward_hook(self._hook_for(stack)))
        # Publish the stack only after its hook exists; a forward in flight sees either none or both.
        self._stacks = {**self._stacks, name: stack}

    def _hook_for(self, stack: _ModuleStack):
        def hook(module: nn.Linear, args: tuple, out: Tensor) -> Tensor:
            routing = getattr(self._local, "routing", None)
            if routing is None:
                return out
            add_lora_(out, args[0], stack, routing)
            return out

        return hook

    @property
    def modules(self) -> list[str]:
        return sorted(self._stacks)

    # ---------------------------------------------------------------- routing

    def route(self, row_slots: list[int], seq_len: int) -> "_RouteScope":
        """`with bank.route(slots, seq_len): model(...)` applies slot `row_slots[i]` to row i."""
        return _RouteScope(self, make_routing(row_slots, seq_len, self.model.device, self.model.dtype))

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._stacks = {}


def add_lora_(out: Tensor, x: Tensor, stack: _ModuleStack, routing: Routing) -> None:
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


class _RouteScope:
    def __init__(self, bank: LoraBank, routing: Routing | None):
        self.bank, self.routing = bank, routing

    def __enter__(self) -> Routing | None:
        self.bank._lock.acquire()  # installs wait for the end of this forward
        self.bank._local.routing = self.routing
        return self.routing

    def __exit__(self, *exc) -> None:
        self.bank._local.routing = None
        self.bank._lock.release()

