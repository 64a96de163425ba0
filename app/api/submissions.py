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
from app.api.schemas import AdapterCreate, EvalCreate, SkillCreate, SourceCreate, TuneOptions
from app.services.catalog import ModelCatalog
from app.tasks.evaluate import CONTROL_SUFFIXES, control_name
from app.services.generation import GenerationService
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


def _extract_config(body: SkillCreate, info):
    """The extraction's config as the job will build it, checked against the source model's shape now:
    every option, the layers, chunk_len within the context, k within the SAE width."""
    from resa_engine.extract import ExtractConfig

    try:
        cfg = ExtractConfig.from_params(
            body.layers, body.sae.model_dump(exclude_none=True), body.train.model_dump(exclude_none=True) if body.train else None,
            default_layer=body.default_layer,
        )  # fmt: skip
        cfg.check_model(info.name, info.num_layers, info.context)
    except ValueError as exc:
        raise Invalid(str(exc), type="invalid_layer" if "out of range" in str(exc) else "invalid_request") from None
    if body.init_from is None and cfg.k > cfg.resolved_num_latents(info.hidden_size):
        raise Invalid(f"sae.k {cfg.k} exceeds the SAE width {cfg.resolved_num_latents(info.hidden_size)}", type="invalid_request")
    return cfg


def _tune_check(options: TuneOptions | None, target_info) -> None:
    """The tuning options as the job will read them, checked against the target's context now."""
    from app.tasks.tune import tune_config

    params = {"skill": "-", "target": target_info.name, **(options.model_dump(exclude_none=True, exclude={"dataset", "replace"}) if options else {})}
    try:
        tune_config(params).check_model(target_info.name, target_info.context)
    except ValueError as exc:
        raise Invalid(str(exc), type="invalid_request") from None


def submit_skill(body: SkillCreate, *, store, jobs: JobQueue, catalog: ModelCatalog) -> dict:
    source = body.source.model
    catalog.check_layers(source, body.layers)
    _extract_config(body, catalog.describe(source))
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
        _tune_check(body.tune, catalog.describe(target))
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
    _tune_check(options, catalog.describe(body.target))
    params = _tune_params(skill, body.target, options, None)
    job = jobs.enqueue(
        "tune", params, depends_on=shape.builder, claim=adapter_claim(body.target, skill), meta={"skill": skill, "target": body.target}
    )
    return {"skill": skill, "target": body.target, "job": jobs.view(job.id)}


def submit_source(body: SourceCreate, *, store, jobs: JobQueue, catalog: ModelCatalog) -> dict:
    """A source LoRA job, its options checked against the method's config now; the adapter name claimed."""
    from app.tasks.source import check_params

    catalog.spec(body.model)
    try:
        params = check_params(body.model_dump(exclude_none=True))
    except ValueError as exc:
        raise Invalid(str(exc), type="invalid_request") from None
    _need_dataset(store, body.dataset)
    _check_adapter_free(store, jobs, body.model, body.name, bool(body.replace))
    job = jobs.enqueue("source", params, claim=adapter_claim(body.model, body.name), meta={"skill": body.name, "target": body.model})
    return {"model": body.model, "name": body.name, "method": params["method"], "options": params["options"], "job": jobs.view(job.id)}


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


def adapter_recipe(manifest: dict) -> dict:
    """Tune params that repeat an adapter's recipe (same data, LoRA, objective, steps, lr, seed, layer)."""
    train = manifest.get("train") or {}
    params = {
        "objective": manifest.get("objective"), "splice_grad": manifest.get("splice_grad"), "layer": manifest.get("layer"),
        "lr": train.get("lr"), "epochs": train.get("epochs"), "batch_size": train.get("batch_size"), "chunk_len": train.get("chunk_len"),
        "schedule": train.get("schedule"), "max_steps": train.get("max_steps"), "seed": manifest.get("seed"),
        "lora": manifest.get("lora"), "dataset": (manifest.get("dataset") or {}).get("sha256"),
        "train": {k: train[k] for k in ("grad_clip", "weight_decay", "heldout_fraction", "heldout_max_tokens") if train.get(k) is not None} or None,
    }  # fmt: skip
    if "heldout_fraction" not in train:  # an adapter from before the held-out split tuned on every row
        params["train"] = {**(params["train"] or {}), "heldout_fraction": 0.0}
    return {k: v for k, v in params.items() if v is not None}


def _self_extraction(skill: str, manifest: dict, target: str) -> dict:
    """The extraction that repeats a skill's with `target` as its own source (the paper's source = target variant)."""
    from resa_engine.extract.config import TRAIN_FIELDS

    train = {k: v for k, v in (manifest.get("train") or {}).items() if k in TRAIN_FIELDS and v is not None and k != "lr"}
    sae = manifest.get("sae") or {}
    return {
        "name": control_name(skill, "self"), "source": {"model": target}, "layers": manifest["layers"],
        "dataset": manifest["dataset"]["sha256"], "sae": {"num_latents": sae.get("num_latents"), "k": sae.get("k")},
        "train": {**train, "seed": manifest.get("seed", 0)}, "default_layer": manifest["default_layer"],
    }  # fmt: skip


def _build_controls(body: EvalCreate, *, store, jobs: JobQueue) -> list[str]:
    """Queue the jobs that build the control adapters an evaluation needs and the store lacks; their ids."""
    wanted = [c for c in body.controls or [] if c in CONTROL_SUFFIXES]
    if not wanted:
        return []
    model, skill = body.model, body.skill
    try:
        recipe = adapter_recipe(store.manifest("adapter", (model, skill)))
    except ArtifactNotFound:
        raise Conflict(f"skill {skill!r} has no adapter on {model} yet; build it first (POST /skills/{skill}/adapters)", type="no_adapter") from None
    deps = []
    for control in wanted:
        name = control_name(skill, control)
        if store.exists("adapter", (model, name)):
            continue
        parent = None
        if control == "self" and not store.exists("skill", (name,)):  # its own skill first, extracted from the target
            parent = jobs.builder(skill_claim(name))
            if parent is None:
                extraction = _self_extraction(skill, store.manifest("skill", (skill,)), model)
                parent = jobs.enqueue("extract", extraction, claim=skill_claim(name), meta={"skill": name}).id
            deps.append(parent)  # listed in control_jobs too: a client can follow each job
        if builder := jobs.builder(adapter_claim(model, name)):
            deps.append(builder)
            continue
        variant = {"random_sae": {"random_sae": True}, "sft": {"objective": "sft"}, "self": {}}[control]
        params = {**recipe, **variant, "skill": name if control == "self" else skill, "target": model, "name": name}
        deps.append(jobs.enqueue("tune", params, depends_on=parent, claim=adapter_claim(model, name), meta={"skill": name, "target": model}).id)
    return deps


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
    for arm in body.arms or []:
        catalog.spec(arm.model or body.model)
        if arm.adapter:
            _need_adapter(store, arm.model or body.model, arm.adapter)
        if arm.sae and not store.exists("skill", (arm.sae.skill,)):
            raise NotFound(f"unknown skill {arm.sae.skill!r} (arm {arm.label!r})", type="unknown_skill")
    deps = _build_controls(body, store=store, jobs=jobs)
    params = body.model_dump(exclude_none=True)
    job = jobs.enqueue("eval", params, depends_on=deps or None, meta={"skill": body.skill, "target": body.model})
    return {"job": jobs.view(job.id), "control_jobs": [jobs.view(j) for j in deps]}


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

