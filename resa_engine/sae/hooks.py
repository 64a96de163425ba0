"""The hookpoint: the residual stream after decoder block i (= `hidden_states[i+1]`).

Every use of it is a forward hook on `model.layers[i]`, set up here: capture the block's
output (Stage I trains SAEs on it), stop the forward after the deepest captured block,
or replace the output by a function of it (the SAE splice, steering, zero-ablation).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn


class StopForward(Exception):
    """Raised by a capture hook to skip the layers after the deepest one captured."""


def block_hidden(output) -> Tensor:
    """The hidden state in a decoder block's output (a tensor, or a tuple led by one)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output, hidden: Tensor):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def replace_block_output(layers: nn.ModuleList, layer: int, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """For the duration, block `layer`'s output hidden state h becomes fn(h)."""

    def hook(_module, _inputs, output):
        return with_hidden(output, fn(block_hidden(output)))

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def zero_ablate(layers: nn.ModuleList, layer: int) -> Iterator[None]:
    """Block `layer`'s output replaced by zeros: the floor of loss recovered."""
    with replace_block_output(layers, layer, torch.zeros_like):
        yield


@contextmanager
def capture_residual(layers: nn.ModuleList, indices: list[int], *, stop_after: bool = False) -> Iterator[dict[int, Tensor]]:
    """Collect block outputs of `indices` into a dict during a forward pass.

    With `stop_after`, the forward is cut after the deepest block (the caller catches
    `StopForward`): extraction then never pays for the layers above its hookpoints.
    """
    captured: dict[int, Tensor] = {}
    deepest = max(indices)

    def make_hook(i: int):
        def hook(_module, _inputs, output):
            captured[i] = block_hidden(output).detach()
            if stop_after and i == deepest:
                raise StopForward

        return hook

    handles = [layers[i].register_forward_hook(make_hook(i)) for i in sorted(set(indices))]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def run_until(model, input_ids: Tensor, layers: nn.ModuleList, indices: list[int], attention_mask: Tensor | None = None) -> dict[int, Tensor]:
    """Residual streams at `indices` for one batch, running only as far as the deepest one."""
    with capture_residual(layers, indices, stop_after=True) as captured:
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
    return captured


@contextmanager
def per_row_block_hooks(layers: nn.ModuleList, items: list[tuple[int, int, Callable[[Tensor], Tensor]]]) -> Iterator[None]:
    """For the duration, row `row` of block `layer`'s output h becomes fn(h[row]), for each (row, layer, fn):
    one hook per layer, each row's function applied to its own slice (rows of a batch ask for different things)."""
    by_layer: dict[int, list[tuple[int, Callable]]] = {}
    for row, layer, fn in items:
        by_layer.setdefault(layer, []).append((row, fn))

    def make_hook(fns):
        def hook(_module, _inputs, output):
            hidden = block_hidden(output).clone()
            for row, fn in fns:
                hidden[row] = fn(hidden[row])
            return with_hidden(output, hidden)

        return hook

    handles = [layers[i].register_forward_hook(make_hook(fns)) for i, fns in by_layer.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
