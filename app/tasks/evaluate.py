"""`POST /evals` and `resa eval`: pass@1 of several arms on the same questions, each paired with the base.

params (the HTTP body):
  {"model": str, "skill": str?, "dataset": sha256, "samples": int? (completions per question),
   "temperature": number?, "top_p": number?, "max_tokens": int?, "limit": int? (first N questions),
   "seed": int?, "batch_size": int?, "prompt_format": "resa"|"chat"?,
   "source": {"model": str, "skill": str? | "adapter": str?}?, "controls": [name]?, "arms": [{label, model?, adapter?, sae?}]?}
`skill` names the adapter (model, skill); `target:skill` takes an adapter built on another model
(a cross-model attach, reported). With `source` the source model (optionally with its adapter)
is evaluated too and the retention ratio (skill - base) / (source - base) is reported, with its interval, or as
undefined when the source's own gain is not clearly non-zero. `controls` adds arms by name (EVAL_CONTROLS of the
API schemas; their adapters are built by jobs the submission queues first), `arms` any further arm.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from adapters_store import check_name

from . import TaskContext, check_object

PARAMS = (
    "model", "skill", "dataset", "samples", "temperature", "top_p", "max_tokens", "limit", "seed", "batch_size", "prompt_format",
    "source", "controls", "arms",
)  # fmt: skip


def adapter_ref(model: str, ref: str) -> tuple[str, str]:
    """(target, skill) of an adapter reference: `skill` (built on `model`) or `target:skill`."""
    if not isinstance(ref, str) or not ref:
        raise ValueError("an adapter reference must be a skill name or `target:skill`")
    target, sep, skill = ref.rpartition(":")
    if not sep:
        target, skill = model, ref
    return check_name(target, "model name"), check_name(skill, "skill name")


class EvalEngines:
    """The evaluation's engines, one per model, started on first use and stopped together; stored
    adapters (or, CLI only, local folders) resolved and checked against the model up front."""

    def __init__(self, ctx: TaskContext, cfg):
        self.ctx, self.cfg = ctx, cfg
        self.engines: dict[str, Any] = {}
        self.folders: dict[str, Path] = {}
        self.described: dict[str, dict] = {}
        """Engine key -> what the report says of the adapter (target, skill, cross_model)."""

    def engine(self, name: str):
        """The model's engine (RESA_ENGINE: native or vLLM), started on first use."""
        if name not in self.engines:
            from app.services.engines import build_engine, engine_config

            s = self.ctx.settings
            spec = self.ctx.registry.resolve(name, allow_path=self.ctx.allow_paths)
            native = s.engine_kind() == "native"
            model = self.ctx.load_model(name) if native else None
            context = model.context if native else None
            config = engine_config(
                s,
                max_batch=self.cfg.batch_size,
                max_new_tokens=max(int(s.max_new_tokens), self.cfg.max_tokens),
                max_prompt_tokens=max(int(s.max_prompt_tokens), context or 0),
            )
            self.engines[name] = build_engine(s, spec, adapter_loader=self.folders.__getitem__, config=config, model=model).start()
        return self.engines[name]

    def adapter(self, model_name: str, ref: str) -> tuple[str, dict]:
        """The engine key of an adapter reference on `model_name`, and what the report says of it."""
        from resa_engine.lora.peft_io import PeftAdapter

        local = Path(ref).expanduser()
        if self.ctx.allow_paths and ("/" in ref or ref.startswith(".")) and local.is_dir():
            folder, info = local.resolve(), {"path": str(local.resolve())}
        else:
            target, skill = adapter_ref(model_name, ref)
            folder, info = self.ctx.store.fetch("adapter", (target, skill)), {"target": target, "skill": skill}
        cross_model = PeftAdapter.read(folder).check(self.engine(model_name).shapes)  # AdapterMismatch names what does not fit
        key = f"{model_name}:{ref}"
        self.folders[key] = folder
        self.described[key] = {**info, "cross_model": cross_model}
        return key, self.described[key]

    def sae(self, model_name: str, spec: dict):
        """A stored skill's SAE at one layer, on the model's device, as a request-level SaeSplice (steer or splice)."""
        from resa_engine.artifacts import Skill
        from resa_engine.sae.edits import LatentEdit
        from resa_engine.sae.splice import SaeSplice

        name = check_name(spec["skill"], "skill name")
        engine = self.engine(model_name)
        folder = self.ctx.store.fetch("skill", (name,))
        skill = Skill(name, self.ctx.store.manifest("skill", (name,)), folder)
        layer = skill.check_fits(engine.name, engine.hidden_size, engine.num_layers, spec.get("layer"))
        edits = [LatentEdit(e["latent"], e["mode"], e["value"]) for e in spec.get("edits") or []]
        sae = skill.sae(layer, device=engine.device)
        return SaeSplice(sae, layer, edits, keep_error=spec.get("mode", "steer") == "steer", folder=str(folder))

    def close(self) -> None:
        for engine in self.engines.values():
            engine.stop(drain=False)


def check_params(params: dict) -> dict:
    check_object(params, PARAMS, unknown="eval parameter", not_object="eval parameters must be a JSON object")
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
    from pydantic import ValidationError

    from app.api.schemas import EVAL_CONTROLS, EvalArm

    controls = params.get("controls")
    if controls is not None:
        if not isinstance(controls, list) or any(c not in EVAL_CONTROLS for c in controls) or len(set(controls)) != len(controls):
            raise ValueError(f"`controls` must be distinct names among {', '.join(EVAL_CONTROLS)}")
        if not isinstance(params.get("skill"), str) or ":" in params["skill"]:
            raise ValueError("`controls` need `skill`, the name of a skill with an adapter built on `model`")
    try:
        [EvalArm.model_validate(arm) for arm in params.get("arms") or []]
    except ValidationError as exc:
        raise ValueError(f"`arms`: {exc.errors()[0]['msg']} at {'.'.join(map(str, exc.errors()[0]['loc']))}") from None
    return params


ARM_DESCRIPTIONS = {
    "base": "the target model alone",
    "source": "the skill's source: its model with its adapter",
    "skill": "Resa: the target with the adapter built from the skill",
    "sae_kept": "Resa with the skill's SAE kept at inference (splice mode: the Stage II student)",
    "random_sae": "random-SAE control: the same recipe against an untrained SAE of the same shape",
    "sft": "SFT control: the same LoRA trained with plain cross-entropy on the same trigger data",
    "self": "Resa with the target as its own source (source = target)",
}


CONTROL_SUFFIXES = {"random_sae": "random-sae", "sft": "sft", "self": "self"}
"""Controls with an adapter of their own, stored as (target, `<skill>.<suffix>`)."""


def control_name(skill: str, control: str) -> str:
    """The store name of a control's adapter (and, for `self`, of its skill)."""
    return f"{skill}.{CONTROL_SUFFIXES[control]}"


def _arms(params: dict, engines: "EvalEngines") -> list:
    """The arms an evaluation asks for: base, `skill`, `source`, the named controls, then custom arms."""
    from resa_engine.evaluate import Arm

    model, skill, controls = params["model"], params.get("skill"), params.get("controls")

    def arm(label: str, on: str, ref: str | None = None, sae=None, **describe) -> Arm:
        key = engines.adapter(on, ref)[0] if ref else None
        return Arm(label, engines.engine(on), adapter=key, sae=sae, describe={"description": ARM_DESCRIPTIONS.get(label, label), **describe})

    arms = [arm("base", model)]
    wanted = controls if controls is not None else (["resa"] if skill else [])
    if controls is not None and params.get("source") is None and "source" in controls:
        source = engines.ctx.store.manifest("skill", (skill,)).get("source") or {}
        if source.get("adapter") or source.get("model") != model:
            arms.append(arm("source", source["model"], source.get("adapter"), adapter=source.get("adapter"), model=source["model"]))
    for control in wanted:
        if control == "resa":
            arms.append(arm("skill", model, skill, adapter=skill))
        elif control == "sae_kept":
            layer = engines.ctx.store.manifest("adapter", (model, skill)).get("layer")
            sae = engines.sae(model, {"skill": skill, "layer": layer, "mode": "splice", "edits": []})
            arms.append(arm("sae_kept", model, skill, sae=sae, adapter=skill, sae_layer=sae.layer))
        elif control in ("random_sae", "sft", "self"):
            arms.append(arm(control, model, control_name(skill, control), adapter=control_name(skill, control)))
    source_info = params.get("source")
    if source_info is not None:
        ref = source_info.get("adapter") or source_info.get("skill")
        arms.append(arm("source", source_info["model"], ref, **{**source_info, "adapter": ref}))
    for custom in params.get("arms") or []:
        on = custom.get("model") or model
        sae = engines.sae(on, custom["sae"]) if custom.get("sae") else None
        arms.append(arm(custom["label"], on, custom.get("adapter"), sae=sae, adapter=custom.get("adapter"), model=on, sae_spec=custom.get("sae")))
    return arms


def run_eval(params: dict, ctx: TaskContext) -> dict[str, Any]:
    """Evaluate base (and skill, and source when given) on the dataset through the engines; the report puts
    them side by side, every arm paired with the base on the same questions and seeds."""
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

    engines = EvalEngines(ctx, cfg)
    try:
        model = params["model"]
        arms, adapter_info = _arms(params, engines), None
        if skill_ref is not None:
            adapter_info = engines.described.get(f"{model}:{skill_ref}")
        reports = evaluate(evaluated, arms, cfg, progress=ctx.progress, should_stop=ctx.should_stop)
    finally:
        engines.close()
    report: dict[str, Any] = {
        "model": model,
        "adapter": adapter_info,
        "cross_model": bool(adapter_info and adapter_info["cross_model"]),
        "dataset": {"sha256": params["dataset"], "rows": len(rows), "evaluated": len(evaluated)},
        "protocol": {
            **{k: v for k, v in cfg.__dict__.items()},
            "prompt": "resa: SYSTEM_PROMPT + 'User:\\n {question}\\n\\nAssistant:\\n <think>'"
            if cfg.prompt_format == "resa"
            else "chat template: system = SYSTEM_PROMPT, user = question, then ' <think>'",
            "metric": "pass@1 = mean correctness over all samples; 95% Wilson interval; every arm paired with the base "
            "on the same questions and seeds (paired bootstrap interval of the difference, exact McNemar test)",
            "paper_defaults": {"temperature": defaults.temperature, "top_p": defaults.top_p},
        },
        "skill": None,
        "source": None,
        **compare(reports),
    }
    if ctx.job_id:
        report["job_id"] = ctx.job_id
    if skill_ref is not None and ":" not in skill_ref and not (ctx.allow_paths and "/" in skill_ref):
        # kept beside the adapter, for its transfer report (GET /skills/{name}/adapters/{target}/report)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        report["report_name"] = ctx.store.put_report(model, skill_ref, f"eval-{stamp}-{(ctx.job_id or 'cli')[:8]}", report)
    return report
