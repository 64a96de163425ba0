"""Transparency: per-token latents, latent cards, reasoning features, layer report."""

from __future__ import annotations

import json
import re

import pytest
import torch

from _helpers_sae import block_code, prompt_tensor, seeded_sae
from resa_engine.data import SYSTEM_PROMPT, TriggerDataset, special_token_mask
from resa_engine.transparency.cards import LatentCards, latent_cards, load_cards, save_cards
from resa_engine.transparency.inspect import inspect_prompt
from resa_engine.transparency.reasoning import THINK_TAGS, find_reasoning_latents, reasoning_features, think_mask_from_offsets
from resa_engine.transparency.report import layer_report, render_report_png, render_report_svg


LAYER = 1
PROMPT = "What is 12 + 30?"


@pytest.fixture(scope="module")
def sae():
    return seeded_sae()


@pytest.fixture(scope="module")
def chunks(tiny_llama, qa_rows):
    return TriggerDataset.from_rows(qa_rows[:12], tiny_llama.tokenizer, chunk_len=64).chunks


# ---------------------------------------------------------------- reasoning features


def test_find_reasoning_latents_on_a_constructed_case():
    # tokens:     0      1      2      3      4
    think = torch.tensor([False, True, True, False, True])
    active = torch.zeros(5, 6, dtype=torch.bool)
    active[1, 0] = active[4, 0] = True  # 0: only on think tokens -> reasoning feature
    active[2, 1] = True  # 1: one think token -> reasoning feature
    active[1, 2] = active[3, 2] = True  # 2: also outside -> not
    active[0, 3] = True  # 3: only outside -> not
    active[:, 4] = True  # 4: everywhere -> not
    # 5: never active -> not
    assert find_reasoning_latents(active, think) == [0, 1]

    # The same case as top-k indices (k = 3, -1 = empty slot).
    topk = torch.tensor([[3, 4, -1], [0, 2, 4], [1, 4, -1], [2, 4, -1], [0, 4, -1]])
    assert find_reasoning_latents(topk, think) == [0, 1]
    assert find_reasoning_latents(topk, torch.zeros(5, dtype=torch.bool)) == []
    with pytest.raises(ValueError, match="think_mask"):
        find_reasoning_latents(active, think.long())
    with pytest.raises(ValueError, match="T = 5"):
        find_reasoning_latents(active[:4], think)


def test_think_mask_from_offsets_marks_every_piece_of_a_tag():
    text = "a <think> b </think>c"
    #       0123456789012345678901
    offsets = [(0, 1), (1, 3), (3, 8), (8, 9), (9, 11), (11, 14), (14, 19), (19, 20), (20, 21), (21, 21)]
    mask = think_mask_from_offsets(text, offsets).tolist()
    assert mask == [False, True, True, True, False, True, True, True, False, False]


def test_reasoning_features_on_a_tiny_model(tiny_llama, sae):
    rf = reasoning_features(tiny_llama, sae, LAYER)
    enc = tiny_llama.tokenizer(SYSTEM_PROMPT, add_special_tokens=False, return_offsets_mapping=True)
    spans = enc["offset_mapping"]
    tags = [(m.start(), m.end()) for t in THINK_TAGS for m in re.finditer(re.escape(t), SYSTEM_PROMPT)]
    assert len(tags) == 4  # "<think> </think>" and "<think> reasoning process here </think>"
    overlaps = [any(s < te and ts < e for ts, te in tags) for s, e in spans]
    assert rf.think_positions == [i for i, o in enumerate(overlaps) if o]
    # The think tokens cover every character of every tag, and nothing beyond one token either side.
    covered = set()
    for p in rf.think_positions:
        covered.update(range(*spans[p]))
    for ts, te in tags:
        assert set(range(ts, te)) <= covered
    assert "".join(rf.tokens[p] for p in rf.think_positions).count("think") == 4

    # Every reported latent satisfies the definition, recomputed from the raw code.
    _, acts, indices = block_code(tiny_llama, sae, torch.tensor([enc["input_ids"]]), LAYER)
    think = torch.zeros(len(spans), dtype=torch.bool)
    think[rf.think_positions] = True
    dense = torch.zeros(len(spans), 128, dtype=torch.bool)
    dense.scatter_(1, indices[0], acts[0] > 0)
    assert rf.latents == find_reasoning_latents(dense, think)
    assert rf.count == len(rf.latents)
    for latent in rf.latents:
        assert dense[think, latent].any() and not dense[~think, latent].any()
    assert json.loads(json.dumps(rf.to_dict()))["count"] == rf.count


def test_reasoning_features_needs_a_tag(tiny_llama, sae):
    with pytest.raises(ValueError, match="no <think>"):
        reasoning_features(tiny_llama, sae, LAYER, text="no tags here")


# ---------------------------------------------------------------- inspect_prompt


def test_inspect_prompt_gives_k_sorted_latents_per_token(tiny_llama, sae):
    tokens = inspect_prompt(tiny_llama, sae, LAYER, PROMPT, top_n=20)
    ids = prompt_tensor(tiny_llama, PROMPT)
    assert [t.token_id for t in tokens] == ids[0].tolist()
    assert [t.position for t in tokens] == list(range(ids.shape[1]))
    assert "".join(t.token for t in tokens) == PROMPT
    _, acts, indices = block_code(tiny_llama, sae, ids, LAYER)
    for t in tokens:
        assert len(t.latents) == int((acts[0, t.position] > 0).sum()) == 8  # top_n > k: all k active latents
        values = [a for _, a in t.latents]
        assert values == sorted(values, reverse=True)
        expected = {int(i): float(a) for a, i in zip(acts[0, t.position], indices[0, t.position])}
        for i, a in t.latents:
            assert a == pytest.approx(expected[i], rel=1e-5)
    assert all(len(t.latents) == 3 for t in inspect_prompt(tiny_llama, sae, LAYER, PROMPT, top_n=3))


def test_inspect_prompt_refuses_bad_input(tiny_llama, sae, registry, session_cache_dir):
    with pytest.raises(ValueError, match="empty"):
        inspect_prompt(tiny_llama, sae, LAYER, "")
    with pytest.raises(ValueError, match="out of range"):
        inspect_prompt(tiny_llama, sae, 9, PROMPT)
    from resa_engine.models import load_model

    qwen = load_model(registry.get("tiny-qwen"), device="cpu", cache_dir=session_cache_dir)
    with pytest.raises(ValueError, match="width 64"):
        inspect_prompt(qwen, sae, LAYER, PROMPT)


# ---------------------------------------------------------------- latent cards


@pytest.fixture(scope="module")
def cards(tiny_llama, sae, chunks):
    return latent_cards(tiny_llama, sae, LAYER, chunks, tiny_llama.tokenizer, top_contexts=4, window=5, batch_size=3)


def test_latent_cards_point_at_real_contexts(tiny_llama, sae, chunks, cards):
    tok = tiny_llama.tokenizer
    with torch.no_grad():
        _, acts, indices = block_code(tiny_llama, sae, chunks, LAYER)
    counted = ~special_token_mask(chunks, tok)
    dense = torch.zeros(*chunks.shape, 128)
    dense.scatter_(2, indices, acts)  # [n, L, latents], 0 where not in the top-k
    dense = torch.where(counted[..., None], dense, torch.zeros_like(dense))

    fires = (dense > 0).sum((0, 1))
    assert sorted(cards.cards) == torch.nonzero(fires).flatten().tolist()  # exactly the live latents
    assert cards.num_tokens == int(counted.sum())
    assert cards.live > 10
    for i, card in cards.cards.items():
        assert card.density == pytest.approx(int(fires[i]) / cards.num_tokens)
        assert card.mean_activation == pytest.approx(float(dense[..., i].sum() / fires[i]), rel=1e-4)
        assert 1 <= len(card.contexts) <= 4
        # The running top-N equals the brute-force top-N of this latent over the whole corpus.
        best = dense[..., i].flatten().topk(len(card.contexts)).values
        torch.testing.assert_close(torch.tensor([c.activation for c in card.contexts]), best, rtol=1e-5, atol=1e-6)
        for c in card.contexts:
            assert c.token_id == int(chunks[c.chunk, c.position])
            assert counted[c.chunk, c.position]
            assert c.activation == pytest.approx(float(dense[c.chunk, c.position, i]), rel=1e-5)
            assert c.text == f"{c.before}«{c.token}»{c.after}"
            assert c.before == tok.decode(chunks[c.chunk, max(0, c.position - 5) : c.position].tolist())
            assert c.after == tok.decode(chunks[c.chunk, c.position + 1 : c.position + 6].tolist())


def test_cards_round_trip_and_lookup(cards, tmp_path):
    folder = tmp_path / "sae" / f"layers.{LAYER}"
    path = save_cards(cards, folder)
    assert path == folder / "latents.json" and [p.name for p in folder.iterdir()] == ["latents.json"]
    loaded = load_cards(folder)
    assert loaded.to_dict() == cards.to_dict()
    assert LatentCards.from_dict(json.loads(path.read_text())).to_dict() == cards.to_dict()
    live = next(iter(cards.cards))
    assert loaded.card(live).contexts[0].text == cards.card(live).contexts[0].text
    dead = next((i for i in range(128) if i not in cards.cards), None)
    if dead is not None:
        assert loaded.card(dead).density == 0 and loaded.card(dead).contexts == []
    with pytest.raises(ValueError, match="out of range"):
        loaded.card(128)
    (folder / "latents.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a latent cards document"):
        load_cards(folder)
    with pytest.raises(FileNotFoundError):
        load_cards(tmp_path / "nowhere")


def test_latent_cards_refuse_bad_input(tiny_llama, sae, chunks):
    with pytest.raises(ValueError, match="LongTensor"):
        latent_cards(tiny_llama, sae, LAYER, chunks.float(), tiny_llama.tokenizer)
    with pytest.raises(ValueError, match="mask"):
        latent_cards(tiny_llama, sae, LAYER, chunks, tiny_llama.tokenizer, mask=torch.ones(2, 2, dtype=torch.bool))


# ---------------------------------------------------------------- layer report

MANIFEST = {
    "name": "arith",
    "layers": [0, 1, 3],
    "default_layer": 1,
    "d_in": 64,
    "metrics": {
        "0": {"fvu": 0.21, "dead_fraction": 0.05, "loss_recovered": 0.93, "steps": 100},
        "1": {"fvu": 0.18, "dead_fraction": 0.02, "loss_recovered": 0.95},
        "3": {"fvu": 0.30, "dead_fraction": 0.11},
    },
}


def test_layer_report_has_every_layer_and_renders(tmp_path):
    report = layer_report(MANIFEST, {0: 2, 1: 5, 3: 0})
    report = json.loads(json.dumps(report))  # JSON-able
    assert [r["layer"] for r in report["layers"]] == [0, 1, 3]
    assert report["layers"][1] == {"layer": 1, "fvu": 0.18, "dead_fraction": 0.02, "loss_recovered": 0.95, "reasoning_features": 5}
    assert report["layers"][2]["loss_recovered"] is None and report["layers"][2]["reasoning_features"] == 0

    png = render_report_png(report, tmp_path / "report.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 600 and height >= 600
    svg = render_report_svg(report, tmp_path / "report.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg

    with pytest.raises(ValueError, match="layer\\(s\\) \\[7\\]"):
        layer_report(MANIFEST, {7: 1})
    partial = layer_report(MANIFEST, {1: 4})
    assert [r["reasoning_features"] for r in partial["layers"]] == [None, 4, None]


# ---------------------------------------------------------------- resa inspect


@pytest.fixture
def committed_skill(resa_env, sae, cards, tmp_path):
    folder = tmp_path / "skill-src"
    sae.save_to_disk(folder / "sae" / f"layers.{LAYER}")
    save_cards(cards, folder / "sae" / f"layers.{LAYER}")
    manifest = {"name": "arith", "layers": [LAYER], "default_layer": LAYER, "d_in": 64, "source_model": "tiny-llama", "metrics": {}}
    resa_env.open_store().commit("skill", ("arith",), folder, manifest)
    return "arith"


def test_resa_inspect_end_to_end(committed_skill, tiny_llama, sae, cards, capsys):
    from app.cli import main

    assert main(["inspect", "--skill", committed_skill, "--model", "tiny-llama", "--top", "3", "--json", PROMPT]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = inspect_prompt(tiny_llama, sae, LAYER, PROMPT, top_n=3)
    assert out["layer"] == LAYER and len(out["tokens"]) == len(expected)
    for got, want in zip(out["tokens"], expected):
        assert got["token_id"] == want.token_id
        assert [lat["index"] for lat in got["latents"]] == [i for i, _ in want.latents]
        assert all(lat["density"] == cards.card(lat["index"]).density for lat in got["latents"])  # from latents.json

    assert main(["inspect", "--skill", committed_skill, "--model", "tiny-llama", PROMPT]) == 0
    table = capsys.readouterr().out
    assert f"layer {LAYER}" in table and "«" in table
    assert len([line for line in table.splitlines() if re.match(r"\s+\d+ '", line)]) == len(expected)


def test_resa_inspect_unknown_skill_is_one_line_error(resa_env, capsys):
    from app.cli import main

    assert main(["inspect", "--skill", "nope", "--model", "tiny-llama", PROMPT]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("resa inspect: error:") and "nope" in err and "\n" not in err


def test_resa_inspect_bad_layer_is_one_line_error(committed_skill, capsys):
    from app.cli import main

    assert main(["inspect", "--skill", committed_skill, "--model", "tiny-llama", "--layer", "3", PROMPT]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("resa inspect: error:") and "no SAE at layer 3" in err and "\n" not in err


@pytest.mark.slow
def test_reasoning_features_on_smollm2_cover_the_tag_tokens(smollm2):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    coder = SparseCoder(smollm2.hidden_size, SparseCoderConfig(expansion_factor=2, k=16)).eval().requires_grad_(False)
    rf = reasoning_features(smollm2, coder, 12)
    tags = "".join(rf.tokens[p] for p in rf.think_positions)
    assert tags.replace(" ", "") == "<think></think>" * 2  # SmolLM2 splits each tag into pieces; all of them, nothing else
    tokens = inspect_prompt(smollm2, coder, 12, PROMPT, top_n=4)
    assert "".join(t.token for t in tokens) == PROMPT and all(len(t.latents) == 4 for t in tokens)
