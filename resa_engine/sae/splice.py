"""The SAE splice, the one place its math lives (paper §3):

    x  ->  code = TopK(encode(x))  ->  code' = edit(code)  ->  decode(code')  [+ (x - decode(code))]

- Stage II's student: block i's output replaced by decode(encode(x)) (no edits, no error term);
- splice mode at inference: the same, optionally with latent edits;
- steering: with the reconstruction error kept, so no edits leave x exactly as it is.

The decoder is linear, so decode(code') = decode(code) + sum_j (new_j - old_j) * W_dec[j] over the
edited latents j (old_j: j's activation in the top-k, else 0). Edits are applied that way: only the
edited latents' decoder rows are read, and steering never decodes the whole code.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from .edits import LatentEdit, check_edits
from .hooks import replace_block_output


def encode(sae, x: Tensor) -> tuple[Tensor, Tensor]:
    """TopK (activations, latent indices) of x [..., d_in], each [..., k], in the SAE's dtype."""
    flat = x.to(sae.device, sae.dtype).reshape(-1, x.shape[-1])  # sparsify's coder takes [tokens, d_in]
    top_acts, top_indices, _ = sae.encode(flat)
    shape = (*x.shape[:-1], -1)
    return top_acts.view(shape), top_indices.view(shape)


def splice(sae, x: Tensor, edits: Sequence[LatentEdit] = (), *, keep_error: bool = False) -> Tensor:
    """decode(edit(encode(x))), plus the reconstruction error x - decode(encode(x)) with `keep_error`.
    Same shape and dtype as x; differentiable through the SAE when grad is enabled."""
    h = x.to(sae.dtype).reshape(-1, x.shape[-1])
    needs_code = not keep_error or any(e.mode != "add" for e in edits)
    if needs_code:
        top_acts, top_indices, _ = sae.encode(h)
    out = h if keep_error else sae.decode(top_acts, top_indices)
    if edits:
        latents = torch.tensor([e.latent for e in edits], dtype=torch.long, device=h.device)
        if needs_code:
            # old[t, j]: latent j's activation at token t if in its top-k, else 0 (TopK indices are distinct).
            old = ((top_indices[:, :, None] == latents[None, None, :]) * top_acts[:, :, None]).sum(1)
        else:
            old = h.new_zeros(h.shape[0], len(edits))
        delta = torch.stack([e.new_activation(old[:, j]) - old[:, j] for j, e in enumerate(edits)], dim=1)
        out = out + delta @ sae.W_dec[latents]
    return out.view(x.shape).to(x.dtype)


@dataclass(eq=False)
class SaeSplice:
    """One request's SAE at one block: steering (`keep_error`, the default) or splice mode, with edits.

    `apply(x)` maps that block's output for this request's tokens; an empty steering returns x
    itself, so rows that ask for nothing pay nothing."""

    sae: object = field(repr=False)
    layer: int
    edits: list[LatentEdit] = field(default_factory=list)
    keep_error: bool = True
    folder: str | None = None
    """The skill's verified local folder, for engines that load the SAE themselves (vLLM's workers)."""

    def __post_init__(self):
        self.layer = int(self.layer)
        self.edits = check_edits(self.edits, num_latents=int(self.sae.num_latents))
        if self.sae.W_dec is None:
            raise ValueError("the SAE has no decoder weights")

    @property
    def mode(self) -> str:
        return "steer" if self.keep_error else "splice"

    @property
    def is_identity(self) -> bool:
        return self.keep_error and not self.edits

    @torch.no_grad()
    def apply(self, x: Tensor) -> Tensor:
        if self.is_identity:
            return x
        return splice(self.sae, x, self.edits, keep_error=self.keep_error)

    def spec(self) -> dict:
        """This splice as plain JSON, rebuilt elsewhere (engine/vllm/plugin.py) into the same SaeSplice."""
        if self.folder is None:
            raise ValueError("this SAE has no skill folder to send to the engine's workers")
        return {"folder": str(self.folder), "layer": self.layer, "keep_error": self.keep_error, "edits": [[e.latent, e.mode, e.value] for e in self.edits]}


@contextmanager
def splice_sae(
    layers: nn.ModuleList,
    layer: int,
    sae,
    *,
    grad: bool = False,
    edits: Sequence[LatentEdit] = (),
    keep_error: bool = False,
    rows: Tensor | None = None,
) -> Iterator[None]:
    """Block `layer`'s output goes through `splice` for the duration of a forward.

    grad=False is the authors' code: the splice runs under no_grad, so no gradient reaches
    blocks <= layer. `rows` (bool [batch]) limits the splice to some rows of the batch.
    """
    edits = check_edits(edits)

    def fn(x: Tensor) -> Tensor:
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            new = splice(sae, x, edits, keep_error=keep_error)
        if rows is not None:
            new = torch.where(rows.view(-1, *([1] * (x.dim() - 1))), new, x)
        return new

    with replace_block_output(layers, layer, fn):
        yield
