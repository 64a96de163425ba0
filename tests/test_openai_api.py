"""The OpenAI-compatible routes, driven by the official `openai` client against a real server
(uvicorn on a loopback port) serving tiny-llama through the continuous-batching scheduler,
with a random PEFT LoRA adapter committed to the store as skill `quirk`."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from _helpers_jobs import wait_for
from _helpers_serving import make_lora
from conftest import free_port

SKILL = "quirk"
LENS = "lens"  # a skill with only an SAE (layer 1), for steering
PROMPT = "What is 2 + 3?"
STEER = {"skill": LENS, "edits": [{"latent": 3, "mode": "clamp", "value": 25.0}, {"latent": 40, "mode": "add", "value": 10.0}]}


def _steering_sae(folder):
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    from resa_engine.skill import sae_subdir

    torch.manual_seed(1)
    SparseCoder(64, SparseCoderConfig(num_latents=128, k=8)).save_to_disk(folder / sae_subdir(1))
    return folder


class _Server:
    def __init__(self, app, port: int):
        import uvicorn

        self.url, self.app = f"http://127.0.0.1:{port}", app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> "_Server":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


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
        store.commit("skill", (LENS,), _steering_sae(tmp / "lens"), {"name": LENS, "layers": [1], "default_layer": 1, "d_in": 64})
        srv = _Server(create_app(settings, load_default_model=False, supervise=False), free_port()).start()
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
    assert both.model_extra["sae"] == {"skill": LENS, "layer": 1, "edits": 2}
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
    scheduler = server.app.state.generation.batched.served("tiny-llama").scheduler
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
