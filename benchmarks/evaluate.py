"""Evaluation cost on the bundled SmolLM2-135M: the engine path against the static-batch PEFT path it replaced.

The workload is the demo's evaluation: 60 held-out arithmetic questions, Resa prompt, greedy, 32 new
tokens, the demo's stop strings, three arms (base, and two rank-16 LoRA adapters standing in for the
source and the Resa adapter), scored with math-verify.

- static PEFT (before): each arm evaluated on its own, prompts in fixed batches of 8 (left padding),
  adapters attached with PeftModel and picked with `adapter_names`, a batch decoding until its
  longest row ends (tests/_reference.py keeps that loop as the reference decoder);
- engine (now): every arm's requests submitted at once to the native continuous-batching engine
  (max_batch 32), adapters mixed in one batch through the gathered LoRA bank.

Both paths must agree on every completion (checked here); the figure is the wall time of each, run
one after the other in one process -> speedup_vs_static_peft.

Usage: python benchmarks/evaluate.py [--questions 60] [--max-tokens 32] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the PEFT reference decoder
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from _reference import attach_adapter, generate_batch  # noqa: E402
from resa_engine.answers import extract_answer, is_correct  # noqa: E402
from resa_engine.arith import ArithmeticConfig, generate_arithmetic  # noqa: E402
from resa_engine.engine import EngineConfig, open_native  # noqa: E402
from resa_engine.evaluate import Arm, EvalConfig, eval_prompt, evaluate  # noqa: E402
from resa_engine.models import ModelRegistry, load_model  # noqa: E402
from resa_engine.sampling import SamplingParams  # noqa: E402


def make_adapter(model, folder: Path, seed: int) -> Path:
    """A rank-16 LoRA on the seven projections with small random B (it changes some answers)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model.model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.002)
    peft_model.save_pretrained(str(folder))
    model.model = peft_model.unload()
    return folder


def static_peft(model, rows, cfg: EvalConfig, adapters: dict[str, Path]) -> tuple[float, dict]:
    """The evaluation as it ran before the engine: arm after arm, fixed batches of `cfg.batch_size`."""
    for name, folder in adapters.items():
        attach_adapter(model, folder, name)
    prompts = [model.tokenizer(eval_prompt(r.question))["input_ids"] for r in rows]
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0, stop=list(cfg.stop))
    texts: dict[str, list[str]] = {}
    t0 = time.perf_counter()
    for arm in [None, *adapters]:
        order = sorted(range(len(rows)), key=lambda q: -len(prompts[q]))  # longest first, as it did
        out = [None] * len(rows)
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start : start + cfg.batch_size]
            for q, c in zip(batch, generate_batch(model.model, model.tokenizer, [prompts[q] for q in batch], params, adapter=arm)):
                out[q] = c.text
        texts[arm or "base"] = out
        [is_correct(extract_answer(t), r.answer) for t, r in zip(out, rows)]  # scored as the engine path scores
    return time.perf_counter() - t0, texts


def engine_path(model, rows, cfg: EvalConfig, adapters: dict[str, Path], threads: int | None) -> tuple[float, dict]:
    engine = open_native(model, adapters.__getitem__, EngineConfig(max_batch=32, threads=threads)).start()
    try:
        arms = [Arm("base", engine)] + [Arm(name, engine, adapter=name) for name in adapters]
        t0 = time.perf_counter()
        reports = evaluate(rows, arms, cfg, keep_text=True)
        wall = time.perf_counter() - t0
    finally:
        engine.stop()
    return wall, {label: [q.completions[0] for q in rep.questions] for label, rep in reports.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, as the worker's engine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _, rows = generate_arithmetic(ArithmeticConfig(train_rows=0, test_rows=args.questions, seed=0))
    cfg = EvalConfig(samples=1, temperature=0.0, max_tokens=args.max_tokens, batch_size=8)
    registry = ModelRegistry.load()
    engine_model = load_model(registry.get("smollm2-135m"), device="cpu")
    peft_model = load_model(registry.get("smollm2-135m"), device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {name: make_adapter(peft_model, Path(tmp) / name, seed) for name, seed in (("source", 1), ("resa", 2))}
        before, texts_before = static_peft(peft_model, rows, cfg, adapters)
        now, texts_now = engine_path(engine_model, rows, cfg, adapters, args.threads)
    same = all(texts_before[arm] == texts_now[arm] for arm in texts_now)
    differ = sum(a != b for a, b in zip(texts_now["base"], texts_now["resa"]))
    print(f"SmolLM2-135M, {args.questions} questions x 3 arms, greedy, {args.max_tokens} new tokens, threads {torch.get_num_threads()}")
    print(f"{'PATH':<52} {'WALL S':>8}")
    print(f"{'static PEFT batches of 8, arm after arm (before)':<52} {before:>8.1f}")
    print(f"{'engine, all arms at once, max_batch 32 (now)':<52} {now:>8.1f}")
    print(f"identical completions on both paths: {same}; adapter changed {differ}/{args.questions} base completions")
    print(json.dumps({
        "benchmark": "evaluate", "model": "smollm2-135m", "questions": args.questions, "arms": 3, "max_tokens": args.max_tokens,
        "threads": torch.get_num_threads(), "static_peft_s": round(before, 2), "engine_s": round(now, 2),
        "speedup_vs_static_peft": round(before / now, 2), "identical_completions": same,
    }))  # fmt: skip
    if not same:
        sys.exit("the two paths disagree on some completion")


if __name__ == "__main__":
    main()
