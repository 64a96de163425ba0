"""`POST /skills/{name}/adapters` and `resa tune`: build a skill's adapter for a target and commit it.

params (the HTTP body, plus the skill from the path):
  {"skill": str, "target": str, "dataset": sha256? (default: the skill's dataset), "objective": "kl"|"ce"?,
   "epochs": number?, "lr": number?, "splice_grad": bool? (alias "differentiable_splice"), "layer": int?,
   "seed": int?, "max_steps": int?, "chunk_len": int?, "schedule": "constant"|"cosine"?, "batch_size": int?,
   "lora": {"r", "alpha", "dropout", "target_modules"}?, "train": {further TuneConfig fields}?, "replace": bool?,
   "random_sae": bool? (the random-SAE control), "name": str? (the adapter's name in the store; default the skill's)};
objective "sft" is the SFT baseline control
Training happens in a deterministic staging folder (checkpoint included), so a retried job resumes.
"""

from __future__ import annotations

from typing import Any

from adapters_store import ArtifactConflict, check_name

from . import TaskContext, check_object

PARAMS = (
    "skill", "target", "dataset", "objective", "epochs", "lr", "splice_grad", "differentiable_splice", "layer",
    "seed", "max_steps", "chunk_len", "schedule", "batch_size", "lora", "train", "replace", "random_sae", "name",
)  # fmt: skip
TRAIN_FIELDS = (
    "batch_size", "grad_clip", "schedule", "weight_decay", "checkpoint_every", "max_steps", "chunk_len", "epochs", "lr", "seed",
    "heldout_fraction", "heldout_max_tokens",
)  # fmt: skip
LORA_FIELDS = ("r", "alpha", "dropout", "target_modules")
INT_FIELDS = ("layer", "seed", "max_steps", "chunk_len", "batch_size", "checkpoint_every", "heldout_max_tokens")
NUMBER_FIELDS = ("epochs", "lr", "grad_clip", "weight_decay", "heldout_fraction")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def tune_config(params: dict):
    """The TuneConfig a request asks for (unset fields keep the authors' defaults); ValueError on bad input."""
    from resa_engine.tune import LoraSettings, TuneConfig

    check_object(params, PARAMS, unknown="tune parameter", not_object="tune parameters must be a JSON object")
    train = check_object(params.get("train") or {}, TRAIN_FIELDS, unknown="train option", not_object="`train` must be an object")
    values = {**train, **{k: v for k, v in params.items() if k not in ("skill", "target", "dataset", "lora", "train", "replace", "name")}}
    values = {k: v for k, v in values.items() if v is not None}
    if "differentiable_splice" in values:
        values["splice_grad"] = values.pop("differentiable_splice")
    for key, value in values.items():
        if key in INT_FIELDS and not _is_int(value):
            raise ValueError(f"`{key}` must be an integer, got {value!r}")
        if key in NUMBER_FIELDS and not _is_number(value):
            raise ValueError(f"`{key}` must be a number, got {value!r}")
        if key in ("splice_grad", "random_sae") and not isinstance(value, bool):
            raise ValueError(f"`{key}` must be true or false")
        if key in ("objective", "schedule") and not isinstance(value, str):
            raise ValueError(f"`{key}` must be a string")
    lora = check_object(params.get("lora") or {}, LORA_FIELDS, unknown="lora option", not_object="`lora` must be an object")
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
    from resa_engine.artifacts import Skill
    from resa_engine.tune import tune_adapter

    cfg = tune_config(params)
    for key in ("skill", "target"):
        if not isinstance(params.get(key), str) or not params[key]:
            raise ValueError(f"missing `{key}`")
    skill_name = check_name(params["skill"], "skill name")
    name = check_name(params.get("name") or skill_name, "adapter name")  # a control adapter has a name of its own
    target = params["target"]
    ctx.registry.get(target)  # adapters are stored per registered model name, never per path
    check_name(target, "model name")
    replace = params.get("replace", False)
    if not isinstance(replace, bool):
        raise ValueError("`replace` must be true or false")
    # A taken key fails before any data is read or any model loaded.
    if ctx.store.exists("adapter", (target, name)) and not replace:
        raise ArtifactConflict(f"adapter {target}/{name} already exists (delete it first or ask to replace it)")

    skill_manifest = ctx.store.manifest("skill", (skill_name,))
    dataset = params.get("dataset") or (skill_manifest.get("dataset") or {}).get("sha256")
    if not isinstance(dataset, str) or not dataset:
        raise ValueError(f"skill {skill_name!r} records no dataset; pass `dataset`")
    rows = parse_qa_jsonl(ctx.store.get_dataset(dataset), max_rows=ctx.settings.max_dataset_rows)
    skill = Skill(skill_name, skill_manifest, ctx.store.fetch("skill", (skill_name,)))

    model = ctx.load_model(target)
    skill.check_fits(model.name, model.hidden_size, model.num_layers, cfg.layer)  # width and layer, before any training
    staging = ctx.staging.folder("adapter", target, name)
    try:
        result = tune_adapter(
            model, skill, rows, cfg, staging / "adapter", progress=ctx.progress, should_stop=ctx.should_stop, checkpoint_dir=staging / "checkpoint"
        )
    except ValueError:
        # Bad input is found before training; leave no empty staging folder behind.
        if not (staging / "checkpoint").exists():
            ctx.staging.clear("adapter", target, name)
        raise
    manifest = dict(result.manifest)
    if ctx.job_id:
        manifest["job_id"] = ctx.job_id
    committed = ctx.store.commit("adapter", (target, name), result.out_dir, manifest, replace=replace)
    ctx.staging.clear("adapter", target, name)
    return {"adapter": {"target": target, "skill": name}, "manifest": committed}
