"""The OpenAI-compatible routes, driven by the official `openai` client against a real server
(uvicorn on a loopback port) serving tiny-llama through the continuous-batching scheduler,
with a random PEFT LoRA adapter committed to the store as skill `quirk`."""

from __future__ import annotations

import threading

import httpx
import pytest

from _helpers_jobs import wait_for
from _helpers_sae import lens_skill_folder
from _helpers_service import UvicornThread
from _helpers_serving import make_lora
from conftest import free_port

SKILL = "quirk"
LENS = "lens"  # a skill with only an SAE (layer 1), for steering
PROMPT = "What is 2 + 3?"
STEER = {"skill": LENS, "edits": [{"latent": 3, "mode": "clamp", "value": 25.0}, {"latent": 40, "mode": "add", "value": 10.0}]}





@pytest.fixture(scope="module")
def server(tmp_path_factory, models_file, session_cache_dir, tiny_llama_dir):
    from adapters_store import ArtifactStore
    from app.main import create_app
    from app.settings import Settings, get_settings

    tmp = tmp_path_factory.mktemp("openai-api")
    env = {
        "RESA_STORE_URL": f"file://{tmp / 'store'}",
        "RESA_MODELS_FILE": str(models_file),
        "RESA_CACHE_DIR": str(session_cache_dir),
        "RESA_DEFAULT_MODEL": "tiny-llama",
        "RESA_API_KEYS": "",
        "RESA_DEVICE": "cpu",
        # one running sequence and two queued (a steering `compare` queues two): a fourth concurrent request is refused with 429
        "RESA_MAX_BATCH": "1",
        "RESA_MAX_QUEUE": "2",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        settings = Settings()
        lora = make_lora(tiny_llama_dir, tmp / "lora", seed=7)
        store = ArtifactStore(settings.store_url, cache_dir=settings.cache_dir)
        store.commit("adapter", ("tiny-llama", SKILL), lora, {"skill": SKILL})
        store.commit("skill", (LENS,), lens_skill_folder(tmp / "lens"), {"name": LENS, "layers": [1], "default_layer": 1, "d_in": 64})
        srv = UvicornThread(create_app(settings, load_default_model=False, supervise=False), free_port()).start()
        try:
            yield srv
        finally:
            srv.stop()
            get_settings.cache_clear()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_base_models_and_adapters_with_parent(client):
    cards = {m.id: m for m in client.models.list().data}
    assert {"tiny-llama", "tiny-llama-b", "tiny-qwen", f"tiny-llama:{SKILL}"} <= set(cards)
    assert cards[f"tiny-llama:{SKILL}"].parent == "tiny-llama"
    assert getattr(cards["tiny-llama"], "parent", None) is None


def test_completion_with_skill_differs_from_base_and_fills_usage(client):
    base = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=12, temperature=0)
    skilled = client.completions.create(model=f"tiny-llama:{SKILL}", prompt=PROMPT, max_tokens=12, temperature=0)
    assert base.object == "text_completion" and base.choices[0].finish_reason in ("stop", "length")
    assert base.usage.completion_tokens >= 1 and base.usage.total_tokens == base.usage.prompt_tokens + base.usage.completion_tokens
    assert skilled.usage.prompt_tokens == base.usage.prompt_tokens
    assert skilled.choices[0].text != base.choices[0].text
    assert skilled.model_extra.get("cross_model") is False
    # greedy is deterministic: the same request gives the same text
    again = client.completions.create(model=f"tiny-llama:{SKILL}", prompt=PROMPT, max_tokens=12, temperature=0)
    assert again.choices[0].text == skilled.choices[0].text


def test_chat_and_streaming_match_the_non_streamed_text(client):
    messages = [{"role": "user", "content": PROMPT}]
    full = client.chat.completions.create(model=f"tiny-llama:{SKILL}", messages=messages, max_tokens=16, temperature=0)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens >= 1

    chunks = list(client.chat.completions.create(model=f"tiny-llama:{SKILL}", messages=messages, max_tokens=16, temperature=0, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content

    text = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    pieces = list(client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=16, temperature=0, stream=True))
    assert len(pieces) >= 2 and "".join(p.choices[0].text for p in pieces) == text


def test_steering_through_extra_body_with_compare(client):
    """`extra_body={"sae": ..., "compare": true}`: choice 0 steered, choice 1 the plain completion."""
    messages = [{"role": "user", "content": PROMPT}]
    plain = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=8, temperature=0)
    both = client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=8, temperature=0, extra_body={"sae": STEER, "compare": True}
    )
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[1].message.content == plain.choices[0].message.content
    assert both.choices[0].message.content != plain.choices[0].message.content
    assert both.model_extra["sae"] == {"skill": LENS, "layer": 1, "mode": "steer", "edits": 2}
    alone = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=8, temperature=0, extra_body={"sae": STEER})
    assert [c.message.content for c in alone.choices] == [both.choices[0].message.content]
    assert both.usage.prompt_tokens == plain.usage.prompt_tokens
    assert both.usage.completion_tokens == both.usage.total_tokens - both.usage.prompt_tokens > plain.usage.completion_tokens

    stream = client.completions.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0, stream=True, extra_body={"sae": STEER, "compare": True}
    )
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    whole = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"sae": STEER, "compare": True})
    assert texts == {0: whole.choices[0].text, 1: whole.choices[1].text}

    import openai

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=4, extra_body={"sae": {"skill": "nope", "edits": []}})
    with pytest.raises(openai.UnprocessableEntityError, match="compare"):
        client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=4, extra_body={"compare": True})


def test_raw_sse_ends_with_done(server):
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as res:
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in res.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_cross_model_adapter_is_served_and_incompatible_is_409(client, server):
    cross = client.completions.create(model=f"tiny-llama-b:{SKILL}", prompt=PROMPT, max_tokens=4, temperature=0)
    assert cross.model_extra["cross_model"] is True and cross.model_extra["adapter_target"] == "tiny-llama"
    res = httpx.post(f"{server.url}/v1/completions", json={"model": f"tiny-qwen:{SKILL}", "prompt": PROMPT, "max_tokens": 4}, timeout=60)
    assert res.status_code == 409 and res.json()["error"]["type"] == "incompatible_adapter"


def test_unknown_model_and_skill_are_404_error_objects(client):
    import openai

    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    error = unknown.value.body
    assert error["type"] == "unknown_model" and error["code"] == "unknown_model" and error["param"] == "model"
    assert "no-such-model" in error["message"]
    with pytest.raises(openai.NotFoundError) as skill:
        client.completions.create(model="tiny-llama:no-such-skill", prompt=PROMPT)
    assert skill.value.body["type"] == "unknown_skill"


def test_full_queue_is_429_with_retry_after(server):
    long = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 480, "temperature": 1.0, "seed": 3, "stream": True}
    short = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 4}
    statuses: list[int] = []
    retry_after: list[str] = []
    finish: list[dict] = []

    def post_short():
        res = httpx.post(f"{server.url}/v1/completions", json=short, timeout=120)
        statuses.append(res.status_code)
        if res.status_code == 429:
            assert res.json()["error"]["type"] == "rate_limit_exceeded" and res.json()["error"]["code"] == "rate_limit_exceeded"
            retry_after.append(res.headers["retry-after"])

    with httpx.stream("POST", f"{server.url}/v1/completions", json=long, timeout=120) as res:
        assert res.status_code == 200
        lines = res.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # the long request is running
        # the batch holds one row and the queue two requests: of three more, at least one is refused
        threads = [threading.Thread(target=post_short) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        import json

        for line in lines:
            if line.startswith("data: {"):
                finish.append(json.loads(line[6:]))
    assert 429 in statuses and 200 in statuses, statuses
    assert all(int(v) >= 1 for v in retry_after)
    # the precondition held: the long request was still generating when the others arrived
    assert finish[-1]["usage"]["completion_tokens"] > 50


def test_client_disconnect_cancels_the_request(server):
    scheduler = server.app.state.generation.models.get("tiny-llama").engine
    before = scheduler.stats().cancelled
    long = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 480, "temperature": 1.0, "seed": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=long, timeout=120) as res:
        assert res.status_code == 200
        next(line for line in res.iter_lines() if line.startswith("data: "))
    # leaving the stream closes the connection: the server cancels the request and frees its slot
    wait_for(lambda: scheduler.stats().cancelled > before, 60, 0.1, "the request to be cancelled")
    stats = scheduler.stats()
    assert stats.running == 0 and stats.queued == 0


def test_generate_route_streams_token_deltas_from_the_scheduler(server):
    import json

    body = {"prompt": PROMPT, "max_tokens": 12, "skill": SKILL, "model": "tiny-llama-b"}
    full = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
    assert full["cross_model"] is True and full["adapter_target"] == "tiny-llama" and full["skill"] == SKILL
    with httpx.stream("POST", f"{server.url}/generate", json={**body, "stream": True}, timeout=60) as res:
        lines = [line for line in res.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    deltas = [e["text"] for e in events if not e.get("done")]
    assert len(deltas) >= 2 and "".join(deltas) == full["text"]  # token by token, same greedy text
    assert events[-1]["done"] is True and events[-1]["usage"] == full["usage"]


def test_logprobs_echo_n_and_token_prompts_for_evaluation_harnesses(server, client, tiny_llama_dir):
    """What lm-evaluation-harness's `local-completions` sends: token-id prompts, `echo` with `logprobs` and
    `max_tokens: 0` to score a text (log-likelihood tasks), `n` samples, and logprobs of generated tokens;
    every logprob equals log_softmax of the model's own logits."""
    import torch

    from _helpers_serving import reference_model
    from resa_engine.engine.text import format_prompt
    from resa_engine.models import ModelSpec, load_model

    tok = load_model(ModelSpec(name="tiny-llama", kind="path", location=str(tiny_llama_dir)), device="cpu").tokenizer
    ids = format_prompt(tok, prompt="What is 2 + 3? The answer is 5")
    ref = reference_model(tiny_llama_dir, None)
    with torch.no_grad():
        full = torch.log_softmax(ref(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)

    scored = client.completions.create(model="tiny-llama", prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == tok.decode(ids) and lp.token_logprobs[0] is None and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[1:] == pytest.approx([float(full[j - 1, ids[j]]) for j in range(1, len(ids))], abs=1e-4)
    assert all(len(top) == 1 for top in lp.top_logprobs[1:]) and lp.text_offset[0] == 0
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(ids)

    # this server queues at most 2 requests (max_queue 2): two prompts, or one prompt with n=2
    gen = client.completions.create(model="tiny-llama", prompt=[ids, ids[:5]], max_tokens=4, logprobs=2, temperature=0)
    assert [c.index for c in gen.choices] == [0, 1]
    first = gen.choices[0].logprobs
    from _helpers_serving import reference_greedy

    out_ids = reference_greedy(tiny_llama_dir, None, ids, 4)  # the tokens greedy decoding gives
    with torch.no_grad():
        cont = torch.log_softmax(ref(input_ids=torch.tensor([ids + out_ids])).logits[0].float(), dim=-1)
    assert first.token_logprobs == pytest.approx([float(cont[len(ids) - 1 + j, t]) for j, t in enumerate(out_ids)], abs=1e-4)
    # top alternatives are keyed by their text (two ids may decode alike, e.g. partial UTF-8 bytes)
    assert first.tokens == [tok.decode([t]) for t in out_ids] and all(1 <= len(top) <= 2 for top in first.top_logprobs)
    assert gen.usage.prompt_tokens == len(ids) + 5 and gen.usage.completion_tokens == 8

    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": PROMPT}], max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content

    sampled = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=3, n=2)
    assert len({c.text for c in sampled.choices}) > 1  # sample i uses seed + i
    again = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=3, n=2)
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]
    for bad, param in (({"prompt": [999_999]}, None), ({"prompt": "x", "max_tokens": 0}, None), ({"prompt": "x", "logprobs": 50}, None)):
        res = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny-llama", **bad}, timeout=30)
        assert res.status_code == 422, res.text
