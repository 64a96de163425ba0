"""Helpers for Stage II tests: skills made from real sparsify SparseCoders, committed to a real store."""

from __future__ import annotations

from pathlib import Path

from resa_engine.data import QARow, dataset_sha256, rows_to_jsonl
from resa_engine.artifacts import Skill, sae_subdir


def make_skill(
    store,
    name: str,
    folder: Path,
    *,
    d_in: int = 64,
    layers: tuple[int, ...] = (1,),
    default_layer: int | None = None,
    rows: list[QARow] | None = None,
    source: str = "tiny-llama",
    num_latents: int = 256,
    k: int = 8,
    seed: int = 0,
) -> Skill:
    """A skill of randomly initialised TopK SAEs (one per layer), committed with its dataset."""
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    folder.mkdir(parents=True, exist_ok=True)
    for i, layer in enumerate(layers):
        torch.manual_seed(seed + i)
        sae = SparseCoder(d_in, SparseCoderConfig(num_latents=num_latents, k=k))
        sae.save_to_disk(folder / sae_subdir(layer))
    dataset = {"sha256": "0" * 64, "rows": 0}
    if rows is not None:
        info = store.put_dataset(rows_to_jsonl(rows), len(rows))
        dataset = {"sha256": info.sha256, "rows": len(rows)}
        assert info.sha256 == dataset_sha256(rows)
    manifest = {
        "name": name,
        "layers": list(layers),
        "default_layer": layers[0] if default_layer is None else default_layer,
        "d_in": d_in,
        "source": {"model": source, "sha256": "f" * 64},
        "dataset": dataset,
    }
    store.commit("skill", (name,), folder, manifest)
    return Skill(name, store.manifest("skill", (name,)), store.fetch("skill", (name,)))


def lora_b_by_layer(adapter_dir: Path) -> dict[int, float]:
    """Largest |B| entry of the LoRA pairs in each decoder layer of a saved adapter."""
    from safetensors.torch import load_file

    out: dict[int, float] = {}
    for key, tensor in load_file(str(Path(adapter_dir) / "adapter_model.safetensors")).items():
        if ".lora_B." in key:
            layer = int(key.split(".layers.")[1].split(".")[0])
            out[layer] = max(out.get(layer, 0.0), float(tensor.abs().max()))
    return out


def random_adapter(model, out_dir: Path, *, seed: int = 0, scale: float = 0.05, r: int = 8) -> Path:
    """A LoRA adapter with random (non-zero) B for `model`, saved as a PEFT folder with a manifest."""
    import json

    import torch

    from resa_engine.tune import LoraSettings, add_lora, remove_lora

    peft_model = add_lora(model, LoraSettings(r=r, alpha=2 * r), seed=seed)
    try:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
        peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)
    finally:
        remove_lora(model, peft_model)
    (Path(out_dir) / "README.md").unlink(missing_ok=True)
    manifest = {"skill": "random", "target": {"model": model.name, "sha256": model.sha256}}
    (Path(out_dir) / "manifest.json").write_text(json.dumps(manifest))
    return Path(out_dir)
