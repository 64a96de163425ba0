"""Shared by the SAE and transparency tests: seeded (untrained) sparsify SAEs, prompt ids, and the SAE
code of a block output as the splice sees it."""

from __future__ import annotations

from pathlib import Path

import torch


def seeded_sae(d_in: int = 64, *, num_latents: int = 128, k: int = 8, seed: int = 0):
    """A frozen, randomly initialised sparsify SparseCoder (what a splice computes depends only on its weights)."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(seed)
    coder = SparseCoder(d_in, SparseCoderConfig(num_latents=num_latents, k=k))
    coder.requires_grad_(False)
    return coder.eval()


def lens_skill_folder(folder: Path, layer: int = 1, *, seed: int = 1) -> Path:
    """A skill folder holding one seeded SAE at `layer` (a skill for steering tests), ready to commit."""
    from resa_engine.artifacts import sae_subdir

    seeded_sae(seed=seed).save_to_disk(folder / sae_subdir(layer))
    return folder


def prompt_tensor(model, text: str) -> torch.Tensor:
    return torch.tensor([model.tokenizer(text, add_special_tokens=False)["input_ids"]])


def block_code(model, sae, ids: torch.Tensor, layer: int):
    """Block `layer`'s output for `ids` and its SAE top-k code (acts, indices)."""
    from resa_engine.sae.hooks import run_until

    h = run_until(model.model, ids, model.layers, [layer])[layer]
    acts, indices, _ = sae.encode(h)
    return h, acts, indices
