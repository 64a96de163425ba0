"""The report as data: sections from the manifests and the evaluation, compute per stage, the verdict."""

from __future__ import annotations

from ..provenance import finite
from .arms import CONTRASTS, SOURCE_METHODS, arm_order, describe_arm
from .words import verdict


def transfer_report(
    skill_manifest: dict,
    adapter_manifest: dict,
    evaluation: dict | None,
    *,
    stages: list[dict] | None = None,
    source_method: str | None = None,
) -> dict:
    """The (skill, target) pair's report as a JSON-able dict.

    `evaluation` is what evaluate.compare returns (optionally inside run_eval's report, which adds
    `protocol` and `dataset`); None when nothing was evaluated. `stages` ({name, wall_s, compute})
    default to those the manifests and the evaluation record. `source_method`: "sft" or "grpo".
    """
    skill = _skill_section(skill_manifest, adapter_manifest)
    adapter = _adapter_section(adapter_manifest)
    transfer = adapter_manifest.get("transfer")
    ev = _evaluation_section(evaluation) if evaluation is not None else None
    protocol = _protocol(evaluation) if evaluation is not None else None
    stage_rows = [_stage(s) for s in stages] if stages is not None else _default_stages(skill_manifest, adapter_manifest, evaluation, protocol)
    walls = [s["wall_s"] for s in stage_rows if s["wall_s"] is not None]
    report = {
        "skill": skill,
        "adapter": adapter,
        "transfer": transfer,
        "evaluation": ev,
        "protocol": protocol,
        "stages": stage_rows,
        "total_wall_s": round(sum(walls), 3) if walls else None,
        "source_method": source_method,
        "source_method_description": SOURCE_METHODS.get(source_method) if source_method else None,
    }
    report = finite(report)  # before the verdict reads it: a NaN is "n/a", not "nan"
    report["verdict"] = verdict(report)
    return report


def _skill_section(m: dict, adapter: dict) -> dict:
    layer = adapter.get("layer", m.get("default_layer"))
    metrics = (m.get("metrics") or {}).get(str(layer)) or (m.get("metrics") or {}).get(layer) or {}
    sae = m.get("sae") or {}
    source = m.get("source") or {}
    return {
        "name": m.get("name") or adapter.get("skill"),
        "source_model": source.get("model"),
        "source_adapter": source.get("adapter"),
        "layer": layer,
        "d_in": m.get("d_in"),
        "num_latents": sae.get("num_latents"),
        "k": sae.get("k"),
        "expansion_factor": sae.get("expansion_factor"),
        "fvu_source": metrics.get("fvu"),
        "loss_recovered_source": metrics.get("loss_recovered"),
        "kl_source": metrics.get("kl"),
        "tokens_seen": m.get("tokens_seen"),
        "dataset_rows": (m.get("dataset") or {}).get("rows"),
        "wall_s": m.get("wall_s"),
    }


def _adapter_section(m: dict) -> dict:
    train = m.get("train") or {}
    lora = m.get("lora") or {}
    dataset = m.get("dataset") or {}
    return {
        "target": (m.get("target") or {}).get("model"),
        "objective": m.get("objective"),
        "random_sae": m.get("random_sae"),
        "lr": train.get("lr"),
        "steps": train.get("steps"),
        "epochs": train.get("epochs"),
        "batch_size": train.get("batch_size"),
        "chunk_len": train.get("chunk_len"),
        "tokens": train.get("tokens"),
        "splice_grad": m.get("splice_grad"),
        "lora_r": lora.get("r"),
        "lora_alpha": lora.get("alpha"),
        "seed": m.get("seed"),
        "train_rows": dataset.get("train_rows", dataset.get("rows")),
        "heldout_rows": dataset.get("heldout_rows"),
        "kl_start": m.get("kl_start"),
        "kl_end": m.get("kl_end"),
        "wall_s": m.get("wall_s"),
    }


def _evaluation_section(evaluation: dict) -> dict:
    raw = evaluation.get("arms")
    if not isinstance(raw, dict) or not raw:
        raise ValueError("evaluation has no `arms` (the shape resa_engine.evaluate.compare returns)")
    arms = []
    for label in arm_order(raw):
        e = raw[label]
        name, subject, description = describe_arm(label, e)
        ret = e.get("retention")
        arms.append({
            "label": label,
            "name": name,
            "subject": subject,
            "description": description,
            "acc": e.get("acc"),
            "ci95": e.get("ci95"),
            "n": e.get("n"),
            "diff_vs_base": e.get("diff_vs_base"),
            "diff_ci95": e.get("diff_ci95"),
            "mcnemar_p": e.get("mcnemar_p"),
            "retention": dict(ret) if isinstance(ret, dict) else None,
        })  # fmt: skip
    contrasts = [c for c in (_contrast(evaluation, spec) for spec in CONTRASTS) if c is not None]
    return {"base": "base" if "base" in raw else None, "arms": arms, "contrasts": contrasts}


def _contrast(evaluation: dict, spec: tuple) -> dict | None:
    """Arm a against arm b, paired on the same questions and seeds when per-question results are present."""
    a, b, question, *_ = spec
    arms = evaluation["arms"]
    if a not in arms or b not in arms:
        return None
    out = {"a": a, "b": b, "question": question, "acc_a": arms[a].get("acc"), "acc_b": arms[b].get("acc"),
           "diff": None, "ci95": None, "mcnemar_p": None, "paired": False}  # fmt: skip
    tables = _correct_tables(evaluation, a, b)
    if tables is not None:
        from ..stats import paired_comparison

        pc = paired_comparison(tables[1], tables[0])  # diff = a - b
        out.update(diff=pc.diff, ci95=list(pc.ci95), mcnemar_p=pc.mcnemar_p, paired=True)
    elif out["acc_a"] is not None and out["acc_b"] is not None:
        out["diff"] = out["acc_a"] - out["acc_b"]
    return out


def _correct_tables(evaluation: dict, *labels: str) -> list[list[list[bool]]] | None:
    questions = evaluation.get("questions")
    if not isinstance(questions, list) or not questions:
        return None
    tables = []
    for label in labels:
        rows = [((q.get(label) or {}).get("correct")) for q in questions]
        if any(not isinstance(r, list) or not r for r in rows):
            return None
        tables.append(rows)
    if any(len(x) != len(y) for x, y in zip(*tables)):
        return None
    return tables


def _protocol(evaluation: dict) -> dict:
    p = evaluation.get("protocol") or {}
    dataset = evaluation.get("dataset") or {}
    questions = dataset.get("evaluated")
    if questions is None and isinstance(evaluation.get("questions"), list):
        questions = len(evaluation["questions"])
    keys = ("samples", "temperature", "top_p", "max_tokens", "seed", "prompt_format")
    return {**{k: p.get(k) for k in keys}, "questions": questions, "dataset": dataset.get("sha256")}


def _stage(s: dict) -> dict:
    detail = s.get("detail") or {}
    compute = s.get("compute", s.get("work", detail.get("work")))
    wall = s.get("wall_s")
    return {"name": str(s.get("name", "?")), "wall_s": float(wall) if wall is not None else None, "compute": compute or ""}


def _default_stages(skill: dict, adapter: dict, evaluation: dict | None, protocol: dict | None) -> list[dict]:
    """The stages the manifests and the evaluation record, with the work each did."""
    out = []
    sae = skill.get("sae") or {}
    if skill.get("wall_s") is not None:
        tokens = skill.get("tokens_seen")
        work = f"{tokens:,} activation tokens" if isinstance(tokens, int) else ""
        if sae.get("num_latents"):
            work += f"{', ' if work else ''}{sae['num_latents']:,} latents x {len(skill.get('layers') or [1])} layer(s)"
        out.append({"name": f"extract skill {skill.get('name')}", "wall_s": float(skill["wall_s"]), "compute": work})
    if adapter.get("wall_s") is not None:
        t = adapter.get("train") or {}
        work = f"{t['steps']} steps x {t.get('batch_size', 1)} x {t.get('chunk_len')} tokens" if t.get("steps") is not None else ""
        target = (adapter.get("target") or {}).get("model")
        out.append({"name": f"tune adapter \u2192 {target}", "wall_s": float(adapter["wall_s"]), "compute": work})
    if evaluation is not None:
        summaries = [evaluation[k] for k in (evaluation.get("arms") or {}) if isinstance(evaluation.get(k), dict)]
        walls = [s["wall_s"] for s in summaries if s.get("wall_s") is not None]
        if walls:
            tokens = sum(int(s.get("completion_tokens") or 0) for s in summaries)
            q, k = (protocol or {}).get("questions"), (protocol or {}).get("samples")
            work = f"{len(summaries)} arms" + (f" x {q} questions" if q else "") + (f" x {k} samples" if k else "")
            work += f", {tokens:,} tokens generated"
            out.append({"name": "evaluate", "wall_s": float(max(walls)), "compute": work})  # arms run side by side
    return out
