"""Job submissions and artifact deletions, checked cheaply before anything is queued.

Checks read registry configs (no weights), store manifests and Redis: registered model
names, datasets and skills that exist, names not taken (nor being built), layers within
the model, SAE width equal to the target's hidden size. Whatever a job would only find
out after loading a model is left to the job.
"""

from __future__ import annotations

from typing import NamedTuple

from adapters_store import ArtifactNotFound
from app.api.errors import Conflict, Invalid, NotFound
from app.api.schemas import AdapterCreate, EvalCreate, SkillCreate, TuneOptions
from app.generation import GenerationService, ModelCatalog
from app.jobs import JobQueue


def skill_claim(name: str) -> str:
    return f"skill/{name}"


def adapter_claim(target: str, skill: str) -> str:
    return f"adapter/{target}/{skill}"


def _need_dataset(store, dataset_id: str) -> None:
    try:
        store.dataset_info(dataset_id)
    except ArtifactNotFound:
        raise NotFound(f"dataset {dataset_id} not found; upload it with POST /datasets", type="unknown_dataset") from None


class SkillShape(NamedTuple):
    """What tuning needs to know of a skill, stored or still being extracted."""

    builder: str | None
    """Id of the job extracting it (None: it is in the store)."""
    d_in: int
    layers: list[int]
    default_layer: int | None


def _skill_shape(store, jobs: JobQueue, catalog: ModelCatalog, skill: str) -> SkillShape:
    if store.exists("skill", (skill,)):
        manifest = store.manifest("skill", (skill,))
        default = manifest.get("default_layer")
        layers = [int(i) for i in manifest.get("layers", [])]
        return SkillShape(None, int(manifest["d_in"]), layers, int(default) if default is not None else None)
    builder = jobs.builder(skill_claim(skill))
    if builder is None:
        raise NotFound(f"unknown skill {skill!r}", type="unknown_skill")
    params = jobs.fetch(builder).args[1]
    source = catalog.describe(params["source"]["model"])
    return SkillShape(builder, source.hidden_size, list(params["layers"]), params.get("default_layer"))


def _check_target(catalog: ModelCatalog, skill: str, target: str, d_in: int, layers: list[int], layer: int | None) -> None:
    info = catalog.describe(target)
    if d_in != info.hidden_size:
        raise Invalid(
            f"skill {skill!r} reads a {d_in}-wide residual stream but {target} has hidden size {info.hidden_size}",
            type="incompatible_target",
        )
    if layer is not None and layers and layer not in layers:
        raise Invalid(f"skill {skill!r} has no SAE at layer {layer} (layers: {layers})", type="invalid_layer")
    used = [layer] if layer is not None else layers
    bad = [i for i in used if i >= info.num_layers]
    if bad:
        raise Invalid(
            f"layer(s) {bad} of skill {skill!r} are out of range for {target} ({info.num_layers} layers)", type="invalid_layer"
        )


def _check_adapter_free(store, jobs: JobQueue, target: str, skill: str, replace: bool) -> None:
    if store.exists("adapter", (target, skill)) and not replace:
        raise Conflict(f"adapter {target}/{skill} already exists (delete it first or pass replace)", type="name_taken")
    builder = jobs.builder(adapter_claim(target, skill))
    if builder:
        raise Conflict(f"adapter {target}/{skill} is already being built by job {builder}", type="job_in_progress", job=builder)


def _tune_params(skill: str, target: str, options: TuneOptions | None, dataset: str | None) -> dict:
    params = {"skill": skill, "target": target, **(options.model_dump(exclude_none=True) if options else {})}
    if dataset and "dataset" not in params:
        params["dataset"] = dataset
    return params


def submit_skill(body: SkillCreate, *, store, jobs: JobQueue, catalog: ModelCatalog) -> dict:
    source = body.source.model
    catalog.check_layers(source, body.layers)
    _need_dataset(store, body.dataset)
    if store.exists("skill", (body.name,)) and not body.replace:
        raise Conflict(f"skill {body.name!r} already exists (delete it first or pass replace)", type="name_taken")
    builder = jobs.builder(skill_claim(body.name))
    if builder:
        raise Conflict(f"skill {body.name!r} is already being built by job {builder}", type="job_in_progress", job=builder)
    if body.source.adapter and not store.exists("adapter", (source, body.source.adapter)):
        raise NotFound(f"source adapter {source}/{body.source.adapter} not found in the store", type="unknown_adapter")
    if body.init_from and not store.exists("skill", (body.init_from,)):
        raise NotFound(f"skill {body.init_from!r} (init_from) not found", type="unknown_skill")
    d_in = catalog.describe(source).hidden_size
    targets = body.adapters_for or []
    replace_adapters = bool(body.tune and body.tune.replace)
    for target in targets:
        layer = body.tune.layer if body.tune and body.tune.layer is not None else body.default_layer
        _check_target(catalog, body.name, target, d_in, body.layers, layer)
        _check_adapter_free(store, jobs, target, body.name, replace_adapters)
    if body.tune and body.tune.dataset:
        _need_dataset(store, body.tune.dataset)

    params = body.model_dump(exclude_none=True, exclude={"adapters_for", "tune"})
    parent = jobs.enqueue("extract", params, claim=skill_claim(body.name), meta={"skill": body.name})
    children = [
        jobs.enqueue(
            "tune",
            _tune_params(body.name, target, body.tune, body.dataset),
            depends_on=parent.id,
            claim=adapter_claim(target, body.name),
            meta={"skill": body.name, "target": target},
        )
        for target in targets
    ]
    return {"skill": body.name, "job": jobs.view(parent.id), "adapter_jobs": [jobs.view(c.id) for c in children]}


def submit_adapter(skill: str, body: AdapterCreate, *, store, jobs: JobQueue, catalog: ModelCatalog) -> dict:
    catalog.spec(body.target)
    shape = _skill_shape(store, jobs, catalog, skill)
    layer = body.layer if body.layer is not None else shape.default_layer
    _check_target(catalog, skill, body.target, shape.d_in, shape.layers, layer)
    _check_adapter_free(store, jobs, body.target, skill, bool(body.replace))
    if body.dataset:
        _need_dataset(store, body.dataset)
    options = TuneOptions.model_validate(body.model_dump(exclude={"target"}))
    params = _tune_params(skill, body.target, options, None)
    job = jobs.enqueue(
        "tune", params, depends_on=shape.builder, claim=adapter_claim(body.target, skill), meta={"skill": skill, "target": body.target}
    )
    return {"skill": skill, "target": body.target, "job": jobs.view(job.id)}


def _need_adapter(store, model: str, ref: str) -> None:
    """An eval's adapter reference (`skill` or `target:skill`) must name a stored adapter."""
    target, _, skill = ref.rpartition(":")
    target = target or model
    if store.exists("adapter", (target, skill)):
        return
    others = sorted(m["key"][0] for m in store.list("adapter") if m["key"][1] == skill)
    if others:
        raise Conflict(
            f"skill {skill!r} has no adapter for {target}; name one built on another model as `target:{skill}` "
            f"(available: {', '.join(others)})",
            type="no_adapter",
        )
    if store.exists("skill", (skill,)):
        raise Conflict(f"skill {skill!r} has no adapter yet; build one with POST /skills/{skill}/adapters", type="no_adapter")
    raise NotFound(f"unknown skill {skill!r}", type="unknown_skill")


def submit_eval(body: EvalCreate, *, store, jobs: JobQueue, catalog: ModelCatalog, max_new_tokens: int) -> dict:
    catalog.spec(body.model)
    _need_dataset(store, body.dataset)
    if body.max_tokens is not None and body.max_tokens > max_new_tokens:
        raise Invalid(f"max_tokens {body.max_tokens} is over this server's limit of {max_new_tokens}", type="max_tokens_too_large")
    if body.skill:
        _need_adapter(store, body.model, body.skill)
    if body.source:
        catalog.spec(body.source.model)
        ref = body.source.skill or body.source.adapter
        if ref:
            _need_adapter(store, body.source.model, ref)
    params = body.model_dump(exclude_none=True)
    job = jobs.enqueue("eval", params, meta={"skill": body.skill, "target": body.model})
    return {"job": jobs.view(job.id)}


def delete_skill(name: str, *, store, jobs: JobQueue, generation: GenerationService) -> dict:
    """Delete a skill and every adapter built from it (an adapter outliving its skill would name
    a skill that no longer exists, or a different one if the name is reused)."""
    busy = sorted(job for claim, job in jobs.builders("adapter/").items() if claim.endswith(f"/{name}"))
    if builder := jobs.builder(skill_claim(name)):
        busy.insert(0, builder)
    if busy:
        raise Conflict(
            f"skill {name!r} is being built or used by job(s) {', '.join(busy)}; cancel them first", type="job_in_progress", jobs=busy
        )
    adapters = [m["key"][0] for m in store.list("adapter") if m["key"][1] == name]
    exists = store.exists("skill", (name,))
    if not exists and not adapters:
        raise NotFound(f"unknown skill {name!r}", type="unknown_skill")
    for target in adapters:
        store.delete("adapter", (target, name))
    if exists:
        store.delete("skill", (name,))
    generation.forget_skill(name)
    return {"deleted": {"skill": name, "adapters": adapters}}


def delete_adapter(target: str, skill: str, *, store, jobs: JobQueue, generation: GenerationService) -> dict:
    builder = jobs.builder(adapter_claim(target, skill))
    if builder:
        raise Conflict(f"adapter {target}/{skill} is being built by job {builder}; cancel it first", type="job_in_progress", job=builder)
    store.delete("adapter", (target, skill))
    generation.forget_skill(skill)
    return {"deleted": {"adapter": {"target": target, "skill": skill}}}

