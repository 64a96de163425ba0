"""`resa extract`: train a skill (one SAE per layer, one pass over the data) from a source model."""

NAME, ORDER = "extract", 30
HELP = "extract a skill: train TopK SAEs on a source model's residual stream over verified QA data"


def register(p) -> None:
    p.add_argument("--source", required=True, metavar="M", help="source model: registered name or local HF folder / GGUF file")
    p.add_argument("--source-adapter", metavar="DIR", help="PEFT LoRA folder (or stored adapter name) merged into the source")
    p.add_argument("--layer", type=int, action="append", required=True, metavar="I", help="decoder block index (repeat for several, one pass)")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="verified QA rows: {question, answer} per line")
    p.add_argument("--name", required=True, metavar="SKILL", help="skill name in the store")
    width = p.add_mutually_exclusive_group()
    width.add_argument("--latents", type=int, metavar="N", help="SAE width in latents")
    width.add_argument("--expansion", type=int, metavar="F", help="SAE width as a multiple of the hidden size (default 32)")
    p.add_argument("--k", type=int, help="active latents per token (default 32)")
    p.add_argument("--max-tokens", type=int, metavar="T", help="cap on training tokens")
    p.add_argument("--epochs", type=int, metavar="N", help="passes over the training chunks (default 1)")
    p.add_argument("--chunk-len", type=int, metavar="L", help="tokens per training sequence (default 2048)")
    p.add_argument("--batch-size", type=int, metavar="B", help="sequences per step (default 8)")
    p.add_argument("--lr", type=float, help="learning rate (default: sparsify's, scaled by width)")
    p.add_argument("--optimizer", choices=("signum", "adam"), help="default signum (schedule-free SignSGD)")
    p.add_argument("--auxk-alpha", type=float, metavar="A", help="AuxK loss weight (default 1/32)")
    p.add_argument("--heldout-fraction", type=float, metavar="F", help="share of rows held out for metrics (default 0.1)")
    p.add_argument("--heldout-tokens", type=int, metavar="T", help="cap on held-out tokens scored (default 8192)")
    p.add_argument("--seed", type=int, metavar="S", help="seed for SAE init, data order and the held-out split (default 0)")
    p.add_argument("--default-layer", type=int, metavar="I", help="layer the skill uses by default (default: best loss recovered)")
    p.add_argument("--init-from", metavar="DIR", help="fine-tune from an existing skill (stored name or local folder)")
    p.add_argument("--replace", action="store_true", help="replace an existing skill of the same name")
    p.add_argument("--no-cards", action="store_true", help="skip latent cards, reasoning-feature counts and the layer report")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON instead of a table")


def run(args) -> int:
    from adapters_store import ArtifactConflict, check_name
    from app.tasks import TaskContext
    from app.tasks.extract import run_extract
    from resa_engine.data import load_qa_file

    from ._common import ProgressBar, print_json, run_task

    check_name(args.name, "skill name")
    rows = load_qa_file(args.data)
    ctx = TaskContext.from_settings(progress=ProgressBar(unit="tok"), allow_paths=True)
    if ctx.store.exists("skill", (args.name,)) and not args.replace:
        raise ArtifactConflict(f"skill {args.name!r} already exists (delete it first or pass --replace)")

    sae = {"num_latents": args.latents, "expansion_factor": args.expansion, "k": args.k}
    train = {
        "max_tokens": args.max_tokens,
        "epochs": args.epochs,
        "chunk_len": args.chunk_len,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "auxk_alpha": args.auxk_alpha,
        "heldout_fraction": args.heldout_fraction,
        "heldout_max_tokens": args.heldout_tokens,
        "cards": False if args.no_cards else None,
        "seed": args.seed,
    }
    params = {
        "name": args.name,
        "source": {"model": args.source, **({"adapter": args.source_adapter} if args.source_adapter else {})},
        "layers": args.layer,
        "sae": {k: v for k, v in sae.items() if v is not None},
        "train": {k: v for k, v in train.items() if v is not None},
        "default_layer": args.default_layer,
        "init_from": args.init_from,
        "replace": args.replace,
    }
    result = run_task(run_extract, params, ctx, rows)

    manifest = result["manifest"]
    if args.json:
        print_json(manifest)
        return 0
    print(_table(manifest))
    print(f"skill {result['skill']}: layers {manifest['layers']}, default layer {manifest['default_layer']}, "
          f"{manifest['tokens_seen']:,} tokens in {manifest['wall_s']:.1f}s")
    if "report.png" in (manifest.get("files") or {}):
        print(f"layer report: {ctx.store.fetch('skill', (result['skill'],)) / 'report.png'}")
    return 0


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(manifest: dict) -> str:
    head = f"{'LAYER':>5} {'FVU':>7} {'EXPL.VAR':>8} {'L0':>6} {'DEAD':>6} {'LOSS CLEAN':>10} {'SPLICED':>8} {'ZERO':>8} {'RECOVERED':>9} {'KL':>7}"
    lines = [head]
    for layer in manifest["layers"]:
        m = manifest["metrics"][str(layer)]
        mark = "*" if layer == manifest["default_layer"] else " "
        lines.append(
            f"{layer:>4}{mark} {_fmt(m['fvu'], '7.4f')} {_fmt(m['explained_variance'], '8.4f')} {_fmt(m['l0'], '6.1f')} "
            f"{_fmt(m['dead_fraction'], '6.3f')} {_fmt(m['loss_clean'], '10.4f')} {_fmt(m['loss_spliced'], '8.4f')} "
            f"{_fmt(m['loss_zero'], '8.4f')} {_fmt(m['loss_recovered'], '9.4f')} {_fmt(m['kl'], '7.4f')}"
        )
    return "\n".join(lines)
