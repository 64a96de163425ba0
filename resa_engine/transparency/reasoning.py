"""Reasoning features (paper §5): latents that fire on the `<think>`/`</think>` tokens of a prompt
(default: the Resa system prompt) and on no other token of it. Counting them per layer shows
where reasoning lives."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data import SYSTEM_PROMPT
from ..models import LoadedModel
from .inspect import check_sae, encode_layer, token_text, tokenize

THINK_TAGS = ("<think>", "</think>")


@dataclass
class ReasoningFeatures:
    """Latents that fire on the think tags of a prompt and on no other token of it."""

    layer: int
    """Hookpoint layer of the SAE."""
    latents: list[int]
    """The reasoning features, ascending latent index."""
    think_positions: list[int]
    """Token positions whose character span overlaps a `<think>` or `</think>` occurrence."""
    tokens: list[str]
    """Every token of the prompt as text, for display."""

    @property
    def count(self) -> int:
        return len(self.latents)

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "latents": self.latents,
            "count": self.count,
            "think_positions": self.think_positions,
            "think_tokens": [self.tokens[p] for p in self.think_positions],
        }


def think_mask_from_offsets(text: str, offsets: list[tuple[int, int]], tags: tuple[str, ...] = THINK_TAGS) -> Tensor:
    """True at a token whose character span [start, end) overlaps an occurrence of a tag.

    Tokenizers split `<think>` into several pieces (`<`, `think`, `>` or ` </`, ...) and may glue a
    neighbouring space or newline onto a piece; every piece touching a tag counts, zero-width
    tokens never do.
    """
    spans = [(m.start(), m.end()) for tag in tags for m in re.finditer(re.escape(tag), text)]
    return torch.tensor([any(s < te and ts < e for ts, te in spans) for s, e in offsets], dtype=torch.bool)


def find_reasoning_latents(active: Tensor, think_mask: Tensor, num_latents: int | None = None) -> list[int]:
    """Latents active at one or more think positions and at no position outside them.

    active: BoolTensor [T, num_latents] (True = active), or an integer tensor [T, k] of top-k latent
    indices per token (negative entries are empty slots). think_mask: BoolTensor [T].
    """
    if think_mask.dim() != 1 or think_mask.dtype != torch.bool:
        raise ValueError("think_mask must be a BoolTensor [T]")
    if active.dim() != 2 or active.shape[0] != think_mask.shape[0]:
        raise ValueError(f"active must be [T, ...] with T = {think_mask.shape[0]}, got {tuple(active.shape)}")
    if active.dtype != torch.bool:
        if active.dtype.is_floating_point:
            raise ValueError("active must be a BoolTensor or an integer tensor of latent indices")
        indices = active.long()
        size = num_latents if num_latents is not None else int(indices.max().clamp(min=-1)) + 1
        dense = torch.zeros(indices.shape[0], size + 1, dtype=torch.bool, device=indices.device)
        # Empty slots (negative) land in an extra column that is dropped.
        dense.scatter_(1, torch.where(indices < 0, size, indices), True)
        active = dense[:, :size]
    think_mask = think_mask.to(active.device)
    inside = active[think_mask].any(0)
    outside = active[~think_mask].any(0)
    return torch.nonzero(inside & ~outside).flatten().tolist()


def reasoning_features(model: LoadedModel, sae, layer: int, text: str = SYSTEM_PROMPT) -> ReasoningFeatures:
    """Reasoning features of one layer's SAE on `text` (default: the Resa system prompt, paper §5)."""
    layer = check_sae(model, sae, layer)
    enc = tokenize(model, text, offsets=True)
    think = think_mask_from_offsets(text, [tuple(o) for o in enc["offset_mapping"]])
    if not think.any():
        raise ValueError("text has no <think> or </think> tag to look for reasoning features on")
    acts, indices = encode_layer(model, sae, layer, torch.tensor([enc["input_ids"]], dtype=torch.long))
    active_indices = torch.where(acts[0] > 0, indices[0], -1).cpu()
    latents = find_reasoning_latents(active_indices, think, num_latents=int(sae.num_latents))
    tokens = [token_text(model.tokenizer, t) for t in enc["input_ids"]]
    return ReasoningFeatures(layer=layer, latents=latents, think_positions=torch.nonzero(think).flatten().tolist(), tokens=tokens)


def count_reasoning_features(model: LoadedModel, saes: dict[int, object], text: str = SYSTEM_PROMPT) -> dict[int, int]:
    """Reasoning-feature count per layer, for `layer_report`: {layer: count}."""
    return {layer: reasoning_features(model, sae, layer, text).count for layer, sae in sorted(saes.items())}
