"""`resa demo`: the end-to-end skill transfer on the bundled model, over HTTP against an embedded service.

Run again with the same settings (and --workdir), it resumes: what an earlier run made is reused.
A permanent failure prints `resa demo: error: <reason>` (one line) and exits with status 1.
"""

NAME, ORDER = "demo", 90
HELP = "run the end-to-end skill transfer on the bundled SmolLM2-135M (starts the service in embedded mode)"


def register(p) -> None:
    p.add_argument("--quick", action="store_true", help="little data: the same path in a few minutes (CI smoke test)")
    p.add_argument("--workdir", default="data/demo", help="where the demo's store (one per settings: a rerun resumes) and server logs go")
    p.add_argument("--report-dir", default="reports", help="where the report (markdown, PNG chart, JSON) is written")
    p.add_argument("--layer", type=int, help="hookpoint layer (default 12)")
    p.add_argument("--source", choices=["sft", "grpo"], help="how the source LoRA is trained: sft (default, fits the time) or grpo (the paper's kind)")
    p.add_argument("--grpo-steps", type=int, help="GRPO steps of a grpo source (default 8)")
    p.add_argument("--objective", choices=["kl", "ce"], help="Stage II objective (default kl)")
    p.add_argument("--splice-grad", action="store_true", help="differentiable SAE splice")
    p.add_argument("--tune-lr", type=float, help="Stage II learning rate")
    p.add_argument("--tune-steps", type=int, help="Stage II step cap")
    p.add_argument("--train-rows", type=int, help="training rows")
    p.add_argument("--test-rows", type=int, help="held-out rows")
    p.add_argument("--self", action="store_true", help="also evaluate the source = target control (an SAE from the base itself)")
    p.add_argument("--sft-control", action="store_true", help="also evaluate the SFT control (the same LoRA trained on the rows directly)")


def run(args) -> int:
    import json
    import sys
    from dataclasses import replace
    from pathlib import Path

    from app.local.demo import DemoConfig, DemoError, format_table, run_demo

    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    overrides = {
        "layer": args.layer, "objective": args.objective, "tune_lr": args.tune_lr, "tune_max_steps": args.tune_steps,
        "train_rows": args.train_rows, "test_rows": args.test_rows, "source_method": args.source,
    }
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if args.grpo_steps is not None:
        cfg = replace(cfg, grpo={**cfg.grpo, "steps": args.grpo_steps})
    if args.splice_grad:
        cfg = replace(cfg, splice_grad=True)
    if args.self:
        cfg = replace(cfg, self_variant=True)
    if args.sft_control:
        cfg = replace(cfg, sft_control=True)
    try:
        summary = run_demo(cfg, Path(args.workdir), Path(args.report_dir))
    except DemoError as exc:
        print(f"resa demo: error: {exc}", file=sys.stderr)
        return 1
    print(format_table(summary))
    print(f"\nreport: {summary['report']}")
    figures = {k: summary.get(k) for k in ("base_acc", "source_acc", "resa_acc", "retention", "resa_self_acc", "retention_self")}
    print(json.dumps({**figures, "arms": summary["arms"], "stage_wall_s": summary["stage_wall_s"], "total_wall_s": summary["total_wall_s"]}))
    return 0
