"""`POST /skills` and `resa extract`: train a skill's SAEs and commit them to the store.

params (the HTTP body):
  {"name": str, "source": {"model": str, "adapter": str?}, "layers": [int], "dataset": sha256,
   "sae": {"num_latents"?, "expansion_factor"?, "k"?}?, "train": {...}?, "default_layer": int?,
   "init_from": str?, "replace": bool?}
`source.adapter` names a stored adapter of `source.model` (or, CLI only, a local PEFT folder);
`init_from` names a stored skill to fine-tune from (or, CLI only, a local skill/SAE folder).
Training happens in a deterministic staging folder, so a retried job resumes its checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters_store import ArtifactConflict, check_name

from . import TaskContext, check_object

PARAMS = ("name", "source", "layers", "dataset", "sae", "train", "default_layer", "init_from", "replace")


def _validate(params: dict) -> dict:
    check_object(params, PARAMS, unknown="extract parameter", not_object="extract parameters must be a JSON object")
    for key in ("name", "source", "layers", "dataset"):
        if key not in params:
            raise ValueError(f"missing `{key}`")
    check_name(params["name"], "skill name")
    source = params["source"]
    if not isinstance(source, dict) or not isinstance(source.get("model"), str) or not source["model"]:
        raise ValueError("`source` must be an object with a `model` name")
    extra = sorted(set(source) - {"model", "adapter"})
    if extra:
        raise ValueError(f"unknown source field(s) {', '.join(extra)}; allowed: model, adapter")
    if source.get("adapter") is not None and (not isinstance(source["adapter"], str) or not source["adapter"]):
        raise ValueError("`source.adapter` must be a non-empty string")
    layers = params["layers"]
    if not isinstance(layers, list) or not layers or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise ValueError("`layers` must be a non-empty list of integers")
    if not isinstance(params["dataset"], str):
        raise ValueError("`dataset` must be a dataset id (sha256)")
    for key in ("sae", "train"):
        if params.get(key) is not None and not isinstance(params[key], dict):
            raise ValueError(f"`{key}` must be an object")
    if params.get("init_from") is not None and not isinstance(params["init_from"], str):
        raise ValueError("`init_from` must be a skill name")
    if not isinstance(params.get("replace", False), bool):
        raise ValueError("`replace` must be true or false")
    return params


def _local_dir(ref: str, ctx: TaskContext) -> Path | None:
    """A local folder reference, honoured only where paths are allowed (the CLI)."""
    if ctx.allow_paths and ("/" in ref or ref.startswith(".")) and Path(ref).expanduser().is_dir():
        return Path(ref).expanduser().resolve()
    return None


def run_extract(params: dict, ctx: TaskContext) -> dict[str, Any]:
    """Validate, train the SAEs (resuming a checkpoint in staging), commit the skill; returns its manifest."""
    from resa_engine.data import parse_qa_jsonl, split_rows
    from resa_engine.extract import ExtractConfig, extract_skill
    from resa_engine.lora.merge import apply_source_adapter

    params = _validate(params)
    name, source, replace = params["name"], params["source"], params.get("replace", False)
    cfg = ExtractConfig.from_params(
        params["layers"], params.get("sae"), params.get("train"), default_layer=params.get("default_layer")
    )
    # A taken name fails before any data is read or any model loaded.
    if ctx.store.exists("skill", (name,)) and not replace:
        raise ArtifactConflict(f"skill {name!r} already exists (delete it first or ask to replace it)")

    rows = parse_qa_jsonl(ctx.store.get_dataset(params["dataset"]), max_rows=ctx.settings.max_dataset_rows)
    init_ref = params.get("init_from")
    if init_ref is not None:
        cfg.init_from = _local_dir(init_ref, ctx) or ctx.store.fetch("skill", (check_name(init_ref, "skill name"),))

    model = ctx.load_model(source["model"])
    cfg.check_model(model.name, model.num_layers, model.context)
    adapter_ref = source.get("adapter")
    if adapter_ref:
        adapter_dir = _local_dir(adapter_ref, ctx)
        if adapter_dir is None:
            adapter_dir = ctx.store.fetch("adapter", (check_name(source["model"], "model name"), check_name(adapter_ref, "adapter name")))
        model = apply_source_adapter(model, adapter_dir, name=adapter_ref)
        ctx._models.pop(source["model"], None)  # merged weights must never be reused as the plain base

    train_rows, heldout_rows = split_rows(rows, cfg.heldout_fraction, cfg.seed)
    staging = ctx.staging.folder("skill", name)
    try:
        result = extract_skill(
            model, train_rows, heldout_rows, cfg, staging / "skill", progress=ctx.progress, should_stop=ctx.should_stop,
            checkpoint_dir=staging / "checkpoint", name=name, dataset_sha256=params["dataset"],
        )  # fmt: skip
    except ValueError:
        # Bad input is found before training; leave no empty staging folder behind.
        if not (staging / "checkpoint").exists():
            ctx.staging.clear("skill", name)
        raise
    manifest = {**result.manifest, "source": {**result.manifest["source"], "model": source["model"]}}
    if ctx.job_id:
        manifest["job_id"] = ctx.job_id
    committed = ctx.store.commit("skill", (name,), result.out_dir, manifest, replace=replace)
    ctx.staging.clear("skill", name)
    return {"skill": name, "manifest": committed}
