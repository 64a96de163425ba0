"""The hookpoint: the residual stream after decoder block i (= `hidden_states[i+1]`).

Two uses, both as forward hooks on `model.layers[i]`:
- capture: read the block output (Stage I trains SAEs on it);
- splice: replace the block output by the SAE reconstruction (Stage II, paper §3),
  optionally with latent edits plus the reconstruction error (steering, so that no
  edit leaves the output unchanged).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn


class StopForward(Exception):
    """Raised by a capture hook to skip the layers after the deepest one captured."""


def _hidden(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, hidden: Tensor):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


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
            captured[i] = _hidden(output).detach()
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


LatentEdit = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""(top_acts, top_indices) -> edited (acts, indices); shapes [..., k'] each."""


def sae_reconstruct(sae, x: Tensor) -> Tensor:
    """Encode -> TopK -> decode, in the SAE's dtype, returned in x's dtype."""
    flat = x.to(sae.dtype).reshape(-1, x.shape[-1])  # sparsify's encoder/decoder take [tokens, d_in]
    top_acts, top_indices, _ = sae.encode(flat)
    return sae.decode(top_acts, top_indices).view(x.shape).to(x.dtype)


@contextmanager
def splice_sae(
    layers: nn.ModuleList,
    layer: int,
    sae,
    *,
    grad: bool = False,
    edit: LatentEdit | None = None,
    keep_error: bool = False,
    rows: Tensor | None = None,
) -> Iterator[None]:
    """Replace block `layer`'s output by the SAE reconstruction for the duration.

    grad=False is the authors' code: the splice runs under no_grad, so no gradient reaches
    blocks <= layer. With `keep_error` the output is decode(edit(encode(x))) + (x - decode(encode(x))),
    which equals x when there is no edit. `rows` (bool [batch]) limits the splice to some rows.
    """

    def hook(_module, _inputs, output):
        x = _hidden(output)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            h = x.to(sae.dtype).reshape(-1, x.shape[-1])  # sparsify's encoder/decoder take [tokens, d_in]
            top_acts, top_indices, _ = sae.encode(h)
            recon = sae.decode(top_acts, top_indices)
            if edit is not None:
                edited = sae.decode(*edit(top_acts, top_indices))
                recon = edited + (h - recon) if keep_error else edited
            elif keep_error:
                recon = h
            new = recon.view(x.shape).to(x.dtype)
        if rows is not None:
            new = torch.where(rows.view(-1, *([1] * (x.dim() - 1))), new, x)
        return _with_hidden(output, new)

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
