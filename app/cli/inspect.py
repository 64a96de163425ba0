"""`resa inspect`: which SAE latents of a skill fire on each token of a prompt."""

NAME, ORDER = "inspect", 70
HELP = "show the top SAE latents of a skill on each token of a prompt"


def register(p) -> None:
    p.add_argument("--skill", required=True, help="skill name in the store")
    p.add_argument("--model", required=True, help="registered model name or local model path (must match the SAE width)")
    p.add_argument("--layer", type=int, default=None, help="SAE layer (default: the skill's default layer)")
    p.add_argument("--top", type=int, default=8, help="latents shown per token (default 8)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("prompt", help="text to inspect")


def run(args) -> int:
    from resa_engine.artifacts import Skill, sae_subdir
    from resa_engine.transparency.cards import load_cards
    from resa_engine.transparency.inspect import inspect_prompt

    from ._common import load, print_json, store

    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    st = store()
    folder = st.fetch("skill", (args.skill,))  # unknown skill: ArtifactNotFound, before any model loads
    skill = Skill(args.skill, st.manifest("skill", (args.skill,)), folder)
    layer = skill.layer(args.layer)
    model = load(args.model)
    skill.check_fits(model.name, model.hidden_size, model.num_layers, layer)
    sae = skill.sae(layer, device=model.device)
    tokens = inspect_prompt(model, sae, layer, args.prompt, top_n=args.top)
    try:
        cards = load_cards(folder / sae_subdir(layer))
    except (FileNotFoundError, ValueError):
        cards = None  # skills extracted before latent cards existed carry none

    if args.json:
        out = {"skill": args.skill, "model": model.name, "layer": layer, "tokens": [t.to_dict() for t in tokens]}
        if cards is not None:
            for t in out["tokens"]:
                for lat in t["latents"]:
                    lat["density"] = cards.card(lat["index"]).density
        print_json(out)
        return 0
    print(f"skill {args.skill!r} on {model.name}, layer {layer}: top {args.top} latents per token (index:activation)")
    for t in tokens:
        latents = "  ".join(f"{i}:{a:.3g}" for i, a in t.latents) or "-"
        print(f"{t.position:>5} {t.token!r:<16} {latents}")
    if cards is not None:
        shown = sorted({i for t in tokens for i, _ in t.latents[:1]})
        print("\nstrongest latents, top context over the training data:")
        for i in shown:
            card = cards.card(i)
            ctx = card.contexts[0].text if card.contexts else "-"
            print(f"  {i:>6} density {card.density:.4f}  {ctx!r}")
    return 0
