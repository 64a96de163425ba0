"""Stage I throughput on the bundled SmolLM2-135M (30 blocks, d_in 576), CPU or GPU.

(a) extraction tokens/s for one layer, SAE training included, against a plain forward-only
    pass of the full model over the same tokens (no hooks, torch.inference_mode)
    -> ratio_vs_forward (target >= 0.8); extraction stops its forward after its layer, so
    ratio_vs_forward_to_layer also compares it with a forward over just those blocks (the
    SAE step's own cost on top of the forward it needs).
(b) four layers trained in one pass against four separate single-layer runs, for a layer
    sweep (6,12,18,24):
    - multi_layer_speedup (target >= 3): the separate runs run the whole model, one forward
      pass per layer, as a per-layer SAE pipeline does (sparsify's Trainer calls the full
      model); they are resa's own extractor with only its early stop switched off;
    - multi_layer_speedup_vs_truncated: the separate runs are resa's extractor as shipped,
      each stopping its forward after its own layer, so they cost sum(i+1) blocks against
      max(i)+1 for one pass: the forward-only bound is 64/25 = 2.56x for the sweep (46/13 =
      3.54x for four adjacent layers, 9..12, also reported); the SAE steps, the same work
      either way, pull both below that bound.

SAE width: expansion 16 (9,216 latents, k 32): a realistic width for a 576-wide residual
stream (the paper uses 65,536 latents, ~43x, for d_in 1,536). Held-out scoring is kept
tiny here; throughput is the training loop's, from its first to its last progress report.
On CPU the benchmark runs one torch thread and times with this process's CPU clock, so
that other load on a shared machine does not skew the side-by-side ratios (on an idle
machine one thread's CPU seconds are its wall seconds); on CUDA it uses wall time.

Usage: python benchmarks/extract.py [--tokens 8192] [--expansion 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import resa_engine.extract.train as extract_mod  # noqa: E402
from resa_engine.arith import ArithmeticConfig, generate_arithmetic  # noqa: E402
from resa_engine.data import TriggerDataset  # noqa: E402
from resa_engine.extract import ExtractConfig, extract_skill  # noqa: E402
from resa_engine.sae.hooks import capture_residual, run_until  # noqa: E402
from resa_engine.models import ModelRegistry, load_model  # noqa: E402


def clock() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def forward_only(model, data: TriggerDataset, batch_size: int, n_chunks: int, until: int | None = None) -> float:
    """Seconds for a forward over the first `n_chunks` chunks, nothing trained: the full model, or
    with `until` only blocks 0..until (what extraction at that layer has to run)."""
    chunks = data.chunks[:n_chunks]
    t0 = clock()
    with torch.inference_mode():
        for i in range(0, len(chunks), batch_size):
            ids = chunks[i : i + batch_size].to(model.device)
            if until is None:
                model.model(input_ids=ids, use_cache=False)
            else:
                run_until(model.model, ids, model.layers, [until])
    return clock() - t0


@contextmanager
def full_depth():
    """The extractor with its early stop switched off: every batch runs the whole model."""

    def run_full(model, input_ids, layers, indices, attention_mask=None):
        with capture_residual(layers, indices) as captured:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return captured

    shipped = extract_mod.run_until
    extract_mod.run_until = run_full
    try:
        yield
    finally:
        extract_mod.run_until = shipped


class LoopTimer:
    """A progress callback that times the training loop: first to last `extract` report."""

    def __init__(self):
        self.start = self.end = None

    def __call__(self, p) -> None:
        if p.stage != "extract":
            return
        if self.start is None:
            self.start = clock()
        if p.step >= p.total:
            self.end = clock()

    @property
    def seconds(self) -> float:
        return self.end - self.start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192, help="training tokens per run")
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--chunk-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--layer", type=int, default=12, help="layer for (a)")
    ap.add_argument("--layers", default="6,12,18,24", help="the four layers for (b), a sweep")
    ap.add_argument("--adjacent", default="9,10,11,12", help="four neighbouring layers for (b)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)

    model = load_model(ModelRegistry.load().get("smollm2-135m"))
    rows, _ = generate_arithmetic(ArithmeticConfig(train_rows=800, test_rows=0))
    train, held = rows[:720], rows[720:]
    four = [int(x) for x in args.layers.split(",")]
    near = [int(x) for x in args.adjacent.split(",")]
    base = dict(
        expansion_factor=args.expansion, k=32, chunk_len=args.chunk_len, batch_size=args.batch_size,
        max_tokens=args.tokens, heldout_max_tokens=128, checkpoint_every=0,
    )
    data = TriggerDataset.from_rows(train, model.tokenizer, args.chunk_len)
    n_chunks = args.tokens // args.chunk_len
    tmp = Path(tempfile.mkdtemp(prefix="resa-bench-extract-"))

    def extract(layers: list[int], tag: str, **over):
        timer = LoopTimer()
        cfg = ExtractConfig(layers=layers, **{**base, **over})
        result = extract_skill(model, train, held, cfg, tmp / tag.replace(" ", "-").replace(",", ""), progress=timer)
        result.train_s = timer.seconds  # the loop's time on the benchmark clock
        print(f"  {tag}: {result.tokens_seen} tokens, loop {result.train_s:.2f}s, wall {result.wall_s:.2f}s", file=sys.stderr)
        return result

    # warm-up (allocator, kernels, lazy imports) on one batch, then measure side by side
    forward_only(model, data, args.batch_size, args.batch_size)
    extract([args.layer], "warm-up", max_tokens=args.batch_size * args.chunk_len)

    fwd_s = forward_only(model, data, args.batch_size, n_chunks)
    print(f"  forward only: {n_chunks * args.chunk_len} tokens in {fwd_s:.2f}s", file=sys.stderr)
    fwd_to_s = forward_only(model, data, args.batch_size, n_chunks, until=args.layer)
    print(f"  forward to layer {args.layer}: {n_chunks * args.chunk_len} tokens in {fwd_to_s:.2f}s", file=sys.stderr)
    one = extract([args.layer], "one layer")
    fwd_tps = n_chunks * args.chunk_len / fwd_s
    ext_tps = one.tokens_seen / one.train_s

    multi = extract(four, "sweep, one pass")
    singles = [extract([i], f"layer {i} alone") if i != args.layer else one for i in four]
    single_train = sum(r.train_s for r in singles)
    single_wall = sum(r.wall_s for r in singles)
    with full_depth():
        singles_full = [extract([i], f"layer {i} alone, full forward") for i in four]
    full_train = sum(r.train_s for r in singles_full)
    multi_near = extract(near, "adjacent, one pass")
    singles_near = [extract([i], f"layer {i} alone") if i != args.layer else one for i in near]
    near_train = sum(r.train_s for r in singles_near)

    rows_out = [
        ("forward only (full model, inference_mode)", n_chunks * args.chunk_len, fwd_s, fwd_tps),
        (f"forward only, blocks 0..{args.layer}", n_chunks * args.chunk_len, fwd_to_s, n_chunks * args.chunk_len / fwd_to_s),
        (f"extract layer {args.layer} (SAE {one.manifest['sae']['num_latents']} latents)", one.tokens_seen, one.train_s, ext_tps),
        (f"extract layers {four} in one pass", multi.tokens_seen, multi.train_s, multi.tokens_seen / multi.train_s),
        (f"4 separate runs, full forward each (layers {four})", sum(r.tokens_seen for r in singles_full), full_train,
         sum(r.tokens_seen for r in singles_full) / full_train),
        (f"4 separate runs, each stopped at its layer ({four})", sum(r.tokens_seen for r in singles), single_train,
         sum(r.tokens_seen for r in singles) / single_train),
        (f"extract layers {near} in one pass", multi_near.tokens_seen, multi_near.train_s, multi_near.tokens_seen / multi_near.train_s),
        (f"4 separate runs (layers {near})", sum(r.tokens_seen for r in singles_near), near_train, sum(r.tokens_seen for r in singles_near) / near_train),
    ]
    timing = "wall seconds" if torch.cuda.is_available() else "process CPU seconds"
    print(f"device: {model.device} ({model.dtype}), threads {torch.get_num_threads()}, chunk {args.chunk_len} x batch {args.batch_size}, {timing}")
    print(f"{'RUN':<52} {'TOKENS':>8} {'SECONDS':>8} {'TOK/S':>8}")
    for name, tokens, secs, tps in rows_out:
        print(f"{name:<52} {tokens:>8} {secs:>8.2f} {tps:>8.0f}")
    print(f"sweep {four}: one pass {multi.train_s:.2f}s vs separate full-forward runs {full_train:.2f}s -> {full_train / multi.train_s:.2f}x")
    print(f"sweep {four}: one pass {multi.train_s:.2f}s vs separate early-stopped runs {single_train:.2f}s -> {single_train / multi.train_s:.2f}x "
          f"(bound 2.56x; end-to-end wall incl. held-out scoring {multi.wall_s:.2f}s vs {single_wall:.2f}s)")
    print(f"adjacent {near}: one pass {multi_near.train_s:.2f}s vs separate {near_train:.2f}s -> {near_train / multi_near.train_s:.2f}x")
    figures = {
        "ratio_vs_forward": round(ext_tps / fwd_tps, 3),
        "ratio_vs_forward_to_layer": round(ext_tps / (n_chunks * args.chunk_len / fwd_to_s), 3),
        "multi_layer_speedup": round(full_train / multi.train_s, 3),
        "multi_layer_speedup_vs_truncated": round(single_train / multi.train_s, 3),
        "multi_layer_speedup_vs_truncated_wall": round(single_wall / multi.wall_s, 3),
        "multi_layer_speedup_adjacent": round(near_train / multi_near.train_s, 3),
        "forward_tokens_per_s": round(fwd_tps, 1),
        "extract_tokens_per_s": round(ext_tps, 1),
        "layer": args.layer,
        "layers": four,
        "adjacent_layers": near,
        "num_latents": one.manifest["sae"]["num_latents"],
        "k": 32,
        "tokens_per_run": one.tokens_seen,
        "device": str(model.device),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
