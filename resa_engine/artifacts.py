"""Skills and adapters as metadata: manifests, the SAE folder layout, and the layer and width rules.

Importable without torch, so the API process checks a request against a skill (layer present,
SAE width = the model's hidden size, layer in range) with the very code the engine uses.

  <skill>/manifest.json + sae/layers.<i>/{cfg.json, sae.safetensors, latents.json}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ManifestError, SkillError


def sae_subdir(layer: int) -> str:
    """Where one layer's SAE lives in a skill folder (sparsify's layout)."""
    return f"sae/layers.{layer}"


def _int(value: Any, what: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(f"skill {name!r}: manifest field {what} must be an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class Skill:
    """A stored skill: its manifest, read once and checked for shape, and (when fetched) its folder."""

    name: str
    manifest: dict = field(repr=False)
    folder: Path | None = None
    """The checksum-verified local folder; None when only the manifest was read."""

    def __post_init__(self):
        m = self.manifest
        if not isinstance(m, dict):
            raise ManifestError(f"skill {self.name!r}: manifest is a JSON {type(m).__name__}, not an object")
        layers = m.get("layers")
        if not isinstance(layers, list) or not layers:
            raise ManifestError(f"skill {self.name!r}: manifest has no `layers` list")
        for i in layers:
            _int(i, "layers[]", self.name)
        if _int(m.get("default_layer"), "default_layer", self.name) not in layers:
            raise ManifestError(f"skill {self.name!r}: default_layer {m['default_layer']} is not one of its layers {layers}")
        if _int(m.get("d_in"), "d_in", self.name) < 1:
            raise ManifestError(f"skill {self.name!r}: d_in must be positive")

    @property
    def layers(self) -> list[int]:
        return [int(i) for i in self.manifest["layers"]]

    @property
    def default_layer(self) -> int:
        return int(self.manifest["default_layer"])

    @property
    def d_in(self) -> int:
        """Width of the residual stream the SAEs read."""
        return int(self.manifest["d_in"])

    @property
    def num_latents(self) -> int | None:
        sae = self.manifest.get("sae")
        value = sae.get("num_latents") if isinstance(sae, dict) else None
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def version(self) -> str:
        """Changes whenever the skill is replaced: part of every cache key of its SAEs."""
        return str(self.manifest.get("version") or self.manifest.get("created_at", ""))

    def layer(self, layer: int | None = None) -> int:
        """The requested layer if the skill has an SAE there; None: the default layer."""
        if layer is None:
            return self.default_layer
        if layer not in self.layers:
            raise SkillError(f"skill {self.name!r} has no SAE at layer {layer} (layers: {self.layers})")
        return layer

    def check_fits(self, model_name: str, hidden_size: int, num_layers: int, layer: int | None = None) -> int:
        """The SAE must read this model's residual stream: same width, layer in range. Returns the layer."""
        layer = self.layer(layer)
        if self.d_in != hidden_size:
            raise SkillError(f"skill {self.name!r} SAE width {self.d_in} does not match {model_name} hidden size {hidden_size}")
        if not 0 <= layer < num_layers:
            raise SkillError(f"layer {layer} is out of range for {model_name} ({num_layers} layers; skill {self.name!r})")
        return layer

    def sae(self, layer: int | None = None, *, device="cpu"):
        """The frozen SparseCoder of one layer, loaded with sparsify's own loader (imports torch)."""
        from .sae.load import load_sae

        if self.folder is None:
            raise SkillError(f"skill {self.name!r} has no local folder to load SAEs from")
        return load_sae(self.folder / sae_subdir(self.layer(layer)), device=device)
