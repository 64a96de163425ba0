"""`resa generate`: one completion from a model, optionally with a skill's adapter attached."""

NAME, ORDER = "generate", 50
HELP = "generate a completion (optionally with a skill's adapter attached for this call)"


def register(p) -> None:
    p.add_argument("--model", required=True, metavar="M", help="registered model name or local HF folder / GGUF file")
    p.add_argument("--skill", metavar="SKILL", help="attach the adapter (model, SKILL), or `target:skill` built on another model")
    p.add_argument("--chat", action="store_true", help="send PROMPT as a user message through the chat template")
    p.add_argument("--max-tokens", type=int, default=256, metavar="N", help="most new tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--seed", type=int, help="same seed, same output")
    p.add_argument("--stop", action="append", default=[], metavar="S", help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print text, finish_reason and usage as JSON")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text")


def run(args) -> int:
    import sys

    from app.settings import get_settings
    from app.tasks import TaskContext
    from app.tasks.evaluate import adapter_ref, attach_stored
    from resa_engine.generate import format_prompt, generate_batch
    from resa_engine.progress import Progress
    from resa_engine.sampling import SamplingParams

    from ._common import ProgressBar, print_json

    settings = get_settings()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop)
    if args.max_tokens > settings.max_new_tokens:
        raise ValueError(f"--max-tokens {args.max_tokens} is over the limit of {settings.max_new_tokens}")
    ctx = TaskContext.from_settings(settings, allow_paths=True)
    if args.skill and "/" not in args.skill:
        ctx.store.manifest("adapter", adapter_ref(args.model, args.skill))  # a missing adapter fails before the model loads
    model = ctx.load_model(args.model)
    adapter = None
    if args.skill:
        info = attach_stored(ctx, model, args.skill, "skill")
        adapter = "skill"
        if info["cross_model"]:
            print(f"resa generate: note: adapter built on another model ({info.get('target', info.get('path'))}), attached cross-model", file=sys.stderr)
    if args.chat:
        ids = format_prompt(model.tokenizer, messages=[{"role": "user", "content": args.prompt}])
    else:
        ids = format_prompt(model.tokenizer, prompt=args.prompt)
    if len(ids) > settings.max_prompt_tokens:
        raise ValueError(f"prompt is {len(ids)} tokens, over the limit of {settings.max_prompt_tokens}")
    bar, done = ProgressBar(unit="tok"), [0]

    def on_token(_rows: int) -> None:
        done[0] += 1
        bar(Progress("generate", done[0], params.max_tokens))

    try:
        out = generate_batch(model.model, model.tokenizer, [ids], params, adapter=adapter, seeds=[params.seed], on_token=on_token)[0]
    finally:
        bar.close()
    if args.json:
        print_json({"text": out.text, "finish_reason": out.finish_reason, "usage": out.usage.to_dict(), "model": model.name, "skill": args.skill})
        return 0
    print(out.text)
    u = out.usage
    print(f"[{out.finish_reason}; {u.prompt_tokens} prompt + {u.completion_tokens} completion tokens]", file=sys.stderr)
    return 0
