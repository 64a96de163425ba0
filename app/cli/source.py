"""`resa source`: train the LoRA a skill is extracted from (GRPO, as the paper's sources, or SFT)."""

NAME, ORDER = "source", 25
HELP = "train a source LoRA on a registered model (GRPO on an accuracy reward, or SFT) and store it as an adapter"


def register(p) -> None:
    p.add_argument("--model", required=True, metavar="M", help="registered model name")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="verified QA rows: {question, answer} per line")
    p.add_argument("--name", required=True, metavar="NAME", help="the LoRA's name in the store (then: resa extract --source M --source-adapter NAME)")
    p.add_argument("--method", choices=("grpo", "sft"), default="grpo", help="grpo (the paper's kind of source, default) or sft (cheaper stand-in)")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="a field of the method's config (GRPOSourceConfig / SFTConfig), value as JSON; repeat for several, e.g. --option steps=8",
    )  # fmt: skip
    p.add_argument("--replace", action="store_true", help="replace an existing adapter of that name")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON instead of a summary")


def _options(pairs: list[str]) -> dict:
    import json

    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option wants KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def run(args) -> int:
    from app.tasks import TaskContext
    from app.tasks.source import check_params, run_source

    from ._common import ProgressBar, print_json, run_task

    params = {"model": args.model, "name": args.name, "dataset": "0" * 64, "method": args.method, "options": _options(args.option), "replace": args.replace}
    check_params(params)  # bad options fail before anything is read or written
    ctx = TaskContext.from_settings(progress=ProgressBar(unit="step"))
    ctx.registry.get(args.model)

    from resa_engine.data import load_qa_file

    result = run_task(run_source, params, ctx, load_qa_file(args.data, max_rows=ctx.settings.max_dataset_rows))
    m = result["manifest"]
    if args.json:
        print_json(m)
        return 0
    start, end = m.get("reward_start", m.get("loss_start")), m.get("reward_end", m.get("loss_end"))
    what = "reward" if "reward_start" in m else "loss"
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    print(f"adapter {args.model}/{args.name} committed: {args.method} source, {what} {fmt(start)} -> {fmt(end)}, {m.get('wall_s', 0):.1f} s")
    return 0
