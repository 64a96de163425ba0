"""Adapter slots over one served model: install/clear LoRA weights per slot, route rows to slots per forward.

The math is in gathered.py; this is the state around it (stacks per Linear, forward hooks, the
thread-local routing of the current forward).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor, nn

from ..models import LoadedModel
from .gathered import ModuleStack, Routing, add_lora_, make_routing
from .peft_io import LoraWeights


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
        self._stacks: dict[str, ModuleStack] = {}
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
        stack = ModuleStack(linear, self.capacity, self.rank)
        self._hooks.append(linear.register_forward_hook(self._hook_for(stack)))
        # Publish the stack only after its hook exists; a forward in flight sees either none or both.
        self._stacks = {**self._stacks, name: stack}

    def _hook_for(self, stack: ModuleStack):
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

