"""The serving scheduler: continuous batching of mixed-adapter requests on a real tiny Llama."""

from __future__ import annotations

import asyncio

import pytest
import torch

from _helpers_serving import load_private, make_lora, reference_greedy
from resa_engine.engine import Delta
from resa_engine.engine.native import Scheduler
from resa_engine.engine.text import IncrementalDetokenizer, TextAssembler
from resa_engine.errors import EngineStopped, QueueFull, RequestCancelled
from resa_engine.lora.cache import AdapterCache
from resa_engine.sampling import Completion, SamplingParams

WAIT = 60  # seconds; generous upper bounds on waits, never asserted as timings


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("serving-adapters")
    return {
        "a": make_lora(tiny_llama_dir, root / "a", seed=1),
        "b": make_lora(tiny_llama_dir, root / "b", seed=2, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]),
        "c": make_lora(tiny_llama_dir, root / "c", seed=3),
    }


@pytest.fixture(scope="module")
def served(tiny_llama_dir, adapter_dirs):
    """A private tiny Llama with every test adapter pinned in its cache."""
    model = load_private(tiny_llama_dir)
    cache = AdapterCache(model, adapter_dirs.__getitem__, capacity=4)
    for key in adapter_dirs:
        cache.pin(key, wait=WAIT)
    yield model, cache
    cache.close()


@pytest.fixture
def make_scheduler(served):
    model, cache = served
    made = []

    def make(start: bool = True, **options) -> Scheduler:
        sched = Scheduler(model, cache, **options)
        made.append(sched)
        return sched.start() if start else sched

    yield make
    for sched in made:
        sched.stop(drain=False)


def prompt_ids(model, text: str) -> list[int]:
    return model.tokenizer(text)["input_ids"]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def collect(handle) -> tuple[list[Delta], Completion]:
    items = list(handle)
    assert isinstance(items[-1], Completion) and all(isinstance(d, Delta) for d in items[:-1])
    return items[:-1], items[-1]


def test_mixed_adapter_batch_matches_each_request_alone_with_peft(served, make_scheduler, tiny_llama_dir, adapter_dirs):
    model, _ = served
    n = 12
    jobs = [
        ("What is 12 + 7?", "a"),
        ("What is 3 * 9? Think first.", "b"),
        ("The quick brown fox", None),
        ("What is 40 - 2?", "c"),
        ("What is 5 + 5?", "a"),
    ]
    sched = make_scheduler(start=False)  # queue everything first so all rows share one batch from the first step
    handles = [sched.submit(prompt_ids(model, text), greedy(n), adapter, ignore_eos=True) for text, adapter in jobs]
    sched.start()
    results = [h.result(WAIT) for h in handles]
    assert handles[1].adapter_info.rank == 4 and handles[2].adapter_info is None
    # One prefill step and n - 1 decode steps: every row was in the same batch the whole time.
    assert sched.stats().steps == n
    expected = [reference_greedy(tiny_llama_dir, adapter_dirs[a] if a else None, prompt_ids(model, t), n) for t, a in jobs]
    assert [r.token_ids for r in results] == expected
    assert all(r.finish_reason == "length" and r.usage.completion_tokens == n for r in results)
    # The adapters matter: the same prompt differs with and without one.
    base = reference_greedy(tiny_llama_dir, None, prompt_ids(model, jobs[0][0]), n)
    assert base != expected[0]


def test_steered_and_plain_rows_share_a_batch(served, make_scheduler, tiny_llama_dir, adapter_dirs):
    """SAE edits apply to their own rows only: a steered row matches a lone reference run with the
    edit spliced in (keep_error), plain rows and an empty edit list match the unsteered model."""
    from sparsify import SparseCoder, SparseCoderConfig

    from _helpers_serving import reference_model
    from _reference import reference_splice_hook
    from resa_engine.sae.edits import LatentEdit
    from resa_engine.sae.splice import SaeSplice

    model, _ = served
    layer, n = 1, 8
    torch.manual_seed(0)
    sae = SparseCoder(model.hidden_size, SparseCoderConfig(num_latents=128, k=8)).eval().requires_grad_(False)
    edits = [LatentEdit(3, "clamp", 25.0), LatentEdit(40, "add", 10.0)]
    prompt = prompt_ids(model, "Steering test prompt:")
    sched = make_scheduler(start=False)
    handles = {
        "steered": sched.submit(prompt, greedy(n), sae=SaeSplice(sae, layer, edits), ignore_eos=True),
        "plain": sched.submit(prompt, greedy(n), ignore_eos=True),
        "empty": sched.submit(prompt, greedy(n), sae=SaeSplice(sae, layer, []), ignore_eos=True),
        "adapter": sched.submit(prompt, greedy(n), adapter="a", sae=SaeSplice(sae, layer, edits), ignore_eos=True),
    }
    sched.start()
    got = {name: h.result(WAIT).token_ids for name, h in handles.items()}
    assert sched.stats().steps <= n + 1  # all four rows decoded together

    plain = reference_greedy(tiny_llama_dir, None, prompt, n)
    assert got["plain"] == plain and got["empty"] == plain
    for name, adapter_dir in (("steered", None), ("adapter", adapter_dirs["a"])):
        ref = reference_model(tiny_llama_dir, adapter_dir)
        layers = ref.get_base_model().model.layers if adapter_dir else ref.model.layers
        with reference_splice_hook(layers, layer, sae, edits, keep_error=True):
            assert got[name] == reference_greedy(tiny_llama_dir, adapter_dir, prompt, n), name
    assert got["steered"] != plain  # the edit is strong enough to change greedy tokens


def test_call_runs_between_steps_on_the_base_weights(served, make_scheduler, tiny_llama_dir):
    """`call` shares the served weights with a running adapter batch without seeing its adapters."""
    from _helpers_serving import reference_model

    model, _ = served
    ids = torch.tensor([prompt_ids(model, "Base weights only")])
    sched = make_scheduler()
    running = sched.submit(prompt_ids(model, "Busy row"), greedy(40), adapter="a", ignore_eos=True)
    logits = sched.call(lambda m: m.model(input_ids=ids).logits).result(WAIT)
    with torch.inference_mode():
        expected = reference_model(tiny_llama_dir, None)(input_ids=ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert len(running.result(WAIT).token_ids) == 40  # the batch went on around the call
    with pytest.raises(ZeroDivisionError):
        sched.call(lambda m: 1 / 0).result(WAIT)
    sched.stop()
    with pytest.raises(EngineStopped):
        sched.call(lambda m: None)


def test_engine_thread_owns_the_cpu_threads_and_loaders_use_one(served, make_scheduler):
    """resa_engine.threads: the engine runs its forwards on `threads` torch threads, whatever the
    thread that built it uses; the adapter loader runs on one."""
    model, cache = served
    sched = make_scheduler(threads=3)
    assert sched.call(lambda m: torch.get_num_threads()).result(WAIT) == 3
    assert cache._pool.submit(torch.get_num_threads).result(WAIT) == 1
    with pytest.raises(ValueError, match="threads must be at least 1"):
        make_scheduler(start=False, threads=0)


def test_prefill_logits_are_the_last_position_of_a_full_forward(served):
    """last_logits_only: the index form keeps exactly the last position's logits (and 1 for decode)."""
    from resa_engine.models import last_logits_only

    model, _ = served
    ids = torch.tensor([prompt_ids(model, "Several tokens of prompt here")] * 2)
    keep = last_logits_only(ids.shape[1], ids.device)
    with torch.inference_mode():
        kept = model.model(input_ids=ids, logits_to_keep=keep).logits
        full = model.model(input_ids=ids).logits
    assert kept.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(kept, full[:, -1:], rtol=1e-4, atol=1e-4)
    assert last_logits_only(1, ids.device) == 1


def test_requests_joining_mid_flight_match_running_alone(served, make_scheduler, tiny_llama_dir, adapter_dirs):
    model, _ = served
    sched = make_scheduler()
    first = sched.submit(prompt_ids(model, "What is 71 + 18?"), greedy(40), "a", ignore_eos=True)
    stream = iter(first)
    for _ in range(3):
        next(stream)  # `first` is decoding now
    joined = [
        sched.submit(prompt_ids(model, "What is 2 * 2? Think"), greedy(10), "b", ignore_eos=True),
        sched.submit(prompt_ids(model, "Hello"), greedy(10), None, ignore_eos=True),
    ]
    outs = [h.result(WAIT) for h in joined]
    rest = list(stream)
    assert isinstance(rest[-1], Completion)
    assert not first.done or first.finished_at > max(h.first_token_at for h in joined)
    assert rest[-1].token_ids == reference_greedy(tiny_llama_dir, adapter_dirs["a"], prompt_ids(model, "What is 71 + 18?"), 40)
    assert outs[0].token_ids == reference_greedy(tiny_llama_dir, adapter_dirs["b"], prompt_ids(model, "What is 2 * 2? Think"), 10)
    assert outs[1].token_ids == reference_greedy(tiny_llama_dir, None, prompt_ids(model, "Hello"), 10)


def test_same_seed_same_output_whatever_the_batch(served, make_scheduler):
    model, _ = served
    sched = make_scheduler()
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    prompt = prompt_ids(model, "What is 8 * 8?")
    alone = sched.submit(prompt, params, "a", ignore_eos=True).result(WAIT)
    crowd = [
        sched.submit(prompt_ids(model, f"What is {i} + {i}?"), SamplingParams(max_tokens=20, temperature=1.0, seed=i), a, ignore_eos=True)
        for i, a in ((1, "b"), (2, None), (3, "c"))
    ]
    together = sched.submit(prompt, params, "a", ignore_eos=True)
    late = SamplingParams(max_tokens=20, temperature=0.7, seed=5)
    crowd.append(sched.submit(prompt_ids(model, "Hello there"), late, "a", ignore_eos=True))
    assert together.result(WAIT).token_ids == alone.token_ids
    other_seed = sched.submit(prompt, SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=8), "a", ignore_eos=True)
    assert other_seed.result(WAIT).token_ids != alone.token_ids
    for h in crowd:
        h.result(WAIT)


def test_stop_string_spanning_tokens_is_cut_and_never_streamed(served, make_scheduler):
    model, _ = served
    tok = model.tokenizer
    sched = make_scheduler()
    prompt = prompt_ids(model, "What is 12 + 30? Answer:")
    full = sched.submit(prompt, greedy(30), "a", ignore_eos=True).result(WAIT)
    # A stop string made of the end of one token's text and the start of the next one's.
    stop = None
    for k in range(3, len(full.token_ids) - 3):
        head = tok.decode(full.token_ids[:k])
        if full.text.startswith(head) and len(head) >= 2 and len(full.text) >= len(head) + 2:
            candidate = full.text[len(head) - 2 : len(head) + 2]
            if "\ufffd" not in candidate and tok.decode(full.token_ids[k - 1 : k]).endswith(candidate[:2]):
                stop = candidate
                break
    assert stop is not None
    deltas, done = collect(sched.submit(prompt, greedy(30, stop=["never-there", stop]), "a", ignore_eos=True))
    assert done.finish_reason == "stop"
    assert done.text == full.text[: full.text.find(stop)]
    assert stop not in done.text
    assert "".join(d.text for d in deltas) == done.text
    assert sum(len(d.token_ids) for d in deltas) == len(done.token_ids)

    missing = sched.submit(prompt, greedy(30, stop=["never-there"]), "a", ignore_eos=True).result(WAIT)
    assert missing.finish_reason == "length" and missing.text == full.text


def test_max_tokens_eos_and_usage(served, make_scheduler, tiny_llama_dir):
    model, _ = served
    prompt = prompt_ids(model, "What is 9 + 10?")
    sched = make_scheduler()
    out = sched.submit(prompt, greedy(5), None, ignore_eos=True).result(WAIT)
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), 5)
    # Make the 4th greedy token the model's EOS: generation ends there, EOS counted in usage, not in the text.
    ref = reference_greedy(tiny_llama_dir, None, prompt, 8)
    eos = ref[3]
    assert eos not in ref[:3]
    sched.eos_ids = {eos}
    stopped = sched.submit(prompt, greedy(8), None).result(WAIT)
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == ref[:3] and stopped.usage.completion_tokens == 4
    assert stopped.text == model.tokenizer.decode(ref[:3], skip_special_tokens=True)


def test_bad_requests_raise_value_error(served, make_scheduler):
    model, _ = served
    sched = make_scheduler(max_prompt_tokens=8, max_new_tokens=16)
    with pytest.raises(ValueError, match="prompt has 9 tokens"):
        sched.submit(list(range(9)), greedy(4))
    with pytest.raises(ValueError, match="max_tokens 17"):
        sched.submit([1, 2], greedy(17))
    with pytest.raises(ValueError, match="empty"):
        sched.submit([], greedy(4))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sched.submit([1, 10_000], greedy(4))
    plain = Scheduler(model)
    with pytest.raises(ValueError, match="serves no adapters"):
        plain.submit([1, 2], greedy(4), "a")


def test_queue_full_raises_with_retry_hint(served, make_scheduler):
    model, _ = served
    sched = make_scheduler(max_batch=1, max_queue=1)
    running = sched.submit(prompt_ids(model, "Hello"), greedy(400), None, ignore_eos=True)
    next(iter(running))  # admitted: the queue is empty again
    queued = sched.submit(prompt_ids(model, "Hi"), greedy(4), None)
    with pytest.raises(QueueFull) as err:
        sched.submit(prompt_ids(model, "Hey"), greedy(4), None)
    assert err.value.retry_after_s > 0
    running.cancel()
    assert queued.result(WAIT).finish_reason in ("stop", "length")


def test_cancel_frees_the_slot_for_a_queued_request(served, make_scheduler):
    model, _ = served
    sched = make_scheduler(max_batch=1)
    long = sched.submit(prompt_ids(model, "Hello"), greedy(400), "a", ignore_eos=True)
    next(iter(long))
    waiting = sched.submit(prompt_ids(model, "What is 1 + 1?"), greedy(6), "b", ignore_eos=True)
    dropped = sched.submit(prompt_ids(model, "What is 2 + 2?"), greedy(6), None)
    stats = sched.stats()
    assert (stats.running, stats.queued) == (1, 2)
    dropped.cancel()  # a queued request leaves the queue at once
    assert sched.stats().queued == 1
    long.cancel()
    assert waiting.result(WAIT).usage.completion_tokens == 6
    with pytest.raises(RequestCancelled):
        long.result(WAIT)
    with pytest.raises(RequestCancelled):
        dropped.result(WAIT)
    stats = sched.stats()
    assert (stats.running, stats.queued, stats.cancelled, stats.completed) == (0, 0, 2, 1)


def test_async_stream_yields_deltas_then_completion(served, make_scheduler):
    model, _ = served
    sched = make_scheduler()

    async def consume():
        handle = sched.submit(prompt_ids(model, "What is 4 + 4?"), greedy(12), "c", ignore_eos=True)
        return [item async for item in handle.stream()]

    items = asyncio.run(consume())
    done = items[-1]
    assert isinstance(done, Completion) and len(items) > 2
    assert "".join(d.text for d in items[:-1]) == done.text


def test_leaving_the_async_stream_early_cancels_the_request(served, make_scheduler):
    model, _ = served
    sched = make_scheduler()

    async def consume_two():
        handle = sched.submit(prompt_ids(model, "Hello"), greedy(400), None, ignore_eos=True)
        async for item in handle.stream():
            if isinstance(item, Delta):
                break
        return handle

    handle = asyncio.run(consume_two())
    with pytest.raises(RequestCancelled):
        handle.result(WAIT)


def test_stop_drains_in_flight_then_refuses(served, make_scheduler):
    model, _ = served
    sched = make_scheduler()
    handles = [sched.submit(prompt_ids(model, f"What is {i} * 3?"), greedy(8), a, ignore_eos=True) for i, a in enumerate(["a", None, "b"])]
    sched.stop(drain=True, timeout=WAIT)
    assert all(h.result(0).usage.completion_tokens == 8 for h in handles)
    with pytest.raises(EngineStopped):
        sched.submit(prompt_ids(model, "Hi"), greedy(4))

    hard = make_scheduler()
    running = hard.submit(prompt_ids(model, "Hello"), greedy(400), None, ignore_eos=True)
    next(iter(running))
    hard.stop(drain=False)
    with pytest.raises(EngineStopped):
        running.result(WAIT)


def test_incremental_detokenizer_handles_multibyte_characters(served):
    model, _ = served
    tok = model.tokenizer
    text = "héllo 世界 🙂 naïve: 12 + 30 = 42"
    ids = tok(text)["input_ids"]
    assert len(ids) > len(text.split())  # multi-byte characters span several byte-level tokens
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_text_assembler_holds_back_possible_stop_prefixes(served):
    tok = served[0].tokenizer
    ids = tok("What is 12 + 30? The answer is 42.")["input_ids"]
    asm = TextAssembler(tok, ["answer is"])
    shown, stopped = "", False
    for i in ids:
        piece, stopped = asm.push(i)
        shown += piece
        if stopped:
            break
        held = asm.text[len(shown) :]
        assert "answer is".startswith(held)  # only a possible start of the stop string is held back
    assert stopped and shown == "What is 12 + 30? The " == asm.text


def test_qwen2_biased_projections_mixed_batch_matches_peft(tiny_qwen_dir, tmp_path):
    folders = {k: make_lora(tiny_qwen_dir, tmp_path / k, seed=i) for i, k in enumerate("xy")}
    model = load_private(tiny_qwen_dir, "tiny-qwen")
    cache = AdapterCache(model, folders.__getitem__, capacity=2)
    sched = Scheduler(model, cache)
    jobs = [("What is 3 + 4?", "x"), ("Hello", None), ("What is 10 * 2? Think", "y"), ("What is 7 - 1?", "x")]
    handles = [sched.submit(prompt_ids(model, p), greedy(8), a, ignore_eos=True) for p, a in jobs]
    sched.start()
    try:
        got = [h.result(WAIT).token_ids for h in handles]
    finally:
        sched.stop()
        cache.close()
    assert got == [reference_greedy(tiny_qwen_dir, folders[a] if a else None, prompt_ids(model, p), 8) for p, a in jobs]


@pytest.mark.slow
def test_smollm2_mixed_batch_matches_peft_alone(tmp_path, smollm2):
    from pathlib import Path

    from resa_engine.models import load_model

    model_dir = Path(smollm2.base.name_or_path)  # the de-quantized safetensors folder
    adapters = {k: make_lora(model_dir, tmp_path / k, seed=s, r=8, alpha=32) for k, s in (("x", 1), ("y", 2))}
    model = load_model(smollm2.spec, device="cpu", cache_dir=model_dir.parents[1])  # a private copy: hooks go on it
    cache = AdapterCache(model, adapters.__getitem__, capacity=2)
    sched = Scheduler(model, cache).start()
    try:
        prompts = ["What is 12 + 7?", "Name a colour.", "Count to five."]
        jobs = list(zip(prompts, ["x", None, "y"]))
        handles = [sched.submit(prompt_ids(model, p), greedy(8), a, ignore_eos=True) for p, a in jobs]
        got = [h.result(WAIT).token_ids for h in handles]
    finally:
        sched.stop()
        cache.close()
    with torch.inference_mode():
        expected = [reference_greedy(model_dir, adapters[a] if a else None, prompt_ids(model, p), 8) for p, a in jobs]
    assert got == expected


def test_splice_mode_rows_replace_the_residual_alone_and_with_an_adapter_in_a_mixed_batch(served, make_scheduler, tiny_llama_dir, adapter_dirs):
    """Splice mode (the Stage II student at inference): the row's block output is replaced by the SAE
    reconstruction (no error term), alone and together with an adapter, beside plain and steered rows."""
    from sparsify import SparseCoder, SparseCoderConfig

    from _helpers_serving import reference_model
    from _reference import reference_splice_hook
    from resa_engine.sae.edits import LatentEdit
    from resa_engine.sae.splice import SaeSplice

    model, _ = served
    layer, n = 2, 8
    torch.manual_seed(3)
    sae = SparseCoder(model.hidden_size, SparseCoderConfig(num_latents=128, k=8)).eval().requires_grad_(False)
    prompt = prompt_ids(model, "Splice test prompt:")
    edits = [LatentEdit(5, "clamp", 12.0)]
    sched = make_scheduler(start=False)
    handles = {
        "splice": sched.submit(prompt, greedy(n), sae=SaeSplice(sae, layer, keep_error=False), ignore_eos=True),
        "splice+adapter": sched.submit(prompt, greedy(n), adapter="a", sae=SaeSplice(sae, layer, keep_error=False), ignore_eos=True),
        "splice+edit": sched.submit(prompt, greedy(n), sae=SaeSplice(sae, layer, edits, keep_error=False), ignore_eos=True),
        "plain": sched.submit(prompt, greedy(n), ignore_eos=True),
        "adapter": sched.submit(prompt, greedy(n), adapter="a", ignore_eos=True),
    }
    sched.start()
    got = {name: h.result(WAIT).token_ids for name, h in handles.items()}
    assert sched.stats().steps <= n + 1  # one batch

    assert got["plain"] == reference_greedy(tiny_llama_dir, None, prompt, n)
    assert got["adapter"] == reference_greedy(tiny_llama_dir, adapter_dirs["a"], prompt, n)
    for name, adapter_dir, row_edits in (("splice", None, []), ("splice+adapter", adapter_dirs["a"], []), ("splice+edit", None, edits)):
        ref = reference_model(tiny_llama_dir, adapter_dir)
        layers = ref.get_base_model().model.layers if adapter_dir else ref.model.layers
        with reference_splice_hook(layers, layer, sae, row_edits, keep_error=False):
            assert got[name] == reference_greedy(tiny_llama_dir, adapter_dir, prompt, n), name
    assert got["splice"] != got["plain"]  # the reconstruction is lossy: the splice is live


def test_splice_mode_logits_equal_a_direct_hook_on_the_block_output(served):
    """The engine's splice row computes the logits of the model with block i's output replaced by
    decode(encode(h)), measured against a hook that does exactly that, in the same forward."""
    from sparsify import SparseCoder, SparseCoderConfig

    from resa_engine.sae.hooks import replace_block_output
    from resa_engine.sae.splice import SaeSplice

    model, _ = served
    torch.manual_seed(4)
    sae = SparseCoder(model.hidden_size, SparseCoderConfig(num_latents=128, k=8)).eval().requires_grad_(False)
    ids = torch.tensor([prompt_ids(model, "What is 9 + 10?")])

    def direct(h):
        top_acts, top_indices, _ = sae.encode(h.reshape(-1, h.shape[-1]))
        return sae.decode(top_acts, top_indices).view(h.shape)

    with torch.no_grad():
        with replace_block_output(model.layers, 1, direct):
            expected = model.model(input_ids=ids).logits
        with replace_block_output(model.layers, 1, SaeSplice(sae, 1, keep_error=False).apply):
            got = model.model(input_ids=ids).logits
        clean = model.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, clean, atol=1e-3)


def test_a_row_whose_own_values_overflow_fails_alone(served, make_scheduler, tiny_llama_dir):
    """An SAE edit that overflows in the forward (here: a decoder row scaled to 1e38) fails its own
    request with NumericalError; the rows beside it, in the same prefill and the same decode steps,
    finish with exactly their lone tokens."""
    from sparsify import SparseCoder, SparseCoderConfig

    from resa_engine.errors import NumericalError
    from resa_engine.sae.edits import LatentEdit
    from resa_engine.sae.splice import SaeSplice

    model, _ = served
    torch.manual_seed(5)
    sae = SparseCoder(model.hidden_size, SparseCoderConfig(num_latents=128, k=8)).eval().requires_grad_(False)
    with torch.no_grad():
        sae.W_dec[7] *= 1e38
    prompt, n = prompt_ids(model, "Overflow beside innocents"), 10
    sched = make_scheduler(start=False)
    bad = sched.submit(prompt, greedy(n), sae=SaeSplice(sae, 1, [LatentEdit(7, "clamp", 1e4)]), ignore_eos=True)
    good = [sched.submit(prompt, greedy(n), ignore_eos=True), sched.submit(prompt, greedy(n), adapter="a", ignore_eos=True)]
    sched.start()
    with pytest.raises(NumericalError, match="overflowed"):
        bad.result(WAIT)
    assert good[0].result(WAIT).token_ids == reference_greedy(tiny_llama_dir, None, prompt, n)
    assert sched.stats().failed == 1


def test_a_row_that_breaks_the_joint_prefill_is_retried_alone_and_fails_alone(served, make_scheduler, tiny_llama_dir):
    """A row whose own intervention raises inside the forward makes the joint prefill fail; the engine
    prefills the joiners one by one, so only that row fails and the others start as if it never came."""

    class Broken:
        layer, is_identity = 1, False

        def apply(self, x):
            raise RuntimeError("this request's SAE cannot run")

    model, _ = served
    prompt, n = prompt_ids(model, "Prefill isolation"), 6
    sched = make_scheduler(start=False)
    bad = sched.submit(prompt, greedy(n), sae=Broken(), ignore_eos=True)
    good = sched.submit(prompt, greedy(n), ignore_eos=True)
    sched.start()
    with pytest.raises(Exception, match="cannot run"):
        bad.result(WAIT)
    assert good.result(WAIT).token_ids == reference_greedy(tiny_llama_dir, None, prompt, n)


def test_logprobs_and_prompt_logprobs_equal_a_direct_transformers_computation(served, make_scheduler, tiny_llama_dir):
    """Each generated token's logprob (and its top alternatives) and each prompt token's logprob are the
    log_softmax of the model's own logits, as one plain forward over prompt + completion gives them."""
    from _helpers_serving import reference_model

    model, _ = served
    prompt = prompt_ids(model, "What is 3 + 4? Answer:")
    sched = make_scheduler()
    both = sched.submit(prompt, SamplingParams(max_tokens=6, logprobs=3, prompt_logprobs=2), ignore_eos=True)
    plain = sched.submit(prompt, greedy(6), ignore_eos=True)  # a row without logprobs in the same batch
    scored_only = sched.submit(prompt, SamplingParams(max_tokens=0, prompt_logprobs=0))
    out, other, scored = both.result(WAIT), plain.result(WAIT), scored_only.result(WAIT)
    assert out.token_ids == other.token_ids and other.logprobs is None and other.prompt_logprobs is None

    ref = reference_model(tiny_llama_dir, None)
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(ref(input_ids=ids).logits[0].float(), dim=-1)
    assert len(out.logprobs) == 6 and out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for j, tl in enumerate(out.logprobs):
        row = logprobs[len(prompt) - 1 + j]
        assert tl.token_id == out.token_ids[j] and tl.logprob == pytest.approx(float(row[tl.token_id]), abs=1e-4)
        top = torch.topk(row, 3)
        assert [t for t, _ in tl.top] == top.indices.tolist() and tl.top[0][1] == pytest.approx(float(top.values[0]), abs=1e-4)
    for j in range(1, len(prompt)):
        tl = out.prompt_logprobs[j]
        assert tl.token_id == prompt[j] and tl.logprob == pytest.approx(float(logprobs[j - 1, prompt[j]]), abs=1e-4) and len(tl.top) == 2
    assert scored.token_ids == [] and scored.usage.completion_tokens == 0 and scored.text == ""
    assert [t.logprob for t in scored.prompt_logprobs[1:]] == pytest.approx([t.logprob for t in out.prompt_logprobs[1:]], abs=1e-5)


def test_streamed_deltas_carry_their_tokens_logprobs(served, make_scheduler):
    model, _ = served
    sched = make_scheduler()
    deltas, done = collect(sched.submit(prompt_ids(model, "Stream logprobs"), SamplingParams(max_tokens=8, logprobs=1), ignore_eos=True))
    streamed = [tl for d in deltas for tl in (d.logprobs or [])]
    assert [tl.token_id for tl in streamed] == done.token_ids and streamed == done.logprobs
