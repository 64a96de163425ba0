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
    from app.tasks.evaluate import EvalEngines, adapter_ref
    from resa_engine.engine import Delta
    from resa_engine.engine.text import format_prompt
    from resa_engine.evaluate import EvalConfig
    from resa_engine.sampling import SamplingParams

    from ._common import print_json

    settings = get_settings()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop)
    if args.max_tokens > settings.max_new_tokens:
        raise ValueError(f"--max-tokens {args.max_tokens} is over the limit of {settings.max_new_tokens}")
    ctx = TaskContext.from_settings(settings, allow_paths=True)
    if args.skill and "/" not in args.skill:
        ctx.store.manifest("adapter", adapter_ref(args.model, args.skill))  # a missing adapter fails before the model loads
    engines = EvalEngines(ctx, EvalConfig(batch_size=1, max_tokens=args.max_tokens))
    try:
        engine = engines.engine(args.model)
        key = None
        if args.skill:
            key, info = engines.adapter(args.model, args.skill)
            if info["cross_model"]:
                print(f"resa generate: note: adapter built on another model ({info.get('target', info.get('path'))}), attached cross-model", file=sys.stderr)
        if args.chat:
            ids = format_prompt(engine.tokenizer, messages=[{"role": "user", "content": args.prompt}])
        else:
            ids = format_prompt(engine.tokenizer, prompt=args.prompt)
        if len(ids) > settings.max_prompt_tokens:
            raise ValueError(f"prompt is {len(ids)} tokens, over the limit of {settings.max_prompt_tokens}")
        out = None
        for item in engine.submit(ids, params, key):
            if isinstance(item, Delta):
                if not args.json:
                    print(item.text, end="", flush=True)  # streamed as it is decoded
            else:
                out = item
    finally:
        engines.close()
    if args.json:
        print_json({"text": out.text, "finish_reason": out.finish_reason, "usage": out.usage.to_dict(), "model": engine.name, "skill": args.skill})
        return 0
    print()
    u = out.usage
    print(f"[{out.finish_reason}; {u.prompt_tokens} prompt + {u.completion_tokens} completion tokens]", file=sys.stderr)
    return 0
