"""Single-request generation on tiny real models: seeds, stops, usage, batching, adapters per call."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers_tune import make_skill, random_adapter
from conftest import arithmetic_rows

from resa_engine.adapter import attach_adapter, detach_adapter
from resa_engine.generate import format_prompt, generate, generate_batch
from resa_engine.models import load_model
from resa_engine.sampling import SamplingParams

PROMPT = "What is 12 + 30?"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(registry, session_cache_dir):
    return load_model(registry.get("tiny-llama"), device="cpu", cache_dir=session_cache_dir)


def run(m, params: SamplingParams, prompt: str = PROMPT, adapter: str | None = None):
    return generate(m.model, m.tokenizer, prompt=prompt, params=params, adapter=adapter)


def test_format_prompt_plain_and_chat(tiny_llama):
    tok = tiny_llama.tokenizer
    assert format_prompt(tok, prompt="hello") == tok("hello")["input_ids"]
    ids = format_prompt(tok, messages=[{"role": "user", "content": "hi"}])
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    for kwargs, message in [
        ({}, "exactly one"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one"),
        ({"prompt": ""}, "non-empty"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, "messages\\[0\\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            format_prompt(tok, **kwargs)


def test_greedy_and_seeded_sampling_are_deterministic(tiny_llama):
    greedy = SamplingParams(max_tokens=12)
    assert run(tiny_llama, greedy).token_ids == run(tiny_llama, greedy).token_ids
    sampled = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a, b = run(tiny_llama, sampled), run(tiny_llama, sampled)
    assert a.text == b.text and a.token_ids == b.token_ids
    others = {tuple(run(tiny_llama, SamplingParams(max_tokens=12, temperature=1.0, seed=s)).token_ids) for s in range(4)}
    assert len(others) > 1  # the seed matters


def test_max_tokens_ends_with_length_and_counts_usage(tiny_llama):
    ids = format_prompt(tiny_llama.tokenizer, prompt=PROMPT)
    out = run(tiny_llama, SamplingParams(max_tokens=9))
    assert out.finish_reason == "length"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 9 and out.usage.total_tokens == len(ids) + 9
    assert len(out.token_ids) == 9 and out.text == tiny_llama.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_stop_string_cuts_the_text_and_ends_with_stop(tiny_llama):
    full = run(tiny_llama, SamplingParams(max_tokens=30))
    assert len(full.text) > 12
    stop = full.text[6:9]
    expected = full.text[: full.text.find(stop)]
    out = run(tiny_llama, SamplingParams(max_tokens=30, stop=[stop, "never-there"]))
    assert out.finish_reason == "stop" and out.text == expected
    assert out.usage.completion_tokens < 30 and out.token_ids == full.token_ids[: out.usage.completion_tokens]


def test_eos_ends_with_stop_and_is_counted(registry, session_cache_dir):
    m = load_model(registry.get("tiny-llama"), device="cpu", cache_dir=session_cache_dir)
    head = torch.nn.Linear(m.hidden_size, m.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[m.tokenizer.eos_token_id] = 10.0
    m.model.lm_head = head
    out = run(m, SamplingParams(max_tokens=5))
    assert out.finish_reason == "stop" and out.text == "" and out.token_ids == [] and out.usage.completion_tokens == 1


def test_batch_with_left_padding_matches_single_requests(tiny_llama):
    tok = tiny_llama.tokenizer
    prompts = [format_prompt(tok, prompt=p) for p in ("1 + 1 =", "What is 45 * 12? Think step by step.", "7")]
    params = SamplingParams(max_tokens=10, stop=["</think>"])
    batched = generate_batch(tiny_llama.model, tok, prompts, params)
    for ids, out in zip(prompts, batched):
        single = generate(tiny_llama.model, tok, input_ids=ids, params=params)
        assert out.token_ids == single.token_ids and out.finish_reason == single.finish_reason
        assert out.usage.prompt_tokens == len(ids)


def test_adapter_is_chosen_per_call(llama, tmp_path):
    params = SamplingParams(max_tokens=10)
    before = run(llama, params)
    adapter_dir = random_adapter(llama, tmp_path / "adapter", scale=0.5)
    peft_model = attach_adapter(llama, adapter_dir, "skill")
    try:
        assert peft_model is llama.model
        base = run(llama, params)
        skilled = run(llama, params, adapter="skill")
        assert base.token_ids == before.token_ids  # attaching changes nothing for base requests
        assert skilled.token_ids != base.token_ids
        assert run(llama, params, adapter="skill").token_ids == skilled.token_ids
        with pytest.raises(ValueError, match="non-existing adapter"):
            run(llama, params, adapter="other")
    finally:
        detach_adapter(llama, "skill")
    assert run(llama, params).token_ids == before.token_ids
    with pytest.raises(ValueError, match="no adapters attached"):
        run(llama, params, adapter="skill")


def test_cli_generate_end_to_end(resa_env, store, tmp_path, capsys):
    from app.cli import main

    make_skill(store, "arith", tmp_path / "skill", rows=arithmetic_rows(30))
    assert main(["tune", "--skill", "arith", "--target", "tiny-llama", "--lr", "1e-3", "--max-steps", "2", "--chunk-len", "64", "--json"]) == 0
    capsys.readouterr()
    argv = ["generate", "--model", "tiny-llama", "--skill", "arith", "--max-tokens", "6", "--temperature", "0.8", "--seed", "3", "--json", PROMPT]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["finish_reason"] in ("stop", "length") and 1 <= first["usage"]["completion_tokens"] <= 6
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["text"] == first["text"]

    # an adapter built on tiny-llama, attached to tiny-llama-b (same shapes): allowed, and said so
    assert main(["generate", "--model", "tiny-llama-b", "--skill", "tiny-llama:arith", "--max-tokens", "3", "hi"]) == 0
    assert "cross-model" in capsys.readouterr().err

    for argv, message in [
        (["generate", "--model", "tiny-llama", "--skill", "nope", "hi"], "not found"),
        (["generate", "--model", "tiny-qwen", "--skill", "tiny-llama:arith", "hi"], "cannot be attached to tiny-qwen"),
        (["generate", "--model", "tiny-llama", "--max-tokens", "0", "hi"], "max_tokens"),
        (["generate", "--model", "tiny-llama", "--top-p", "0", "hi"], "top_p"),
        (["generate", "--model", "no-such", "hi"], "unknown model"),
    ]:
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("resa generate: error:")


@pytest.mark.slow
def test_smollm2_generates_with_an_adapter_attached(smollm2, tmp_path):
    params = SamplingParams(max_tokens=6)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    before = generate(smollm2.model, smollm2.tokenizer, messages=messages, params=params)
    adapter_dir = random_adapter(smollm2, tmp_path / "adapter", scale=0.05)
    attach_adapter(smollm2, adapter_dir, "skill")
    try:
        skilled = generate(smollm2.model, smollm2.tokenizer, messages=messages, params=params, adapter="skill")
        base = generate(smollm2.model, smollm2.tokenizer, messages=messages, params=params)
    finally:
        detach_adapter(smollm2, "skill")
    assert before.text.strip() and base.token_ids == before.token_ids
    assert skilled.usage.completion_tokens <= 6 and skilled.finish_reason in ("stop", "length")
    assert skilled.token_ids != base.token_ids
