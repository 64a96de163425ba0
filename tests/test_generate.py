"""Generation through the engine on tiny real models: seeds, stops, usage, EOS, batching, adapters per
request, each checked against the PEFT reference decode (tests/_reference.py)."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers_serving import load_private
from _helpers_tune import make_skill, random_adapter
from _reference import attach_adapter, detach_adapter, generate, generate_batch
from conftest import arithmetic_rows

from resa_engine.engine import open_native
from resa_engine.engine.text import format_prompt
from resa_engine.sampling import SamplingParams

PROMPT = "What is 12 + 30?"
WAIT = 60


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def served(tiny_llama_dir):
    """(engine, its LoadedModel, the adapter folders it can load by key)."""
    model = load_private(tiny_llama_dir)
    folders = {}
    engine = open_native(model, folders.__getitem__).start()
    yield engine, model, folders
    engine.stop()


def run(engine, params: SamplingParams, prompt: str = PROMPT, adapter: str | None = None):
    return engine.submit(format_prompt(engine.tokenizer, prompt=prompt), params, adapter).result(WAIT)


def test_greedy_and_seeded_sampling_are_deterministic(served):
    engine, model, _ = served
    greedy = SamplingParams(max_tokens=12)
    assert run(engine, greedy).token_ids == run(engine, greedy).token_ids
    assert run(engine, greedy).token_ids == generate(model.model, model.tokenizer, prompt=PROMPT, params=greedy).token_ids
    sampled = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a, b = run(engine, sampled), run(engine, sampled)
    assert a.text == b.text and a.token_ids == b.token_ids
    others = {tuple(run(engine, SamplingParams(max_tokens=12, temperature=1.0, seed=s)).token_ids) for s in range(4)}
    assert len(others) > 1  # the seed matters


def test_max_tokens_ends_with_length_and_counts_usage(served):
    engine, model, _ = served
    ids = format_prompt(model.tokenizer, prompt=PROMPT)
    out = run(engine, SamplingParams(max_tokens=9))
    assert out.finish_reason == "length"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 9 and out.usage.total_tokens == len(ids) + 9
    assert len(out.token_ids) == 9 and out.text == model.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_stop_string_cuts_the_text_and_ends_with_stop(served):
    engine, model, _ = served
    full = run(engine, SamplingParams(max_tokens=30))
    assert len(full.text) > 12
    stop = full.text[6:9]
    expected = full.text[: full.text.find(stop)]
    params = SamplingParams(max_tokens=30, stop=[stop, "never-there"])
    out = run(engine, params)
    assert out.finish_reason == "stop" and out.text == expected
    assert out.usage.completion_tokens < 30 and out.token_ids == full.token_ids[: out.usage.completion_tokens]
    assert out.text == generate(model.model, model.tokenizer, prompt=PROMPT, params=params).text  # the reference agrees


def test_eos_ends_with_stop_and_is_counted(tiny_llama_dir):
    m = load_private(tiny_llama_dir)
    head = torch.nn.Linear(m.hidden_size, m.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[m.tokenizer.eos_token_id] = 10.0
    m.model.lm_head = head
    engine = open_native(m).start()
    try:
        out = run(engine, SamplingParams(max_tokens=5))
    finally:
        engine.stop()
    assert out.finish_reason == "stop" and out.text == "" and out.token_ids == [] and out.usage.completion_tokens == 1
    ref = generate(m.model, m.tokenizer, prompt=PROMPT, params=SamplingParams(max_tokens=5))
    assert (ref.finish_reason, ref.token_ids, ref.usage.completion_tokens) == ("stop", [], 1)


def test_a_batch_matches_single_requests_and_the_reference(served):
    engine, model, _ = served
    tok = model.tokenizer
    prompts = [format_prompt(tok, prompt=p) for p in ("1 + 1 =", "What is 45 * 12? Think step by step.", "7")]
    params = SamplingParams(max_tokens=10, stop=["</think>"])
    together = [h.result(WAIT) for h in [engine.submit(ids, params) for ids in prompts]]
    reference = generate_batch(model.model, tok, prompts, params)
    for ids, out, ref in zip(prompts, together, reference):
        single = engine.submit(ids, params).result(WAIT)
        assert out.token_ids == single.token_ids == ref.token_ids and out.finish_reason == single.finish_reason == ref.finish_reason
        assert out.usage.prompt_tokens == len(ids)


def test_adapter_is_chosen_per_request(served, tiny_llama_dir, tmp_path):
    engine, model, folders = served
    params = SamplingParams(max_tokens=10)
    before = run(engine, params)
    reference = load_private(tiny_llama_dir, name="tiny-llama")  # a second copy: the engine's weights stay untouched
    folders["skill"] = random_adapter(reference, tmp_path / "adapter", scale=0.5)
    base = run(engine, params)
    skilled = run(engine, params, adapter="skill")
    assert base.token_ids == before.token_ids  # loading an adapter changes nothing for base requests
    assert skilled.token_ids != base.token_ids
    assert run(engine, params, adapter="skill").token_ids == skilled.token_ids
    attach_adapter(reference, folders["skill"], "skill")
    try:
        ref = generate(reference.model, reference.tokenizer, prompt=PROMPT, params=params, adapter="skill")
    finally:
        detach_adapter(reference, "skill")
    assert skilled.token_ids == ref.token_ids  # the gathered LoRA computes what PEFT computes
    with pytest.raises(KeyError):
        run(engine, params, adapter="other")  # the loader knows no such adapter: that request alone fails


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
        (["generate", "--model", "tiny-qwen", "--skill", "tiny-llama:arith", "hi"], "does not fit model tiny-qwen"),
        (["generate", "--model", "tiny-llama", "--max-tokens", "0", "hi"], "max_tokens"),
        (["generate", "--model", "tiny-llama", "--top-p", "0", "hi"], "top_p"),
        (["generate", "--model", "no-such", "hi"], "unknown model"),
    ]:
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("resa generate: error:")


@pytest.mark.slow
def test_smollm2_generates_with_an_adapter_per_request(smollm2, tmp_path):
    params = SamplingParams(max_tokens=6)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    folders = {"skill": random_adapter(smollm2, tmp_path / "adapter", scale=0.05)}
    engine = open_native(smollm2, folders.__getitem__).start()
    try:
        ids = format_prompt(smollm2.tokenizer, messages=messages)
        base = engine.submit(ids, params).result(WAIT)
        skilled = engine.submit(ids, params, "skill").result(WAIT)
    finally:
        engine.stop()
    reference = generate(smollm2.model, smollm2.tokenizer, messages=messages, params=params)
    assert base.text.strip() and base.token_ids == reference.token_ids
    assert skilled.usage.completion_tokens <= 6 and skilled.finish_reason in ("stop", "length")
    assert skilled.token_ids != base.token_ids
