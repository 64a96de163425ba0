"""Which SAE latents fire on each token of a prompt (paper §5), and the pieces every transparency
view shares: checking an SAE against a model, tokenizing as in training, encoding a layer.

A latent is *active* at a token when it is among the SAE's top-k there with a positive
activation (TopK SAEs rarely keep a zero in the top-k; a zero would decode to nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ModelError
from ..models import LoadedModel
from ..sae.hooks import run_until
from ..sae.splice import encode

def check_sae(model: LoadedModel, sae, layer: int) -> int:
    """The SAE must read this model's residual stream at a layer the model has."""
    layer = model.check_layer(layer)
    if int(sae.d_in) != model.hidden_size:
        raise ModelError(f"SAE width {sae.d_in} does not match {model.name} hidden size {model.hidden_size}")
    return layer


def tokenize(model: LoadedModel, text: str, *, offsets: bool = False):
    """Prompt tokens as the SAE saw them in training: no special tokens added (data.TriggerDataset)."""
    if not isinstance(text, str) or not text:
        raise ValueError("text to inspect is empty")
    tok = model.tokenizer
    if offsets and not getattr(tok, "is_fast", False):
        raise ValueError(f"tokenizer of {model.name} gives no character offsets (needs a fast tokenizer)")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=offsets)
    if not enc["input_ids"]:
        raise ValueError("text to inspect has no tokens")
    return enc


@torch.no_grad()
def encode_layer(model: LoadedModel, sae, layer: int, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Top-k (acts, indices) of the SAE on block `layer`'s output, float32 acts, shapes [B, T, k]."""
    resid = run_until(model.model, input_ids.to(model.device), model.layers, [layer])[layer]
    top_acts, top_indices = encode(sae, resid)
    return top_acts.float(), top_indices


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


@dataclass
class TokenLatents:
    """The strongest latents at one prompt token."""

    token: str
    """The token as text (decoded on its own)."""
    token_id: int
    """Vocabulary id of the token."""
    position: int
    """0-based position in the prompt."""
    latents: list[tuple[int, float]]
    """(latent index, activation) pairs, strongest first; only active latents (activation > 0)."""

    def to_dict(self) -> dict:
        return {
            "token": self.token,
            "token_id": self.token_id,
            "position": self.position,
            "latents": [{"index": i, "activation": a} for i, a in self.latents],
        }


def inspect_prompt(model: LoadedModel, sae, layer: int, text: str, top_n: int = 8) -> list[TokenLatents]:
    """For each token of `text`, the `top_n` strongest active latents of the SAE at `layer`."""
    if top_n < 1:
        raise ValueError(f"top_n must be at least 1, got {top_n}")
    layer = check_sae(model, sae, layer)
    ids = tokenize(model, text)["input_ids"]
    acts, indices = encode_layer(model, sae, layer, torch.tensor([ids], dtype=torch.long))
    acts, order = acts[0].sort(dim=-1, descending=True)
    indices = indices[0].gather(-1, order)
    out = []
    for pos, token_id in enumerate(ids):
        pairs = [(int(i), float(a)) for a, i in zip(acts[pos, :top_n].tolist(), indices[pos, :top_n].tolist()) if a > 0]
        out.append(TokenLatents(token_text(model.tokenizer, token_id), int(token_id), pos, pairs))
    return out
