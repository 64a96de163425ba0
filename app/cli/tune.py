"""`resa tune`: build a skill's LoRA adapter for a target model (Stage II, SAE-guided tuning)."""

NAME, ORDER = "tune", 40
HELP = "build a skill's adapter for a target: LoRA trained with the skill's SAE spliced in (SAE-guided tuning)"


def register(p) -> None:
    p.add_argument("--skill", required=True, metavar="SKILL", help="stored skill name")
    p.add_argument("--target", required=True, metavar="M", help="registered target model name")
    p.add_argument("--data", metavar="FILE.jsonl", help="verified QA rows to tune on (default: the skill's dataset)")
    p.add_argument("--objective", choices=("kl", "ce", "sft"), help="kl (authors' code, default), ce (paper text) or sft (the SFT baseline control)")
    p.add_argument("--random-sae", action="store_true", help="the random-SAE control: tune against an untrained SAE of the same shape")
    p.add_argument("--name", metavar="NAME", help="the adapter's name in the store (default: the skill's; e.g. SKILL.random-sae for a control)")
    p.add_argument("--splice-grad", action="store_true", help="let gradients flow through the SAE splice (all adapters learn)")
    p.add_argument("--layer", type=int, metavar="I", help="which of the skill's SAE layers to splice (default: the skill's default)")
    p.add_argument("--epochs", type=float, help="passes over the data (default 2)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-6)")
    p.add_argument("--lora-r", type=int, metavar="R", help="LoRA rank (default 32)")
    p.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA alpha (default 128)")
    p.add_argument("--lora-dropout", type=float, metavar="P", help="LoRA dropout (default 0.05)")
    p.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps")
    p.add_argument("--chunk-len", type=int, metavar="L", help="tokens per training chunk (default 2048)")
    p.add_argument("--batch-size", type=int, metavar="B", help="chunks per step (default 1)")
    p.add_argument("--schedule", choices=("constant", "cosine"), help="learning-rate schedule (default constant)")
    p.add_argument("--seed", type=int, help="seed for LoRA init, data order and dropout (default 0)")
    p.add_argument("--replace", action="store_true", help="replace an existing adapter for this target and skill")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON instead of a summary")


def run(args) -> int:
    from adapters_store import ArtifactConflict, check_name
    from app.tasks import TaskContext
    from app.tasks.tune import run_tune, tune_config

    from ._common import ProgressBar, print_json, run_task

    check_name(args.skill, "skill name")
    lora = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout}
    params = {
        "skill": args.skill,
        "target": args.target,
        "objective": args.objective,
        "splice_grad": args.splice_grad or None,
        "random_sae": args.random_sae or None,
        "name": args.name,
        "layer": args.layer,
        "epochs": int(args.epochs) if args.epochs is not None and args.epochs.is_integer() else args.epochs,
        "lr": args.lr,
        "max_steps": args.max_steps,
        "chunk_len": args.chunk_len,
        "batch_size": args.batch_size,
        "schedule": args.schedule,
        "seed": args.seed,
        "lora": {k: v for k, v in lora.items() if v is not None},
        "replace": args.replace,
    }
    params = {k: v for k, v in params.items() if v is not None}
    tune_config(params)  # bad options fail before anything is read or written
    ctx = TaskContext.from_settings(progress=ProgressBar(unit="step"))
    ctx.registry.get(args.target)
    name = check_name(args.name or args.skill, "adapter name")
    if ctx.store.exists("adapter", (args.target, name)) and not args.replace:
        raise ArtifactConflict(f"adapter {args.target}/{name} already exists (delete it first or pass --replace)")
    ctx.store.manifest("skill", (args.skill,))  # the skill must exist before data is stored

    rows = None
    if args.data:
        from resa_engine.data import load_qa_file

        rows = load_qa_file(args.data, max_rows=ctx.settings.max_dataset_rows)
    result = run_task(run_tune, params, ctx, rows)

    m = result["manifest"]
    if args.json:
        print_json(m)
        return 0
    print(f"{'STEPS':>6} {'KL START':>10} {'KL END':>10} {'LAYER':>5} {'OBJECTIVE':>9} {'WALL S':>8}")
    print(f"{m['train']['steps']:>6} {m['kl_start']:>10.5f} {m['kl_end']:>10.5f} {m['layer']:>5} {m['objective']:>9} {m['wall_s']:>8.1f}")
    print(f"adapter {m['target']['model']}/{name} committed (objective {m['objective']}, splice_grad {m['splice_grad']}, random SAE {m['random_sae']})")
    return 0


