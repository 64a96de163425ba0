"""`POST /sources` and `resa source`: train a source LoRA on a registered model and commit it as an adapter.

params (the HTTP body):
  {"model": str (a registered model), "name": str (the adapter's name in the store), "dataset": sha256,
   "method": "sft"|"grpo", "options": {fields of SFTConfig | GRPOSourceConfig}?, "replace": bool?}
The result is the adapter ("adapter", (model, name)): a plain PEFT folder whose manifest says how it
was made (`origin`), usable as `source.adapter` of an extraction. `sft` is the cheap stand-in (next-
token loss on the verified answers); `grpo` is the paper's kind of source (RL on an accuracy reward).
Everything is checked before a model is loaded; training has no checkpoint, so a retried job starts over.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from typing import Any

from adapters_store import ArtifactConflict, check_name

from . import TaskContext, check_object

PARAMS = ("model", "name", "dataset", "method", "options", "replace")
METHODS = ("sft", "grpo")
_SHA = re.compile(r"^[0-9a-f]{64}$")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _config_class(method: str):
    if method == "grpo":
        from resa_engine.sources.grpo import GRPOSourceConfig

        return GRPOSourceConfig
    from resa_engine.sources.sft import SFTConfig

    return SFTConfig


def _check_type(method: str, key: str, annotation: str, value: Any) -> None:
    """The JSON value fits the config field's annotation (`int`, `float`, `list[str]`, `... | None`)."""
    kinds = [a.strip() for a in str(annotation).split("|")]
    if value is None:
        if "None" in kinds:
            return
        raise ValueError(f"`options.{key}` of {method} cannot be null")
    if "int" in kinds and _is_int(value):
        return
    if "float" in kinds and _is_number(value):
        return
    if "list[str]" in kinds and isinstance(value, list) and all(isinstance(m, str) and m for m in value):
        return
    wanted = {"int": "an integer", "float": "a number", "list[str]": "a list of module names"}
    raise ValueError(f"`options.{key}` of {method} must be {' or '.join(wanted.get(k, k) for k in kinds if k != 'None')}, got {value!r}")


def _check_sft(cfg) -> None:
    """Ranges of SFTConfig (which has no validate() of its own)."""
    for key in ("epochs", "batch_size", "lora_r"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"sft `{key}` must be >= 1, got {getattr(cfg, key)!r}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"sft `max_steps` must be >= 1, got {cfg.max_steps!r}")
    for key in ("lr", "lora_alpha"):
        if not getattr(cfg, key) > 0:
            raise ValueError(f"sft `{key}` must be positive, got {getattr(cfg, key)!r}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ValueError(f"sft `lora_dropout` must be in [0, 1), got {cfg.lora_dropout!r}")
    if not cfg.target_modules:
        raise ValueError("sft `target_modules` must be a non-empty list of module names")


def source_config(method: str, options: dict):
    """The method's config with `options` applied (unset fields keep their defaults); ValueError on bad input."""
    cls = _config_class(method)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"unknown {method} option(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    for key, value in options.items():
        _check_type(method, key, fields[key].type, value)
    cfg = cls(**{k: (list(v) if isinstance(v, list) else v) for k, v in options.items()})
    if method == "grpo":
        cfg.validate()
    else:
        _check_sft(cfg)
    return cfg


def check_params(params: dict) -> dict:
    """Validate a source request without any I/O: the normalized params (options filled in), or ValueError.

    Not checked here (they need the registry or the store): that the model is registered, that the
    dataset exists, that the name is free.
    """
    check_object(params, PARAMS, unknown="source parameter", not_object="source parameters must be a JSON object")
    for key in ("model", "name", "dataset"):
        if not isinstance(params.get(key), str) or not params[key]:
            raise ValueError(f"missing `{key}`" if key not in params else f"`{key}` must be a non-empty string")
    check_name(params["model"], "model name")
    check_name(params["name"], "adapter name")
    if not _SHA.match(params["dataset"]):
        raise ValueError(f"`dataset` must be a dataset id (64 lowercase hex characters), got {params['dataset']!r}")
    if "method" not in params:
        raise ValueError(f"missing `method` (one of {', '.join(METHODS)})")
    method = params["method"]
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {', '.join(METHODS)}, got {method!r}")
    options = params.get("options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ValueError("`options` must be an object")
    replace = params.get("replace", False)
    if not isinstance(replace, bool):
        raise ValueError("`replace` must be true or false")
    cfg = source_config(method, options)
    return {
        "model": params["model"],
        "name": params["name"],
        "dataset": params["dataset"],
        "method": method,
        "options": dataclasses.asdict(cfg),
        "replace": replace,
    }


def run_source(params: dict, ctx: TaskContext) -> dict[str, Any]:
    """Validate, check for a conflict, read the dataset, train in staging, commit ("adapter", (model, name))."""
    from resa_engine.data import parse_qa_jsonl

    p = check_params(params)
    model_name, name, method = p["model"], p["name"], p["method"]
    ctx.registry.get(model_name)  # adapters are stored per registered model name, never per path
    # A taken name fails before any data is read or any model loaded.
    if ctx.store.exists("adapter", (model_name, name)) and not p["replace"]:
        raise ArtifactConflict(f"adapter {model_name}/{name} already exists (delete it first or ask to replace it)")
    rows = parse_qa_jsonl(ctx.store.get_dataset(p["dataset"]), max_rows=ctx.settings.max_dataset_rows)
    cfg = source_config(method, p["options"])
    if method == "grpo" and len(rows) < cfg.batch_size:
        raise ValueError(f"dataset has {len(rows)} rows; grpo needs at least batch_size = {cfg.batch_size}")

    if method == "grpo":
        from resa_engine.sources.grpo import train_grpo_lora as train
    else:
        from resa_engine.sources.sft import train_sft_lora as train

    model = ctx.load_model(model_name)
    staging = ctx.staging.folder("source", model_name, name)
    out_dir = staging / "adapter"
    shutil.rmtree(out_dir, ignore_errors=True)  # no checkpoint to resume: a retried job starts over
    try:
        result = train(model, rows, cfg, out_dir, progress=ctx.progress, should_stop=ctx.should_stop)
        (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's model card (SFT writes one); the manifest is the record
        manifest = {
            **result.manifest,
            "skill": name,
            "method": method,
            "dataset": {"sha256": p["dataset"], "rows": len(rows)},
        }
        if ctx.job_id:
            manifest["job_id"] = ctx.job_id
        committed = ctx.store.commit("adapter", (model_name, name), out_dir, manifest, replace=p["replace"])
    finally:
        ctx.staging.clear("source", model_name, name)
    return {"adapter": {"target": model_name, "skill": name}, "manifest": committed}
