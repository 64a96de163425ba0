"""Stage I extraction with tiny real models: hookpoint, one-pass multi-layer SAEs, metrics,
checkpoint/resume, source adapters, bad input, and the `resa extract` CLI."""

from __future__ import annotations

import json

import pytest
import torch

from adapters_store import ArtifactConflict, ArtifactNotFound
from resa_engine.artifacts import Skill, sae_subdir
from resa_engine.data import DatasetError, special_token_mask, split_rows
from resa_engine.errors import AdapterMismatch, Cancelled, ModelError
from resa_engine.extract import ExtractConfig, extract_skill
from resa_engine.extract.train import heldout_dataset
from resa_engine.lora.merge import apply_source_adapter
from resa_engine.lora.peft_io import adapter_sha256
from resa_engine.models import load_model
from resa_engine.sae.hooks import run_until

from conftest import arithmetic_rows, write_jsonl
from app.tasks import staging_for

TINY = dict(num_latents=128, k=8, chunk_len=32, batch_size=4, max_tokens=4096, heldout_max_tokens=512, checkpoint_every=0)
TINY_PARAMS = {"sae": {"num_latents": 128, "k": 8}, "train": {"chunk_len": 32, "batch_size": 4, "max_tokens": 2048, "heldout_max_tokens": 256}}


def tiny_cfg(layers, **kw) -> ExtractConfig:
    return ExtractConfig(layers=layers, **{**TINY, **kw})


@pytest.fixture(scope="module")
def split(qa_rows):
    return split_rows(qa_rows, 0.1, seed=0)


@pytest.fixture(scope="module")
def multi(tiny_llama, split, tmp_path_factory):
    """Layers 0-2 in one run, counting how often each block and the whole model run."""
    calls = {"model": 0, "block0": 0, "block3": 0}

    def counter(key):
        def hook(*_):
            calls[key] += 1

        return hook

    handles = [
        tiny_llama.model.register_forward_pre_hook(counter("model")),
        tiny_llama.layers[0].register_forward_pre_hook(counter("block0")),
        tiny_llama.layers[3].register_forward_pre_hook(counter("block3")),
    ]
    try:
        # cards off: their partial forwards would blur the pass counts below
        result = extract_skill(tiny_llama, *split, tiny_cfg([2, 0, 1], cards=False), tmp_path_factory.mktemp("multi"), name="multi")
    finally:
        for h in handles:
            h.remove()
    return result, calls


def test_hookpoint_is_block_output_hidden_states_plus_one(tiny_llama, qa_rows):
    ids = tiny_llama.tokenizer([r.question for r in qa_rows[:3]], return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        hidden = tiny_llama.model(input_ids=ids, output_hidden_states=True).hidden_states
        captured = run_until(tiny_llama.model, ids, tiny_llama.layers, [0, 2])
    assert set(captured) == {0, 2}
    for i in (0, 2):
        torch.testing.assert_close(captured[i], hidden[i + 1])


def test_multi_layer_gives_one_sae_per_layer_from_one_pass(multi):
    result, calls = multi
    assert result.layers == [0, 1, 2]
    for i in (0, 1, 2):
        assert (result.out_dir / sae_subdir(i) / "cfg.json").is_file()
        assert (result.out_dir / sae_subdir(i) / "sae.safetensors").is_file()
    # Training forwards stop after block 2, so block 3 runs only while scoring held-out text:
    # the difference is the training forwards, one per step for all three layers together.
    assert calls["block0"] - calls["block3"] == result.steps
    assert calls["model"] == calls["block0"]
    assert result.tokens_seen == result.steps * 4 * 32 == 4096


def test_manifest_has_the_contract_keys(multi, split):
    result, _ = multi
    m = result.manifest
    assert {"name", "source", "layers", "default_layer", "d_in", "sae", "train", "seed", "dataset", "metrics", "tokens_seen", "wall_s", "versions"} <= set(m)
    assert m["sae"] == {"num_latents": 128, "k": 8, "expansion_factor": 2, "activation": "topk", "normalize_decoder": True}
    assert m["train"]["lr"] == pytest.approx(5e-3 / (128 / 2**14) ** 0.5)
    assert m["train"]["optimizer"] == "signum" and m["train"]["chunk_len"] == 32 and m["train"]["heldout_fraction"] == 0.1
    assert m["dataset"]["train_rows"] == len(split[0]) and m["dataset"]["heldout_rows"] == len(split[1]) == 20
    assert set(m["versions"]) == {"torch", "transformers", "peft", "sparsify", "resa"}
    assert m["d_in"] == 64 and m["source"]["adapter"] is None
    for i in ("0", "1", "2"):
        metrics = m["metrics"][i]
        assert 0 < metrics["fvu"] < 1.5 and metrics["explained_variance"] == pytest.approx(1 - metrics["fvu"])
        assert 0 < metrics["l0"] <= 8
        assert 0 <= metrics["dead_fraction"] < 1
        assert metrics["kl"] >= 0 and metrics["heldout_tokens"] > 0  # (a random tiny model: no loss ordering to expect)
        expected = (metrics["loss_zero"] - metrics["loss_spliced"]) / (metrics["loss_zero"] - metrics["loss_clean"])
        assert metrics["loss_recovered"] == pytest.approx(expected)
    json.dumps(m, allow_nan=False)  # strict JSON
    assert json.loads((result.out_dir / "manifest.json").read_text()) == m


def test_default_layer_is_best_loss_recovered(multi, tiny_llama, split, tmp_path):
    result, _ = multi
    recovered = {int(i): v["loss_recovered"] for i, v in result.metrics.items()}
    assert result.default_layer == max(recovered, key=recovered.get)
    chosen = extract_skill(tiny_llama, *split, tiny_cfg([0, 1], default_layer=0, max_tokens=512), tmp_path)
    assert chosen.default_layer == 0 and chosen.manifest["default_layer"] == 0


def test_saved_sae_loads_with_sparsify_and_reproduces_heldout_fvu(multi, tiny_llama, split):
    from sparsify import SparseCoder

    result, _ = multi
    layer = 1
    sae = SparseCoder.load_from_disk(result.out_dir / sae_subdir(layer))
    assert (sae.d_in, sae.num_latents, sae.cfg.k) == (64, 128, 8)
    data = heldout_dataset(split[1], tiny_llama.tokenizer, tiny_cfg([layer]))
    ids = data.chunks
    with torch.no_grad():
        hidden = tiny_llama.model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]
    not_special = ~special_token_mask(ids, tiny_llama.tokenizer)
    content = not_special.clone()
    content[:, 0] = False  # a chunk's first position (the attention sink) is reported apart
    for mask, key in ((content, "fvu"), (not_special, "fvu_all")):
        x = hidden[mask].double()
        with torch.no_grad():
            top_acts, top_idx, _ = sae.encode(x.float())
            recon = sae.decode(top_acts, top_idx).double()
        fvu = float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        assert fvu == pytest.approx(result.metrics[str(layer)][key], rel=1e-4)
    skill = Skill("multi", result.manifest, result.out_dir)
    assert torch.equal(skill.sae(layer).W_dec, sae.W_dec)


@pytest.mark.parametrize("optimizer", ["signum", "adam"])
def test_cancel_then_resume_finishes_like_an_uninterrupted_run(tiny_llama, split, tmp_path, optimizer):
    cfg = tiny_cfg([1, 2], optimizer=optimizer, max_tokens=1536, checkpoint_every=3)
    full = extract_skill(tiny_llama, *split, cfg, tmp_path / "full")

    polls = {"n": 0}

    def stop_after_seven_steps():
        polls["n"] += 1
        return polls["n"] > 5  # the first poll is before step 1

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Cancelled):
        extract_skill(tiny_llama, *split, cfg, tmp_path / "part", should_stop=stop_after_seven_steps, checkpoint_dir=ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["train_state"]["step"] == 5
    assert not (tmp_path / "part" / "sae").exists()
    assert all(p.suffix in (".json", ".safetensors") for p in ckpt.iterdir())

    resumed = extract_skill(tiny_llama, *split, cfg, tmp_path / "part", checkpoint_dir=ckpt)
    assert resumed.resumed_tokens == 5 * 4 * 32
    assert resumed.tokens_seen == full.tokens_seen == 1536
    from safetensors.torch import load_file

    for layer in (1, 2):
        w_full = load_file(str(full.out_dir / sae_subdir(layer) / "sae.safetensors"))
        w_res = load_file(str(resumed.out_dir / sae_subdir(layer) / "sae.safetensors"))
        for key in w_full:
            torch.testing.assert_close(w_res[key], w_full[key])
    assert resumed.metrics["1"]["fvu"] == pytest.approx(full.metrics["1"]["fvu"], rel=1e-5)
    assert resumed.metrics["1"]["dead_fraction"] == full.metrics["1"]["dead_fraction"]


def test_cancel_before_the_first_step_resumes_to_the_same_saes(tiny_llama, split, tmp_path):
    cfg = tiny_cfg([1], max_tokens=512)
    full = extract_skill(tiny_llama, *split, cfg, tmp_path / "full")
    with pytest.raises(Cancelled):
        extract_skill(tiny_llama, *split, cfg, tmp_path / "part", should_stop=lambda: True, checkpoint_dir=tmp_path / "ckpt")
    resumed = extract_skill(tiny_llama, *split, cfg, tmp_path / "part", checkpoint_dir=tmp_path / "ckpt")
    assert resumed.tokens_seen == full.tokens_seen == 512
    assert resumed.metrics["1"]["fvu"] == pytest.approx(full.metrics["1"]["fvu"], rel=1e-5)


def test_checkpoint_of_another_config_is_not_resumed(tiny_llama, split, tmp_path):
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Cancelled):
        extract_skill(tiny_llama, *split, tiny_cfg([1], max_tokens=1024), tmp_path / "a", should_stop=lambda: True, checkpoint_dir=ckpt)
    other = extract_skill(tiny_llama, *split, tiny_cfg([1], max_tokens=1024, seed=5), tmp_path / "b", checkpoint_dir=ckpt)
    assert other.resumed_tokens == 0 and other.tokens_seen == 1024


def test_init_from_fine_tunes_an_existing_skill(multi, tiny_llama, split, tmp_path):
    result, _ = multi
    # a vanishing learning rate keeps the loaded SAE: the held-out FVU stays the original one
    # (up to the per-step decoder re-normalisation of schedule-free averaged weights)
    tuned = extract_skill(tiny_llama, *split, tiny_cfg([1], max_tokens=512, lr=1e-9, init_from=result.out_dir), tmp_path)
    assert tuned.manifest["train"]["init_from_sha256"] and tuned.manifest["sae"]["num_latents"] == 128
    assert tuned.metrics["1"]["fvu"] == pytest.approx(result.metrics["1"]["fvu"], rel=2e-2)


# ---------------------------------------------------------------- source adapters


def _make_lora(model, out, seed=0):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lora_dir(registry, session_cache_dir, tmp_path_factory):
    own = load_model(registry.get("tiny-llama"), device="cpu", cache_dir=session_cache_dir)
    return _make_lora(own, tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def qwen_lora_dir(registry, session_cache_dir, tmp_path_factory):
    own = load_model(registry.get("tiny-qwen"), device="cpu", cache_dir=session_cache_dir)
    return _make_lora(own, tmp_path_factory.mktemp("qwen-lora"))


def test_source_adapter_is_merged_and_recorded(registry, session_cache_dir, lora_dir, tiny_llama):
    from peft import PeftModel

    fresh = load_model(registry.get("tiny-llama"), device="cpu", cache_dir=session_cache_dir)
    ids = torch.arange(5, 25).view(1, -1)
    reference = load_model(registry.get("tiny-llama"), device="cpu", cache_dir=session_cache_dir)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(reference.model, str(lora_dir)).eval()(input_ids=ids).logits
        base = tiny_llama.model(input_ids=ids).logits
    merged = apply_source_adapter(fresh, lora_dir, name="rl-lora")
    with torch.no_grad():
        got = merged.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, base)
    assert merged.extra["adapter"] == "rl-lora" and merged.extra["adapter_sha256"] == adapter_sha256(lora_dir)
    assert type(merged.model).__name__ == "LlamaForCausalLM"  # unloaded: a plain transformers model


def test_adapter_for_another_base_model_is_a_clear_error(registry, session_cache_dir, qwen_lora_dir):
    fresh = load_model(registry.get("tiny-llama"), device="cpu", cache_dir=session_cache_dir)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(AdapterMismatch, match="does not fit .*shape"):
        apply_source_adapter(fresh, qwen_lora_dir)
    assert all(torch.equal(before[k], v) for k, v in fresh.model.state_dict().items())


# ---------------------------------------------------------------- the task: store, staging, bad input


def _ctx(settings, **kw):
    from app.tasks import TaskContext

    return TaskContext.from_settings(settings, **kw)


def _params(ctx, rows=None, **over):
    from resa_engine.data import rows_to_jsonl

    rows = rows or arithmetic_rows(120, seed=3)
    info = ctx.store.put_dataset(rows_to_jsonl(rows), len(rows))
    return {"name": "arith", "source": {"model": "tiny-llama"}, "layers": [1], "dataset": info.sha256, **TINY_PARAMS, **over}


def _nothing_written(ctx, name="arith"):
    assert ctx.store.list("skill") == [] or all(m["key"] != [name] for m in ctx.store.list("skill"))
    assert not (ctx.staging.path("skill", name)).exists()


def test_run_extract_commits_a_skill_with_a_stored_source_adapter(resa_env, lora_dir):
    from app.tasks.extract import run_extract

    ctx = _ctx(resa_env)
    ctx.store.commit("adapter", ("tiny-llama", "rl"), lora_dir, {"target": "tiny-llama"})
    params = _params(ctx, source={"model": "tiny-llama", "adapter": "rl"}, layers=[1, 2])
    out = run_extract(params, ctx)
    assert out["skill"] == "arith"
    manifest = ctx.store.manifest("skill", ("arith",))
    assert manifest["source"] == {
        "model": "tiny-llama",
        "sha256": manifest["source"]["sha256"],
        "adapter": "rl",
        "adapter_sha256": adapter_sha256(lora_dir),
    }
    assert manifest["dataset"]["sha256"] == params["dataset"]
    saes_and_cards = {f"sae/layers.{i}/{f}" for i in (1, 2) for f in ("cfg.json", "sae.safetensors", "latents.json")}
    assert saes_and_cards | {"report.json", "report.png"} == set(manifest["files"])
    folder = ctx.store.fetch("skill", ("arith",))
    skill = Skill("arith", manifest, folder)
    assert skill.sae(2).num_latents == 128
    assert not staging_for(resa_env).path("skill", "arith").exists()


def test_existing_name_conflicts_before_any_work(resa_env, tmp_path):
    from app.tasks.extract import run_extract

    ctx = _ctx(resa_env)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("x")
    ctx.store.commit("skill", ("arith",), tmp_path / "a", {"layers": [1]})
    # a model that does not exist proves the conflict is found before loading anything
    with pytest.raises(ArtifactConflict, match="already exists"):
        run_extract(_params(ctx, source={"model": "no-such-model"}), ctx)
    assert ctx.store.manifest("skill", ("arith",))["layers"] == [1]


@pytest.mark.parametrize(
    "over,error,match",
    [
        ({"layers": [4]}, ModelError, "out of range"),
        ({"layers": [1], "train": {**TINY_PARAMS["train"], "batch_size": 500}}, DatasetError, "too small for one batch"),
        ({"train": {"chunk_len": 32, "bogus": 1}}, ValueError, "unknown train option"),
        ({"source": {"model": "tiny-llama", "adapter": "missing"}}, ArtifactNotFound, "not found"),
        ({"default_layer": 3}, ValueError, "default_layer 3 is not one of"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(resa_env, over, error, match):
    from app.tasks.extract import run_extract

    ctx = _ctx(resa_env)
    with pytest.raises(error, match=match):
        run_extract(_params(ctx, **over), ctx)
    _nothing_written(ctx)


def test_init_from_sae_of_another_width_is_refused(resa_env, tmp_path):
    from sparsify import SparseCoder, SparseCoderConfig

    from app.tasks.extract import run_extract

    SparseCoder(96, SparseCoderConfig(num_latents=128, k=8)).save_to_disk(tmp_path / "wide")
    ctx = _ctx(resa_env, allow_paths=True)
    with pytest.raises(ModelError, match="width 96.*hidden size 64"):
        run_extract(_params(ctx, init_from=str(tmp_path / "wide")), ctx)
    _nothing_written(ctx)


def test_local_adapter_for_another_model_is_refused(resa_env, qwen_lora_dir):
    from app.tasks.extract import run_extract

    ctx = _ctx(resa_env, allow_paths=True)
    with pytest.raises(AdapterMismatch, match="does not fit tiny-llama"):
        run_extract(_params(ctx, source={"model": "tiny-llama", "adapter": str(qwen_lora_dir)}), ctx)
    _nothing_written(ctx)


def test_local_paths_are_refused_without_allow_paths(resa_env, lora_dir):
    from adapters_store import InvalidName

    from app.tasks.extract import run_extract

    ctx = _ctx(resa_env)
    with pytest.raises(InvalidName):
        run_extract(_params(ctx, source={"model": "tiny-llama", "adapter": str(lora_dir)}), ctx)
    _nothing_written(ctx)


# ---------------------------------------------------------------- CLI


def test_cli_extract_end_to_end(resa_env, tiny_llama_dir, tmp_path, capsys):
    from adapters_store import ArtifactStore
    from app.cli import main
    from sparsify import SparseCoder

    data = write_jsonl(tmp_path / "qa.jsonl", arithmetic_rows(120, seed=4))
    argv = ["extract", "--source", str(tiny_llama_dir), "--layer", "1", "--layer", "2", "--data", str(data), "--name", "cli-skill",
            "--latents", "128", "--k", "8", "--chunk-len", "32", "--batch-size", "4", "--max-tokens", "1024", "--seed", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "LAYER" in out and "skill cli-skill" in out
    store = ArtifactStore(resa_env.store_url, cache_dir=resa_env.cache_dir)
    manifest = store.manifest("skill", ("cli-skill",))
    assert manifest["layers"] == [1, 2] and manifest["seed"] == 1 and manifest["source"]["model"] == str(tiny_llama_dir)
    assert SparseCoder.load_from_disk(store.fetch("skill", ("cli-skill",)) / "sae/layers.2").num_latents == 128
    assert len(store.list_datasets()) == 1
    # the same name again is refused with one line, exit 2
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("resa extract: error:") and "already exists" in err and "\n" not in err


def test_cli_malformed_dataset_exits_2_and_writes_nothing(resa_env, tiny_llama_dir, tmp_path, capsys):
    from adapters_store import ArtifactStore
    from app.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "no answer"}\nnot json\n')
    code = main(["extract", "--source", str(tiny_llama_dir), "--layer", "1", "--data", str(bad), "--name", "bad-skill"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("resa extract: error:") and "line 2" in err and "\n" not in err
    store = ArtifactStore(resa_env.store_url, cache_dir=resa_env.cache_dir)
    assert store.list("skill") == [] and store.list_datasets() == []


def test_cli_failed_run_removes_the_dataset_it_stored(resa_env, tiny_llama_dir, tmp_path, capsys):
    from adapters_store import ArtifactStore
    from app.cli import main

    data = write_jsonl(tmp_path / "qa.jsonl", arithmetic_rows(50, seed=5))
    code = main(["extract", "--source", str(tiny_llama_dir), "--layer", "9", "--data", str(data), "--name", "x", "--chunk-len", "32"])
    assert code == 2 and "out of range" in capsys.readouterr().err
    store = ArtifactStore(resa_env.store_url, cache_dir=resa_env.cache_dir)
    assert store.list("skill") == [] and store.list_datasets() == []


@pytest.mark.slow
def test_smollm2_skill_reconstructs_and_splices_well(smollm2, tmp_path):
    rows = arithmetic_rows(240, seed=6)
    cfg = ExtractConfig(layers=[6], num_latents=1152, chunk_len=128, batch_size=2, max_tokens=2048, heldout_max_tokens=256)
    result = extract_skill(smollm2, rows[:220], rows[220:], cfg, tmp_path)
    m = result.metrics["6"]
    assert m["fvu"] < 0.5 and m["l0"] == pytest.approx(32, abs=1)
    # a real model: zero-ablating the residual stream is far worse than splicing the SAE in
    assert m["loss_clean"] < m["loss_spliced"] < m["loss_zero"] and m["loss_recovered"] > 0.5


def test_extraction_writes_latent_cards_reasoning_counts_and_a_layer_report(resa_env, tiny_llama_dir, tiny_llama, tmp_path, capsys):
    """Two layers through `resa extract`: cards per layer over held-out text, reasoning features in
    the metrics, report.json/report.png committed with the skill and its path printed."""
    from adapters_store import ArtifactStore
    from app.cli import main
    from resa_engine.transparency.cards import load_cards
    from resa_engine.transparency.reasoning import reasoning_features

    data = write_jsonl(tmp_path / "qa.jsonl", arithmetic_rows(120, seed=6))
    argv = ["extract", "--source", str(tiny_llama_dir), "--layer", "1", "--layer", "2", "--data", str(data), "--name", "cards",
            "--latents", "128", "--k", "8", "--chunk-len", "32", "--batch-size", "4", "--max-tokens", "1024"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    store = ArtifactStore(resa_env.store_url, cache_dir=resa_env.cache_dir)
    folder = store.fetch("skill", ("cards",))
    manifest = store.manifest("skill", ("cards",))
    assert f"layer report: {folder / 'report.png'}" in out
    assert {"report.json", "report.png", "sae/layers.1/latents.json", "sae/layers.2/latents.json"} <= set(manifest["files"])
    assert manifest["train"]["cards"] is True
    model = tiny_llama  # the same weights as tiny_llama_dir
    skill = Skill("cards", manifest, folder)
    tok = model.tokenizer
    for layer in (1, 2):
        m = manifest["metrics"][str(layer)]
        found = reasoning_features(model, skill.sae(layer), layer)
        assert m["reasoning_features"] == found.count == len(m["reasoning_latents"]) and m["reasoning_latents"] == found.latents
        cards = load_cards(folder / sae_subdir(layer))
        assert cards.layer == layer and cards.num_latents == 128 and cards.live > 0
        assert cards.num_tokens <= manifest["dataset"]["heldout_chunks"] * manifest["dataset"]["heldout_chunk_len"]
        contexts = [c for card in cards.cards.values() for c in card.contexts]
        assert contexts and all(c.position > 0 for c in contexts)  # the attention-sink position never counts
        assert all(c.token_id not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) for c in contexts)
    report = json.loads((folder / "report.json").read_text())
    assert [(r["layer"], r["reasoning_features"], r["fvu"]) for r in report["layers"]] == [
        (i, manifest["metrics"][str(i)]["reasoning_features"], manifest["metrics"][str(i)]["fvu"]) for i in (1, 2)
    ]
    assert (folder / "report.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # cards off: no cards, no counts, no report
    assert main([*argv[:-10], "--name", "nocards", *argv[-8:], "--no-cards"]) == 0
    bare = store.manifest("skill", ("nocards",))
    assert not any(f.endswith("latents.json") or f.startswith("report.") for f in bare["files"])
    assert "reasoning_features" not in bare["metrics"]["1"] and bare["train"]["cards"] is False


def test_default_chunk_len_is_2048_capped_at_the_context_and_a_longer_one_is_refused():
    assert ExtractConfig(layers=[1]).check_model("long", 4, 8192).chunk_len == 2048
    assert ExtractConfig(layers=[1]).check_model("short", 4, 512).chunk_len == 512
    assert ExtractConfig(layers=[1], chunk_len=256).check_model("short", 4, 512).chunk_len == 256
    with pytest.raises(ModelError, match="chunk_len 4096 exceeds short's context of 512 tokens"):
        ExtractConfig(layers=[1], chunk_len=4096).check_model("short", 4, 512)
    with pytest.raises(ModelError, match=r"layer\(s\) \[4\] out of range"):
        ExtractConfig(layers=[4]).check_model("short", 4, 512)
