"""A skill as the engine sees it: a folder of per-layer SAEs (sparsify format) plus its manifest.

  <folder>/sae/layers.<i>/cfg.json + sae.safetensors
The manifest (written by extraction, committed last by the store) records the layers,
the default layer, the source model and every hyperparameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .models import LoadedModel, ModelError


def sae_subdir(layer: int) -> str:
    return f"sae/layers.{layer}"


@dataclass
class Skill:
    name: str
    folder: Path
    manifest: dict

    @property
    def layers(self) -> list[int]:
        return [int(i) for i in self.manifest["layers"]]

    @property
    def default_layer(self) -> int:
        return int(self.manifest["default_layer"])

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    def layer_or_default(self, layer: int | None) -> int:
        if layer is None:
            return self.default_layer
        if layer not in self.layers:
            raise ModelError(f"skill {self.name!r} has no SAE at layer {layer} (layers: {self.layers})")
        return layer

    def sae(self, layer: int | None = None, *, device: torch.device | str = "cpu"):
        """The frozen SparseCoder of one layer, loaded with sparsify's own loader."""
        from sparsify import SparseCoder

        layer = self.layer_or_default(layer)
        sae = SparseCoder.load_from_disk(self.folder / sae_subdir(layer), device=device)
        sae.requires_grad_(False)
        return sae.eval()

    def check_target(self, model: LoadedModel, layer: int | None = None) -> int:
        """The SAE must read this model's residual stream: same width, layer in range."""
        layer = self.layer_or_default(layer)
        if self.d_in != model.hidden_size:
            raise ModelError(
                f"skill {self.name!r} SAE width {self.d_in} does not match {model.name} hidden size {model.hidden_size}"
            )
        return model.check_layer(layer)
