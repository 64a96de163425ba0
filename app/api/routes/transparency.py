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
from app.api.schemas import InspectRequest, InspectResponse, LatentCardView, LatentList, LayerReport, error_responses
from resa_engine.artifacts import Skill, sae_subdir
from resa_engine.errors import SkillError

router = APIRouter(tags=["transparency"], responses=error_responses(401, 403, 422))
IMAGE_TYPES = {"png": "image/png", "svg": "image/svg+xml"}


def _skill(store, name: str) -> Skill:
    """The stored skill's metadata (a manifest of the wrong shape is a 409, like any corrupt artifact)."""
    return Skill(name, store.manifest("skill", (name,)))


def _layer(skill: Skill, layer: int | None) -> int:
    """The requested layer if the skill has an SAE there, else its default layer."""
    try:
        return skill.layer(layer)
    except SkillError as exc:
        raise Invalid(str(exc), type="invalid_layer") from None


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
    skill = await asyncio.to_thread(_skill, store, name)
    catalog.spec(body.model)
    layer = _layer(skill, body.layer)
    info = await asyncio.to_thread(catalog.describe, body.model)
    try:
        skill.check_fits(body.model, info.hidden_size, info.num_layers, layer)
    except SkillError as exc:
        raise Conflict(str(exc), type="incompatible_skill") from None
    sae = await asyncio.to_thread(_load_sae, store, skill, layer)

    def run(model):
        from resa_engine.transparency.inspect import inspect_prompt

        n = len(model.tokenizer(body.prompt, add_special_tokens=False)["input_ids"])
        if n > settings.max_prompt_tokens:
            raise TooLarge(f"prompt is {n} tokens, over this server's limit of {settings.max_prompt_tokens}", type="prompt_too_long")
        try:
            return inspect_prompt(model, sae.to(model.device), layer, body.prompt, top_n=body.top)
        except ValueError as exc:  # ModelError included: the prompt or the SAE does not fit the model
            raise Invalid(str(exc)) from None

    tokens = await generation.run_on_base(body.model, run)
    return {"skill": name, "model": body.model, "layer": layer, "tokens": [t.to_dict() for t in tokens]}


def _load_sae(store, skill: Skill, layer: int):
    """The layer's SAE on the CPU, from a checksum-verified copy (moved to the model's device under its lock)."""
    return Skill(skill.name, skill.manifest, store.fetch("skill", (skill.name,))).sae(layer, device="cpu")


def _cards(store, name: str, layer: int | None):
    """(skill, layer, LatentCards) from the cards computed at extraction (`sae/layers.<i>/latents.json`)."""
    from resa_engine.transparency.cards import load_cards

    skill = _skill(store, name)
    layer = _layer(skill, layer)
    rel = f"{sae_subdir(layer)}/latents.json"
    if rel not in (skill.manifest.get("files") or {}):
        raise NotFound(f"skill {name!r} has no latent cards for layer {layer} (extracted without them)", type="no_latent_cards")
    folder = store.fetch("skill", (name,))  # verifies every file, latents.json included
    try:
        return skill, layer, load_cards(folder / sae_subdir(layer))
    except ValueError as exc:
        raise Conflict(f"skill {name!r}: latent cards unreadable: {exc}", type="artifact_corrupt") from None


LayerQuery = Annotated[int | None, Query(ge=0, description="SAE layer; default the skill's default layer.")]


@router.get(
    "/skills/{name}/latents",
    response_model=LatentList,
    summary="Browse and search a layer's latents: density, activation, top tokens, reasoning features",
    responses=error_responses(404, 409),
)
def list_latents(
    name: str,
    _: ReadAccess,
    store: StoreDep,
    layer: LayerQuery = None,
    sort: Annotated[Literal["density", "index", "activation"], Query(description="Order by firing density, index or mean activation.")] = "density",
    order: Annotated[Literal["desc", "asc"], Query()] = "desc",
    q: Annotated[str | None, Query(max_length=200, description="Only latents with this text (case-insensitive) in a top context.")] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict:
    """Live latents only (dead ones have no card); `density_histogram` is the layer's log10 density of live
    latents, whatever the filter. Reasoning features (paper §5) are marked."""
    skill, layer, cards = _cards(store, name, layer)
    metrics = (skill.manifest.get("metrics") or {}).get(str(layer)) or {}
    reasoning = set(metrics.get("reasoning_latents") or []) if isinstance(metrics, dict) else set()
    needle = q.casefold() if q else None
    found = [
        c for c in cards.cards.values()
        if needle is None or any(needle in f"{x.before}{x.token}{x.after}".casefold() for x in c.contexts)
    ]  # fmt: skip
    key = {"density": lambda c: (c.density, c.index), "index": lambda c: c.index, "activation": lambda c: (c.mean_activation, c.index)}[sort]
    found.sort(key=key, reverse=order == "desc")
    page = found[offset : offset + limit]
    return {
        "skill": name, "layer": layer, "num_latents": cards.num_latents, "num_tokens": cards.num_tokens, "live": cards.live,
        "sort": sort, "order": order, "q": q, "offset": offset, "limit": limit, "total": len(found),
        "latents": [
            {
                "index": c.index, "density": c.density, "mean_activation": c.mean_activation,
                "max_activation": max((x.activation for x in c.contexts), default=0.0),
                "top_tokens": list(dict.fromkeys(x.token for x in c.contexts))[:3], "reasoning": c.index in reasoning,
            }
            for c in page
        ],
        "density_histogram": _density_histogram([c.density for c in cards.cards.values()], cards.num_latents - cards.live),
    }  # fmt: skip


def _density_histogram(densities: list[float], dead: int, bins: int = 12) -> dict:
    """Counts of live latents by log10 density, in equal bins from the rarest to 1."""
    import math

    logs = [math.log10(d) for d in densities if d > 0]
    lo = math.floor(min(logs)) if logs else -3.0
    edges = [lo + (0 - lo) * i / bins for i in range(bins + 1)]
    counts = [0] * bins
    for v in logs:
        counts[min(bins - 1, int((v - lo) / (0 - lo) * bins))] += 1
    return {"edges": edges, "counts": counts, "dead": dead}


@router.get(
    "/skills/{name}/latents/{index}",
    response_model=LatentCardView,
    summary="One SAE latent's card: density, mean activation, top contexts",
    responses=error_responses(404, 409),
)
def latent_card(name: str, index: int, _: ReadAccess, store: StoreDep, layer: LayerQuery = None) -> dict:
    """A dead latent has density 0 and no contexts. 404 when the skill has no cards; 422 an index out of range."""
    skill, layer, cards = _cards(store, name, layer)
    try:
        card = cards.card(index)
    except ValueError as exc:
        raise Invalid(str(exc), type="invalid_latent") from None
    return {
        "skill": name,
        "layer": layer,
        "num_latents": cards.num_latents,
        "num_tokens": cards.num_tokens,
        "reasoning": index in set(((skill.manifest.get("metrics") or {}).get(str(layer)) or {}).get("reasoning_latents") or []),
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
    from resa_engine.transparency.report import layer_report, render_report_png, render_report_svg

    manifest = _skill(store, name).manifest
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
