"""Stage II step cost on the bundled SmolLM2-135M (30 blocks, d_in 576), CPU or GPU.

One SAE-guided KL step (teacher pass with the adapter disabled + student pass with the SAE
spliced after block 12 + backward + clip + AdamW step), exactly as `tune_adapter` runs it,
against one plain LoRA SFT step (next-token CE, no splice, no teacher) on the same chunk with
the same LoRA (r 32, alpha 128, all seven projections) -> step_ratio_vs_lora_sft (target <= 1.6).

For reference it also times the KL step with the student run in full through a hook splice
(what the faithful objective would cost without reusing the teacher's block-12 output) and
the `ce` objective (SFT with the splice in).

SAE: a randomly initialised sparsify SparseCoder, expansion 8 (4,608 latents, k 32), at layer
12. Step cost depends on the SAE's shapes, not on what it learned, so no SAE is trained here.
Timings are medians of interleaved steps after warm-up.

Usage: python benchmarks/tune.py [--chunk-len 256] [--steps 5] [--warmup 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from resa_engine.data import QARow, TriggerDataset  # noqa: E402
from resa_engine.models import ModelRegistry, load_model  # noqa: E402
from resa_engine.artifacts import Skill, sae_subdir  # noqa: E402
from resa_engine.tune import LoraSettings, SpliceObjective, add_lora, remove_lora  # noqa: E402

LAYER = 12


def arithmetic_rows(n: int, seed: int = 0) -> list[QARow]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        op = rng.choice(["+", "-", "*"])
        rows.append(QARow(question=f"What is {a} {op} {b}?", answer=str({"+": a + b, "-": a - b, "*": a * b}[op])))
    return rows


def random_skill(folder: Path, d_in: int, expansion: int, k: int) -> Skill:
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    SparseCoder(d_in, SparseCoderConfig(expansion_factor=expansion, k=k)).save_to_disk(folder / sae_subdir(LAYER))
    manifest = {"name": "bench", "layers": [LAYER], "default_layer": LAYER, "d_in": d_in, "source": {"model": "smollm2-135m", "sha256": ""}}
    return Skill("bench", manifest, folder)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunk-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1 keeps timings steady on a shared machine)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)

    model = load_model(ModelRegistry.load().get("smollm2-135m"))
    device = model.device
    data = TriggerDataset.from_rows(arithmetic_rows(400), model.tokenizer, args.chunk_len)
    tmp = Path(tempfile.mkdtemp(prefix="resa-bench-tune-"))
    skill = random_skill(tmp / "skill", model.hidden_size, args.expansion, 32)
    sae = skill.sae(LAYER, device=device)

    peft_model = add_lora(model, LoraSettings(), seed=0)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    kl_reuse = SpliceObjective(peft_model, sae, LAYER)
    kl_full = SpliceObjective(peft_model, sae, LAYER)
    kl_full.reuse_prefix = False  # student through the whole model with the hook splice
    ce_splice = SpliceObjective(peft_model, sae, LAYER, objective="ce")

    def sft_loss(ids):
        logits = peft_model(input_ids=ids, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))

    variants = {
        "lora_sft": sft_loss,
        "kl_sae_guided": lambda ids: kl_reuse(ids).loss,
        "kl_full_splice": lambda ids: kl_full(ids).loss,
        "ce_sae_guided": lambda ids: ce_splice(ids).loss,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}

    def step(loss_fn, ids) -> float:
        _sync(device)
        t0 = time.perf_counter()
        loss = loss_fn(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t0

    try:
        for i in range(args.warmup + args.steps):
            ids = data.chunks[i % len(data)].unsqueeze(0).to(device)  # the same chunk for every variant
            for name, fn in variants.items():  # interleaved, so machine load drifts hit all alike
                t = step(fn, ids)
                if i >= args.warmup:
                    times[name].append(t)
    finally:
        remove_lora(model, peft_model)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    sft = med["lora_sft"]
    print(f"SmolLM2-135M, LoRA r32 on 7 projections, SAE x{args.expansion} at layer {LAYER}, chunk {args.chunk_len} tokens, "
          f"batch 1, device {device}, threads {torch.get_num_threads()}, median of {args.steps}")
    print(f"{'STEP':<44} {'SECONDS':>9} {'VS SFT':>7}")
    labels = {
        "lora_sft": "plain LoRA SFT (CE, no splice)",
        "kl_sae_guided": "SAE-guided KL (faithful, teacher h12 reused)",
        "kl_full_splice": "SAE-guided KL (student in full, hook splice)",
        "ce_sae_guided": "SAE-guided CE (splice in)",
    }
    for name, label in labels.items():
        print(f"{label:<44} {med[name]:>9.4f} {med[name] / sft:>7.2f}")
    figures = {
        "benchmark": "tune",
        "model": "smollm2-135m",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "chunk_len": args.chunk_len,
        "layer": LAYER,
        "sae_latents": model.hidden_size * args.expansion,
        "steps": args.steps,
        "sft_step_s": round(sft, 4),
        "kl_step_s": round(med["kl_sae_guided"], 4),
        "step_ratio_vs_lora_sft": round(med["kl_sae_guided"] / sft, 3),
        "kl_full_splice_ratio_vs_lora_sft": round(med["kl_full_splice"] / sft, 3),
        "ce_splice_ratio_vs_lora_sft": round(med["ce_sae_guided"] / sft, 3),
        "target_step_ratio": 1.6,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
