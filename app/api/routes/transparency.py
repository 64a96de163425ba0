"""Transparency: what a skill's SAE encodes (paper §5), read off the SAE that carries the skill.

POST /skills/{name}/inspect         the strongest latents on each token of a prompt, on a loaded model
GET  /skills/{name}/latents/{index} a latent's card: density, mean activation, top contexts
GET  /skills/{name}/report          per-layer FVU, dead fraction, loss recovered, reasoning features
Cards and reasoning-feature counts are computed at extraction and stored with the skill;
only `inspect` runs a model (the API process's own, under its lock, adapters disabled).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response

from app.api.deps import CatalogDep, GenerateAccess, GenerationDep, ReadAccess, SettingsDep, StoreDep
from app.api.errors import Conflict, Invalid, NotFound, TooLarge
from app.api.schemas import InspectRequest, InspectResponse, LatentCardView, LayerReport, error_responses

router = APIRouter(tags=["transparency"], responses=error_responses(401, 403, 422))
IMAGE_TYPES = {"png": "image/png", "svg": "image/svg+xml"}


def _sae_dir(layer: int) -> str:
    return f"sae/layers.{layer}"  # resa_engine.skill.sae_subdir, without importing torch here


def _layer(name: str, manifest: dict, layer: int | None) -> int:
    """The requested layer if the skill has an SAE there, else its default layer."""
    layers = [int(i) for i in manifest.get("layers") or []]
    if layer is None:
        return int(manifest["default_layer"])
    if layer not in layers:
        raise Invalid(f"skill {name!r} has no SAE at layer {layer} (layers: {layers})", type="invalid_layer")
    return layer


@router.post(
    "/skills/{name}/inspect",
    response_model=InspectResponse,
    summary="Top SAE latents of a skill on each token of a prompt",
    responses=error_responses(404, 409, 413, 503),
)
async def inspect(
    name: str, body: InspectRequest, _: GenerateAccess, store: StoreDep, catalog: CatalogDep, generation: GenerationDep, settings: SettingsDep
) -> dict:
    """Runs `model` up to the skill's layer on the prompt and encodes each token's residual with
    the skill's SAE. 404 unknown skill or model; 422 a layer the skill has no SAE at; 409 when
    the model's hidden size is not the SAE's width."""
    manifest = await asyncio.to_thread(store.manifest, "skill", (name,))
    catalog.spec(body.model)
    layer = _layer(name, manifest, body.layer)
    info = await asyncio.to_thread(catalog.describe, body.model)
    if int(manifest["d_in"]) != int(info.hidden_size):
        raise Conflict(
            f"skill {name!r} SAE width {manifest['d_in']} does not match {body.model} hidden size {info.hidden_size}",
            type="incompatible_skill",
        )
    sae = await asyncio.to_thread(_load_sae, store, name, manifest, layer)

    def run(model):
        from resa_engine.transparency import inspect_prompt

        n = len(model.tokenizer(body.prompt, add_special_tokens=False)["input_ids"])
        if n > settings.max_prompt_tokens:
            raise TooLarge(f"prompt is {n} tokens, over this server's limit of {settings.max_prompt_tokens}", type="prompt_too_long")
        try:
            return inspect_prompt(model, sae.to(model.device), layer, body.prompt, top_n=body.top)
        except ValueError as exc:  # ModelError included: the prompt or the SAE does not fit the model
            raise Invalid(str(exc)) from None

    tokens = await generation.run_on_base(body.model, run)
    return {"skill": name, "model": body.model, "layer": layer, "tokens": [t.to_dict() for t in tokens]}


def _load_sae(store, name: str, manifest: dict, layer: int):
    """The layer's SAE on the CPU, from a checksum-verified copy (moved to the model's device under its lock)."""
    from resa_engine.skill import Skill

    return Skill(name, store.fetch("skill", (name,)), manifest).sae(layer, device="cpu")


@router.get(
    "/skills/{name}/latents/{index}",
    response_model=LatentCardView,
    summary="One SAE latent's card: density, mean activation, top contexts",
    responses=error_responses(404, 409),
)
def latent_card(
    name: str,
    index: int,
    _: ReadAccess,
    store: StoreDep,
    layer: Annotated[int | None, Query(ge=0, description="SAE layer; default the skill's default layer.")] = None,
) -> dict:
    """From the cards computed at extraction over the skill's held-out data (`sae/layers.<i>/latents.json`).
    A dead latent has density 0 and no contexts. 404 when the skill has no cards; 422 an index out of range."""
    manifest = store.manifest("skill", (name,))
    layer = _layer(name, manifest, layer)
    rel = f"{_sae_dir(layer)}/latents.json"
    if rel not in (manifest.get("files") or {}):
        raise NotFound(f"skill {name!r} has no latent cards for layer {layer} (extracted without them)", type="no_latent_cards")
    folder = store.fetch("skill", (name,))  # verifies every file, latents.json included

    from resa_engine.transparency import load_cards

    try:
        cards = load_cards(folder / _sae_dir(layer))
    except ValueError as exc:
        raise Conflict(f"skill {name!r}: latent cards unreadable: {exc}", type="artifact_corrupt") from None
    try:
        card = cards.card(index)
    except ValueError as exc:
        raise Invalid(str(exc), type="invalid_latent") from None
    return {
        "skill": name,
        "layer": layer,
        "num_latents": cards.num_latents,
        "num_tokens": cards.num_tokens,
        **card.to_dict(),
    }


@router.get(
    "/skills/{name}/report",
    response_model=LayerReport,
    summary="Per-layer SAE quality and reasoning-feature counts (JSON, PNG or SVG)",
    responses={
        200: {"content": {"image/png": {}, "image/svg+xml": {}}, "description": "JSON, or the chart with `format=png|svg`."},
        **error_responses(404),
    },
)
def report(
    name: str,
    _: ReadAccess,
    store: StoreDep,
    fmt: Annotated[Literal["json", "png", "svg"], Query(alias="format", description="`json` (default), `png` or `svg`.")] = "json",
):
    """From the skill's manifest metrics alone (no model runs): which layer carries the skill best,
    and where the reasoning features are. A figure the manifest lacks is null."""
    from resa_engine.transparency import layer_report, render_report_png, render_report_svg

    manifest = store.manifest("skill", (name,))
    metrics = manifest.get("metrics") or {}
    counts = {
        int(layer): int(m["reasoning_features"])
        for layer, m in metrics.items()
        if isinstance(m, dict) and m.get("reasoning_features") is not None
    }
    data = layer_report(manifest, counts)
    data["skill"] = data.get("skill") or name
    if fmt == "json":
        return data
    render = render_report_png if fmt == "png" else render_report_svg
    with tempfile.TemporaryDirectory() as tmp:
        body = render(data, Path(tmp) / f"report.{fmt}").read_bytes()
    return Response(body, media_type=IMAGE_TYPES[fmt])
