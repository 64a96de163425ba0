"""Transparency over HTTP: per-token latents on a loaded model, latent cards, the per-layer report.

A skill is committed to a real store by hand (two seeded sparsify SAEs on tiny-llama, latent
cards computed with resa_engine.transparency over real trigger-text chunks); the app runs in a
TestClient without a job queue (these routes need none).
"""

from __future__ import annotations

import json

import pytest

from resa_engine.data import TriggerDataset
from _helpers_sae import seeded_sae
from resa_engine.artifacts import sae_subdir
from resa_engine.transparency.cards import latent_cards, save_cards
from resa_engine.transparency.inspect import encode_layer, inspect_prompt

LAYERS = (1, 2)
NUM_LATENTS, K = 128, 8
PROMPT = "What is 12 + 30?"
METRICS = {
    "1": {"fvu": 0.25, "dead_fraction": 0.125, "loss_recovered": 0.8, "reasoning_features": 3, "reasoning_latents": [4, 9, 17]},
    "2": {"fvu": 0.5, "dead_fraction": 0.0, "loss_recovered": 0.6},  # no reasoning count: reported as null
}


def _sae(seed: int):
    return seeded_sae(num_latents=NUM_LATENTS, k=K, seed=seed)


def _manifest(name: str) -> dict:
    return {"name": name, "layers": list(LAYERS), "default_layer": 1, "d_in": 64, "sae": {"num_latents": NUM_LATENTS, "k": K}, "metrics": METRICS}


@pytest.fixture(scope="module")
def corpus(tiny_llama, qa_rows):
    return TriggerDataset.from_rows(qa_rows[:12], tiny_llama.tokenizer, chunk_len=48).chunks


@pytest.fixture(scope="module")
def saes():
    return {layer: _sae(layer) for layer in LAYERS}


@pytest.fixture(scope="module")
def api(tmp_path_factory, models_file, session_cache_dir, tiny_llama, saes, corpus):
    """The app over a store holding `arith` (SAEs + cards on both layers) and `bare` (SAEs only)."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    root = tmp_path_factory.mktemp("transparency-api")
    settings = Settings(
        store_url=f"file://{root / 'store'}", models_file=models_file, cache_dir=session_cache_dir,
        default_model="tiny-llama", redis_url=None, api_keys="",
    )
    store = settings.open_store()
    for name, cards in (("arith", True), ("bare", False)):
        folder = root / name
        for layer, sae in saes.items():
            sae.save_to_disk(folder / sae_subdir(layer))
            if cards:
                save_cards(latent_cards(tiny_llama, sae, layer, corpus, tiny_llama.tokenizer, top_contexts=4, window=4), folder / sae_subdir(layer))
        store.commit("skill", (name,), folder, _manifest(name))
    with TestClient(create_app(settings, load_default_model=False, supervise=False)) as client:
        yield client


# ---------------------------------------------------------------- inspect


def test_inspect_gives_each_token_the_sae_latents(api, tiny_llama, saes):
    res = api.post("/skills/arith/inspect", json={"model": "tiny-llama", "prompt": PROMPT, "layer": 2, "top": 3})
    assert res.status_code == 200, res.text
    body = res.json()
    ids = tiny_llama.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert (body["skill"], body["model"], body["layer"]) == ("arith", "tiny-llama", 2)
    assert [t["token_id"] for t in body["tokens"]] == ids and [t["position"] for t in body["tokens"]] == list(range(len(ids)))
    # the same answer as the engine on an independently loaded copy of the model
    expected = inspect_prompt(tiny_llama, saes[2], 2, PROMPT, top_n=3)
    for got, want in zip(body["tokens"], expected):
        assert [lat["index"] for lat in got["latents"]] == [i for i, _ in want.latents]
        assert [lat["activation"] for lat in got["latents"]] == pytest.approx([a for _, a in want.latents], rel=1e-4, abs=1e-5)
        assert 1 <= len(got["latents"]) <= 3
        assert all(a["activation"] >= b["activation"] > 0 for a, b in zip(got["latents"], got["latents"][1:]))
    # no layer: the skill's default layer
    assert api.post("/skills/arith/inspect", json={"model": "tiny-llama", "prompt": PROMPT}).json()["layer"] == 1


@pytest.mark.parametrize(
    "path, body, status, kind",
    [
        ("/skills/nope/inspect", {"model": "tiny-llama", "prompt": PROMPT}, 404, "not_found"),
        ("/skills/arith/inspect", {"model": "no-such-model", "prompt": PROMPT}, 404, "unknown_model"),
        ("/skills/arith/inspect", {"model": "tiny-llama", "prompt": PROMPT, "layer": 3}, 422, "invalid_layer"),
        ("/skills/arith/inspect", {"model": "tiny-qwen", "prompt": PROMPT}, 409, "incompatible_skill"),
        ("/skills/arith/inspect", {"model": "/tmp/tiny-llama", "prompt": PROMPT}, 422, "invalid_request"),
        ("/skills/arith/inspect", {"model": "tiny-llama", "prompt": ""}, 422, "invalid_request"),
        ("/skills/arith/inspect", {"model": "tiny-llama", "prompt": PROMPT, "top": 0}, 422, "invalid_request"),
    ],
)
def test_inspect_errors(api, path, body, status, kind):
    res = api.post(path, json=body)
    assert res.status_code == status, res.text
    assert res.json()["error"]["type"] == kind


# ---------------------------------------------------------------- latent cards


def test_latent_card_contexts_are_real_firings(api, tiny_llama, saes, corpus):
    """Every context of a card is a real corpus window where the latent fires with that activation."""
    res = api.get("/skills/arith/latents/0")  # find a live latent through a context-bearing card
    assert res.status_code == 200, res.text
    live = None
    for index in range(NUM_LATENTS):
        card = api.get(f"/skills/arith/latents/{index}", params={"layer": 2}).json()
        if card["contexts"]:
            live = card
            break
    assert live is not None and live["layer"] == 2 and live["num_latents"] == NUM_LATENTS
    assert 0 < live["density"] <= 1 and live["mean_activation"] > 0 and live["num_tokens"] > 0
    acts, indices = encode_layer(tiny_llama, saes[2], 2, corpus[[c["chunk"] for c in live["contexts"]]])
    for row, ctx in enumerate(live["contexts"]):
        assert corpus[ctx["chunk"], ctx["position"]].item() == ctx["token_id"]
        assert ctx["token"] == tiny_llama.tokenizer.decode([ctx["token_id"]])
        assert ctx["text"] == f"{ctx['before']}«{ctx['token']}»{ctx['after']}"
        assert ctx["before"] + ctx["token"] + ctx["after"] in tiny_llama.tokenizer.decode(corpus[ctx["chunk"]].tolist())
        slot = indices[row, ctx["position"]] == live["index"]
        assert slot.any(), "the latent is in the SAE's top-k at the firing token"
        assert acts[row, ctx["position"]][slot].item() == pytest.approx(ctx["activation"], rel=1e-4)
    assert [c["activation"] for c in live["contexts"]] == sorted((c["activation"] for c in live["contexts"]), reverse=True)


def test_latent_card_errors(api):
    cases = [
        ("/skills/arith/latents/128", 422, "invalid_latent"),
        ("/skills/arith/latents/-1", 422, "invalid_latent"),
        ("/skills/arith/latents/0?layer=3", 422, "invalid_layer"),
        ("/skills/bare/latents/0", 404, "no_latent_cards"),
        ("/skills/nope/latents/0", 404, "not_found"),
    ]
    for path, status, kind in cases:
        res = api.get(path)
        assert (res.status_code, res.json()["error"]["type"]) == (status, kind), (path, res.text)


# ---------------------------------------------------------------- report


def test_report_json_from_the_manifest(api):
    res = api.get("/skills/arith/report")
    assert res.status_code == 200 and res.headers["content-type"] == "application/json"
    body = res.json()
    assert body["skill"] == "arith" and body["default_layer"] == 1
    assert body["layers"] == [
        {"layer": 1, "fvu": 0.25, "dead_fraction": 0.125, "loss_recovered": 0.8, "reasoning_features": 3},
        {"layer": 2, "fvu": 0.5, "dead_fraction": 0.0, "loss_recovered": 0.6, "reasoning_features": None},
    ]


def test_report_png_and_svg(api):
    png = api.get("/skills/arith/report", params={"format": "png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n") and len(png.content) > 1000
    svg = api.get("/skills/arith/report", params={"format": "svg"})
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
    assert b"<svg" in svg.content[:2000] and b"</svg>" in svg.content[-100:]
    assert api.get("/skills/arith/report", params={"format": "bmp"}).status_code == 422
    assert api.get("/skills/nope/report").status_code == 404
    assert json.loads(api.get("/skills/nope/report", params={"format": "png"}).content)["error"]["type"] == "not_found"


# ---------------------------------------------------------------- steering per request

STEER = {"skill": "arith", "layer": 1, "edits": [{"latent": 3, "mode": "clamp", "value": 25.0}, {"latent": 40, "mode": "add", "value": 10.0}]}


def _gen(api, **extra):
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 8, "temperature": 0.0, **extra}
    res = api.post("/generate", json=body)
    assert res.status_code == 200, res.text
    return res.json()


def test_generate_with_sae_edits_and_compare(api, tiny_llama, saes):
    plain = _gen(api)
    empty = _gen(api, sae={"skill": "arith", "edits": []}, compare=True)
    assert empty["text"] == empty["unsteered"]["text"] == plain["text"]  # no edits: output unchanged
    assert empty["sae"] == {"skill": "arith", "layer": 1, "mode": "steer", "edits": 0}

    steered = _gen(api, sae=STEER, compare=True)
    assert steered["unsteered"]["text"] == plain["text"]
    assert steered["text"] != plain["text"]
    assert steered["sae"] == {"skill": "arith", "layer": 1, "mode": "steer", "edits": 2}
    assert steered["usage"]["completion_tokens"] >= 1 and steered["unsteered"]["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    # the same tokens as the engine's reference splice (encode -> edit -> decode + error) on a separate copy
    from _reference import generate, reference_splice_hook
    from resa_engine.sae.edits import LatentEdit
    from resa_engine.sampling import SamplingParams

    edits = [LatentEdit(e["latent"], e["mode"], e["value"]) for e in STEER["edits"]]
    with reference_splice_hook(tiny_llama.layers, 1, saes[1], edits, keep_error=True):
        ref = generate(tiny_llama.model, tiny_llama.tokenizer, prompt=PROMPT, params=SamplingParams(max_tokens=8, temperature=0.0))
    assert steered["text"] == ref.text
    alone = _gen(api, sae=STEER)
    assert alone["text"] == steered["text"] and alone["unsteered"] is None


def test_streamed_compare_interleaves_both_completions(api):
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 8, "temperature": 0.0, "sae": STEER, "compare": True, "stream": True}
    with api.stream("POST", "/generate", json=body) as res:
        assert res.status_code == 200
        lines = [line[len("data: ") :] for line in res.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    texts = {i: "".join(e["text"] for e in events if e["index"] == i) for i in (0, 1)}
    done = {e["index"]: e for e in events if e.get("done")}
    assert set(done) == {0, 1} and done[0]["sae"]["layer"] == 1
    whole = _gen(api, sae=STEER, compare=True)
    assert texts == {0: whole["text"], 1: whole["unsteered"]["text"]}


@pytest.mark.parametrize(
    "sae, extra, status, kind",
    [
        ({"skill": "nope", "edits": []}, {}, 404, "unknown_skill"),
        ({"skill": "arith", "layer": 3, "edits": []}, {}, 422, "invalid_layer"),
        ({"skill": "arith", "edits": [{"latent": NUM_LATENTS, "mode": "add", "value": 1.0}]}, {}, 422, "invalid_edit"),
        ({"skill": "arith", "edits": [{"latent": 1, "mode": "boost", "value": 1.0}]}, {}, 422, "invalid_request"),
        ({"skill": "arith", "edits": [{"latent": 1, "mode": "add", "value": 1.0}, {"latent": 1, "mode": "scale", "value": 2.0}]}, {}, 422, "invalid_request"),
        ({"skill": "arith", "edits": []}, {"model": "tiny-qwen"}, 409, "incompatible_skill"),
        (None, {"compare": True}, 422, "invalid_request"),
    ],
)
def test_steering_errors(api, sae, extra, status, kind):
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 4, **({"sae": sae} if sae else {}), **extra}
    res = api.post("/generate", json=body)
    assert res.status_code == status, res.text
    assert res.json()["error"]["type"] == kind


def test_latent_listing_sorts_searches_pages_and_marks_reasoning_features(api, tiny_llama, saes, corpus):
    res = api.get("/skills/arith/latents", params={"layer": 1, "limit": 500})
    assert res.status_code == 200, res.text
    body = res.json()
    densities = [lat["density"] for lat in body["latents"]]
    assert densities == sorted(densities, reverse=True) and body["total"] == body["live"] == len(densities) > 0
    assert sum(body["density_histogram"]["counts"]) == body["live"] and body["density_histogram"]["dead"] == NUM_LATENTS - body["live"]
    marked = {lat["index"] for lat in body["latents"] if lat["reasoning"]}
    assert marked == {4, 9, 17} & {lat["index"] for lat in body["latents"]}
    card = api.get("/skills/arith/latents/4", params={"layer": 1}).json()
    assert card["reasoning"] is True

    by_index = api.get("/skills/arith/latents", params={"layer": 1, "sort": "index", "order": "asc", "offset": 2, "limit": 3}).json()
    everything = sorted(lat["index"] for lat in body["latents"])
    assert [lat["index"] for lat in by_index["latents"]] == everything[2:5]

    first = body["latents"][0]
    word = first["top_tokens"][0].strip() or first["top_tokens"][0]
    found = api.get("/skills/arith/latents", params={"layer": 1, "q": word.upper(), "limit": 500}).json()
    assert first["index"] in {lat["index"] for lat in found["latents"]} and 0 < found["total"] <= body["total"]
    for index in (lat["index"] for lat in found["latents"][:5]):
        contexts = api.get(f"/skills/arith/latents/{index}", params={"layer": 1}).json()["contexts"]
        assert any(word.casefold() in c["text"].replace("«", "").replace("»", "").casefold() for c in contexts)
    assert api.get("/skills/bare/latents").status_code == 404
    assert api.get("/skills/arith/latents", params={"layer": 3}).status_code == 422
