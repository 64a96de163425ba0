"""`resa eval`: pass@1 on verified QA of several arms (base, skill, source, controls), each paired with the base."""

NAME, ORDER = "eval", 60
HELP = "evaluate pass@1 on verified QA: base vs skill (and retention against a source)"


def register(p) -> None:
    p.add_argument("--model", required=True, metavar="M", help="registered model name or local HF folder / GGUF file")
    p.add_argument("--skill", metavar="SKILL", help="also evaluate with the adapter (model, SKILL), or `target:skill`")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="verified QA rows: {question, answer} per line")
    p.add_argument("--samples", type=int, metavar="N", help="completions per question (default 4)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="most new tokens per completion (default 512)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 0.6, the paper's)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default 0.95, the paper's)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N questions")
    p.add_argument("--seed", type=int, help="base seed (default 0)")
    p.add_argument("--batch-size", type=int, metavar="B", help="sequences decoded together (default 32)")
    p.add_argument("--chat", action="store_true", help="prompt through the chat template instead of the plain Resa format")
    p.add_argument("--source-model", metavar="M", help="source model, evaluated too for the retention ratio")
    p.add_argument("--source-skill", metavar="SKILL", help="adapter attached to the source model (stored name or local folder)")
    p.add_argument(
        "--control", action="append", choices=("base", "source", "resa", "sae_kept", "random_sae", "sft", "self"), metavar="NAME",
        help="an arm by name, with --skill (repeat for several): base, source, resa, sae_kept (the skill's SAE kept at inference), "
        "random_sae, sft, self; the adapters of the last three must exist (resa tune --random-sae / --objective sft --name SKILL.<control>)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the full report (per question) as JSON")


def run(args) -> int:
    from app.tasks import TaskContext
    from app.tasks.evaluate import check_params, run_eval
    from resa_engine.data import load_qa_file, rows_to_jsonl

    from ._common import ProgressBar, print_json, run_task

    if args.source_skill and not args.source_model:
        raise ValueError("--source-skill needs --source-model")
    params = {
        "model": args.model,
        "skill": args.skill,
        "samples": args.samples,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "limit": args.limit,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "prompt_format": "chat" if args.chat else None,
        "controls": args.control,
    }
    if args.source_model:
        params["source"] = {"model": args.source_model, **({"adapter": args.source_skill} if args.source_skill else {})}
    params = {k: v for k, v in params.items() if v is not None}
    check_params({**params, "dataset": "-"})  # bad options fail before anything is read or written
    from resa_engine.evaluate import EvalConfig

    EvalConfig(**{k: params[k] for k in ("samples", "max_tokens", "temperature", "top_p", "batch_size", "prompt_format") if k in params}).validate()

    rows = load_qa_file(args.data)
    ctx = TaskContext.from_settings(progress=ProgressBar(unit="seq"), allow_paths=True)
    # Datasets are content-addressed: storing the same rows again is a no-op, and an eval keeps
    # its dataset id so the report can be reproduced.
    params["dataset"] = ctx.store.put_dataset(rows_to_jsonl(rows), len(rows)).sha256
    report = run_task(run_eval, params, ctx)
    if args.json:
        print_json(report)
        return 0
    print(_table(report))
    return 0


def _row(label: str, s: dict, arm: dict) -> str:
    lo, hi = s["ci95"]
    who = s["model"] + (f" + {s['adapter']}" if s.get("adapter") else "")
    diff = ""
    if arm.get("diff_vs_base") is not None:
        dlo, dhi = arm["diff_ci95"]
        diff = f"{arm['diff_vs_base']:+.3f} [{dlo:+.3f}, {dhi:+.3f}] p={arm['mcnemar_p']:.3g}"
    return f"{label:<10} {who:<36} {s['accuracy']:>7.3f}  [{lo:.3f}, {hi:.3f}] {s['correct']:>6}/{s['total']:<6} {diff}"


def _table(report: dict) -> str:
    """Every arm; each against the base, paired on the same questions (difference, 95% interval, McNemar p)."""
    lines = [f"{'ARM':<10} {'MODEL':<36} {'PASS@1':>7}  {'95% CI':<14} {'CORRECT':>13} {'VS BASE (PAIRED 95% CI)'}"]
    for label, arm in report["arms"].items():
        lines.append(_row(label, report[label], arm))
    d = report["dataset"]
    tail = f"{d['evaluated']} questions x {report['protocol']['samples']} samples"
    ret = (report["arms"].get("skill") or {}).get("retention")
    if ret:
        tail += f"; retention = {ret['value']:.3f}" if ret.get("defined") else f"; retention undefined ({ret.get('reason')})"
    if report.get("cross_model"):
        tail += "; adapter attached cross-model"
    lines.append(tail)
    return "\n".join(lines)
