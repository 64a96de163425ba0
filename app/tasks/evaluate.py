"""`POST /evals` and `resa eval`: pass@1 of a model, bare and with a skill's adapter, side by side.

params (the HTTP body):
  {"model": str, "skill": str?, "dataset": sha256, "samples": int? (completions per question),
   "temperature": number?, "top_p": number?, "max_tokens": int?, "limit": int? (first N questions),
   "seed": int?, "batch_size": int?, "prompt_format": "resa"|"chat"?,
   "source": {"model": str, "skill": str? | "adapter": str?}?}
`skill` names the adapter (model, skill); `target:skill` takes an adapter built on another model
(a cross-model attach, reported). With `source` the source model (optionally with its adapter)
is evaluated too and the retention ratio (skill - base) / (source - base) is reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters_store import check_name

from . import TaskContext

PARAMS = ("model", "skill", "dataset", "samples", "temperature", "top_p", "max_tokens", "limit", "seed", "batch_size", "prompt_format", "source")


def adapter_ref(model: str, ref: str) -> tuple[str, str]:
    """(target, skill) of an adapter reference: `skill` (built on `model`) or `target:skill`."""
    if not isinstance(ref, str) or not ref:
        raise ValueError("an adapter reference must be a skill name or `target:skill`")
    target, sep, skill = ref.rpartition(":")
    if not sep:
        target, skill = model, ref
    return check_name(target, "model name"), check_name(skill, "skill name")


def attach_stored(ctx: TaskContext, model, ref: str, name: str) -> dict:
    """Fetch a stored adapter (or, CLI only, a local PEFT folder) and attach it under `name`."""
    from resa_engine.adapter import attach_adapter

    local = Path(ref).expanduser()
    if ctx.allow_paths and ("/" in ref or ref.startswith(".")) and local.is_dir():
        attach_adapter(model, local, name)
        info = {"path": str(local.resolve())}
    else:
        target, skill = adapter_ref(model.name, ref)
        attach_adapter(model, ctx.store.fetch("adapter", (target, skill)), name)
        info = {"target": target, "skill": skill}
    return {**info, "cross_model": model.extra["adapters"][name]["cross_model"]}


def check_params(params: dict) -> dict:
    if not isinstance(params, dict):
        raise ValueError("eval parameters must be a JSON object")
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ValueError(f"unknown eval parameter(s) {', '.join(unknown)}; allowed: {', '.join(PARAMS)}")
    for key in ("model", "dataset"):
        if not isinstance(params.get(key), str) or not params[key]:
            raise ValueError(f"missing `{key}`")
    for key in ("samples", "max_tokens", "limit", "seed", "batch_size"):
        v = params.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise ValueError(f"`{key}` must be an integer, got {v!r}")
    if params.get("limit") is not None and params["limit"] < 1:
        raise ValueError("`limit` must be at least 1")
    for key in ("temperature", "top_p"):
        v = params.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise ValueError(f"`{key}` must be a number, got {v!r}")
    source = params.get("source")
    if source is not None:
        if not isinstance(source, dict) or not isinstance(source.get("model"), str) or not source["model"]:
            raise ValueError("`source` must be an object with a `model` name")
        extra = sorted(set(source) - {"model", "skill", "adapter"})
        if extra:
            raise ValueError(f"unknown source field(s) {', '.join(extra)}; allowed: model, skill, adapter")
        if source.get("skill") and source.get("adapter"):
            raise ValueError("give at most one of `source.skill` or `source.adapter`")
    return params


def run_eval(params: dict, ctx: TaskContext) -> dict[str, Any]:
    """Evaluate base (and skill, and source when given) on the dataset; the report puts them side by side."""
    from resa_engine.adapter import detach_adapter
    from resa_engine.data import parse_qa_jsonl
    from resa_engine.evaluate import EvalConfig, compare, evaluate

    params = check_params(params)
    defaults = EvalConfig()
    cfg = EvalConfig(
        **{k: params[k] for k in ("samples", "temperature", "top_p", "max_tokens", "seed", "batch_size", "prompt_format") if params.get(k) is not None}
    )
    cfg.validate()
    skill_ref = params.get("skill")
    if skill_ref is not None and not (ctx.allow_paths and "/" in skill_ref):
        ctx.store.manifest("adapter", adapter_ref(params["model"], skill_ref))  # a missing adapter fails before any work
    rows = parse_qa_jsonl(ctx.store.get_dataset(params["dataset"]), max_rows=ctx.settings.max_dataset_rows)
    evaluated = rows[: params["limit"]] if params.get("limit") else rows

    model = ctx.load_model(params["model"])
    common = dict(progress=ctx.progress, should_stop=ctx.should_stop)
    report: dict[str, Any] = {"model": model.name}
    adapter_info = None
    if params.get("skill") is not None:
        adapter_info = attach_stored(ctx, model, params["skill"], "skill")
    try:
        base = evaluate(model.model, model.tokenizer, evaluated, cfg, label="base", model_name=model.name, **common)
        skill = None
        if adapter_info is not None:
            skill = evaluate(model.model, model.tokenizer, evaluated, cfg, adapter="skill", label="skill", model_name=model.name, **common)
        source = None
        source_info = params.get("source")
        if source_info is not None:
            source = _eval_source(ctx, source_info, evaluated, cfg, common)
    finally:
        if adapter_info is not None:
            detach_adapter(model, "skill")
    report.update(
        {
            "adapter": adapter_info,
            "cross_model": bool(adapter_info and adapter_info["cross_model"]),
            "dataset": {"sha256": params["dataset"], "rows": len(rows), "evaluated": len(evaluated)},
            "protocol": {
                **{k: v for k, v in cfg.__dict__.items()},
                "prompt": "resa: SYSTEM_PROMPT + 'User:\\n {question}\\n\\nAssistant:\\n <think>'"
                if cfg.prompt_format == "resa"
                else "chat template: system = SYSTEM_PROMPT, user = question, then ' <think>'",
                "metric": "pass@1 = mean correctness over all samples; 95% Wilson interval; math-verify",
                "paper_defaults": {"temperature": defaults.temperature, "top_p": defaults.top_p},
            },
            "skill": None,
            "source": None,
            **compare(base, skill, source),
        }
    )
    if skill is not None:
        report["skill"]["adapter"] = params["skill"]
    if source is not None:
        ref = source_info.get("adapter") or source_info.get("skill")
        report["source"] = {**report["source"], **source_info, "adapter": ref}
    if ctx.job_id:
        report["job_id"] = ctx.job_id
    return report


def _eval_source(ctx: TaskContext, source: dict, rows, cfg, common):
    from resa_engine.adapter import detach_adapter
    from resa_engine.evaluate import evaluate

    model = ctx.load_model(source["model"])
    ref = source.get("adapter") or source.get("skill")
    if ref is None:
        return evaluate(model.model, model.tokenizer, rows, cfg, label="source", model_name=model.name, **common)
    attach_stored(ctx, model, ref, "source")
    try:
        return evaluate(model.model, model.tokenizer, rows, cfg, adapter="source", label="source", model_name=model.name, **common)
    finally:
        detach_adapter(model, "source")
