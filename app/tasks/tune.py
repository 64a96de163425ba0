"""`POST /skills/{name}/adapters` and `resa tune`: build a skill's adapter for a target and commit it.

params (the HTTP body, plus the skill from the path):
  {"skill": str, "target": str, "dataset": sha256? (default: the skill's dataset), "objective": "kl"|"ce"?,
   "epochs": number?, "lr": number?, "splice_grad": bool? (alias "differentiable_splice"), "layer": int?,
   "seed": int?, "max_steps": int?, "chunk_len": int?, "schedule": "constant"|"cosine"?, "batch_size": int?,
   "lora": {"r", "alpha", "dropout", "target_modules"}?, "train": {further TuneConfig fields}?, "replace": bool?}
Training happens in a deterministic staging folder (checkpoint included), so a retried job resumes.
"""

from __future__ import annotations

from typing import Any

from adapters_store import ArtifactConflict, check_name

from . import TaskContext

PARAMS = (
    "skill", "target", "dataset", "objective", "epochs", "lr", "splice_grad", "differentiable_splice", "layer",
    "seed", "max_steps", "chunk_len", "schedule", "batch_size", "lora", "train", "replace",
)  # fmt: skip
TRAIN_FIELDS = ("batch_size", "grad_clip", "schedule", "weight_decay", "checkpoint_every", "max_steps", "chunk_len", "epochs", "lr", "seed")
LORA_FIELDS = ("r", "alpha", "dropout", "target_modules")
INT_FIELDS = ("layer", "seed", "max_steps", "chunk_len", "batch_size", "checkpoint_every")
NUMBER_FIELDS = ("epochs", "lr", "grad_clip", "weight_decay")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def tune_config(params: dict):
    """The TuneConfig a request asks for (unset fields keep the authors' defaults); ValueError on bad input."""
    from resa_engine.tune import LoraSettings, TuneConfig

    if not isinstance(params, dict):
        raise ValueError("tune parameters must be a JSON object")
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ValueError(f"unknown tune parameter(s) {', '.join(unknown)}; allowed: {', '.join(PARAMS)}")
    train = params.get("train") or {}
    if not isinstance(train, dict):
        raise ValueError("`train` must be an object")
    bad = sorted(set(train) - set(TRAIN_FIELDS))
    if bad:
        raise ValueError(f"unknown train option(s) {', '.join(bad)}; allowed: {', '.join(TRAIN_FIELDS)}")
    values = {**train, **{k: v for k, v in params.items() if k not in ("skill", "target", "dataset", "lora", "train", "replace")}}
    values = {k: v for k, v in values.items() if v is not None}
    if "differentiable_splice" in values:
        values["splice_grad"] = values.pop("differentiable_splice")
    for key, value in values.items():
        if key in INT_FIELDS and not _is_int(value):
            raise ValueError(f"`{key}` must be an integer, got {value!r}")
        if key in NUMBER_FIELDS and not _is_number(value):
            raise ValueError(f"`{key}` must be a number, got {value!r}")
        if key == "splice_grad" and not isinstance(value, bool):
            raise ValueError("`splice_grad` must be true or false")
        if key in ("objective", "schedule") and not isinstance(value, str):
            raise ValueError(f"`{key}` must be a string")
    lora = params.get("lora") or {}
    if not isinstance(lora, dict):
        raise ValueError("`lora` must be an object")
    bad = sorted(set(lora) - set(LORA_FIELDS))
    if bad:
        raise ValueError(f"unknown lora option(s) {', '.join(bad)}; allowed: {', '.join(LORA_FIELDS)}")
    lora = {k: v for k, v in lora.items() if v is not None}
    if "r" in lora and not _is_int(lora["r"]):
        raise ValueError(f"`lora.r` must be an integer, got {lora['r']!r}")
    for key in ("alpha", "dropout"):
        if key in lora and not _is_number(lora[key]):
            raise ValueError(f"`lora.{key}` must be a number, got {lora[key]!r}")
    if "target_modules" in lora and (not isinstance(lora["target_modules"], list) or not all(isinstance(m, str) for m in lora["target_modules"])):
        raise ValueError("`lora.target_modules` must be a list of module names")
    cfg = TuneConfig(**values, lora=LoraSettings(**lora))
    cfg.validate()
    return cfg


def run_tune(params: dict, ctx: TaskContext) -> dict[str, Any]:
    """Validate, check for a conflict, train (resuming a staged checkpoint), commit ("adapter", (target, skill))."""
    from resa_engine.data import parse_qa_jsonl
    from resa_engine.skill import Skill
    from resa_engine.tune import tune_adapter

    cfg = tune_config(params)
    for key in ("skill", "target"):
        if not isinstance(params.get(key), str) or not params[key]:
            raise ValueError(f"missing `{key}`")
    skill_name = check_name(params["skill"], "skill name")
    target = params["target"]
    ctx.registry.get(target)  # adapters are stored per registered model name, never per path
    check_name(target, "model name")
    replace = params.get("replace", False)
    if not isinstance(replace, bool):
        raise ValueError("`replace` must be true or false")
    # A taken key fails before any data is read or any model loaded.
    if ctx.store.exists("adapter", (target, skill_name)) and not replace:
        raise ArtifactConflict(f"adapter {target}/{skill_name} already exists (delete it first or ask to replace it)")

    skill_manifest = ctx.store.manifest("skill", (skill_name,))
    dataset = params.get("dataset") or (skill_manifest.get("dataset") or {}).get("sha256")
    if not isinstance(dataset, str) or not dataset:
        raise ValueError(f"skill {skill_name!r} records no dataset; pass `dataset`")
    rows = parse_qa_jsonl(ctx.store.get_dataset(dataset), max_rows=ctx.settings.max_dataset_rows)
    skill = Skill(skill_name, ctx.store.fetch("skill", (skill_name,)), skill_manifest)

    model = ctx.load_model(target)
    skill.check_target(model, cfg.layer)  # width and layer, before any training
    staging = ctx.staging.folder("adapter", target, skill_name)
    try:
        result = tune_adapter(
            model,
            skill,
            rows,
            cfg,
            staging / "adapter",
            progress=ctx.progress,
            should_stop=ctx.should_stop,
            checkpoint_dir=staging / "checkpoint",
        )
    except ValueError:
        # Bad input is found before training; leave no empty staging folder behind.
        if not (staging / "checkpoint").exists():
            ctx.staging.clear("adapter", target, skill_name)
        raise
    manifest = dict(result.manifest)
    if ctx.job_id:
        manifest["job_id"] = ctx.job_id
    committed = ctx.store.commit("adapter", (target, skill_name), result.out_dir, manifest, replace=replace)
    ctx.staging.clear("adapter", target, skill_name)
    return {"adapter": {"target": target, "skill": skill_name}, "manifest": committed}
