"""`resa eval`: pass@1 on verified QA, the model bare and with a skill's adapter, side by side."""

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
    p.add_argument("--batch-size", type=int, metavar="B", help="sequences decoded together (default 8)")
    p.add_argument("--chat", action="store_true", help="prompt through the chat template instead of the plain Resa format")
    p.add_argument("--source-model", metavar="M", help="source model, evaluated too for the retention ratio")
    p.add_argument("--source-skill", metavar="SKILL", help="adapter attached to the source model (stored name or local folder)")
    p.add_argument("--json", action="store_true", help="print the full report (per question) as JSON")


def run(args) -> int:
    from app.tasks import TaskContext
    from app.tasks.evaluate import check_params, run_eval
    from resa_engine.data import load_qa_file, rows_to_jsonl

    from ._common import ProgressBar, print_json

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
    }
    if args.source_model:
        params["source"] = {"model": args.source_model, **({"adapter": args.source_skill} if args.source_skill else {})}
    params = {k: v for k, v in params.items() if v is not None}
    check_params({**params, "dataset": "-"})  # bad options fail before anything is read or written
    from resa_engine.evaluate import EvalConfig

    EvalConfig(**{k: params[k] for k in ("samples", "max_tokens", "temperature", "top_p", "batch_size", "prompt_format") if k in params}).validate()

    rows = load_qa_file(args.data)
    bar = ProgressBar(unit="seq")
    ctx = TaskContext.from_settings(progress=bar, allow_paths=True)
    # Datasets are content-addressed: storing the same rows again is a no-op, and an eval keeps
    # its dataset id so the report can be reproduced.
    params["dataset"] = ctx.store.put_dataset(rows_to_jsonl(rows), len(rows)).sha256
    try:
        report = run_eval(params, ctx)
    finally:
        bar.close()
    if args.json:
        print_json(report)
        return 0
    print(_table(report))
    return 0


def _row(label: str, s: dict) -> str:
    lo, hi = s["ci95"]
    who = s["model"] + (f" + {s['adapter']}" if s.get("adapter") else "")
    return f"{label:<7} {who:<32} {s['accuracy']:>8.3f}  [{lo:.3f}, {hi:.3f}] {s['correct']:>6}/{s['total']:<6}"


def _table(report: dict) -> str:
    lines = [f"{'':<7} {'MODEL':<32} {'PASS@1':>8}  {'95% CI':<14} {'CORRECT':>13}"]
    for label in ("base", "skill", "source"):
        if report.get(label):
            lines.append(_row(label, report[label]))
    d = report["dataset"]
    tail = f"{d['evaluated']} questions x {report['protocol']['samples']} samples"
    if report.get("delta") is not None:
        tail += f"; skill - base = {report['delta']:+.3f}"
    if report.get("retention") is not None:
        tail += f"; retention = {report['retention']:.3f}"
    if report.get("cross_model"):
        tail += "; adapter attached cross-model"
    lines.append(tail)
    return "\n".join(lines)
