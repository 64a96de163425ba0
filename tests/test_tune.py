"""Stage II, SAE-guided tuning, on tiny real models with real sparsify SAEs and a real store.

Tests use lr 1e-4 (the authors' 1e-6 would move a 64-wide model too little to measure in 30 steps).
"""

from __future__ import annotations

import json

import pytest
import torch
from _helpers_tune import lora_b_by_layer, make_skill
from conftest import arithmetic_rows, write_jsonl

from resa_engine.errors import AdapterMismatch, Cancelled, ModelError
from resa_engine.lora.peft_io import PeftAdapter, check_compat
from resa_engine.models import load_model
from resa_engine.tune import DEFAULT_TARGET_MODULES, LoraSettings, SpliceObjective, TuneConfig, add_lora, remove_lora, tune_adapter
from app.tasks import staging_for

ROWS = arithmetic_rows(40, seed=3)
FAST = dict(lr=1e-4, chunk_len=64)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def skill_store(tmp_path_factory, session_cache_dir):
    from adapters_store import ArtifactStore

    root = tmp_path_factory.mktemp("tune-store")
    return ArtifactStore(f"file://{root / 'store'}", cache_dir=session_cache_dir), root


@pytest.fixture(scope="module")
def skill(skill_store):
    store, root = skill_store
    return make_skill(store, "arith", root / "arith", layers=(1, 2), rows=ROWS)


@pytest.fixture(scope="module")
def llama(registry, session_cache_dir):
    """Our own tiny-llama (tuning wraps it in LoRA for the duration)."""
    return load_model(registry.get("tiny-llama"), device="cpu", cache_dir=session_cache_dir)


@pytest.fixture(scope="module")
def faithful(llama, skill, tmp_path_factory):
    """One faithful-default KL run (splice after block 1, no gradient through it)."""
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = llama.model(x).logits.clone()
    events = []
    out = tmp_path_factory.mktemp("faithful") / "adapter"
    result = tune_adapter(llama, skill, ROWS, TuneConfig(max_steps=30, layer=1, **FAST), out, progress=events.append)
    with torch.no_grad():
        after = llama.model(x).logits
    return result, events, before, after


def test_kl_falls_during_tuning(faithful):
    result, events, _, _ = faithful
    assert result.steps == 30 and len(result.losses) == 30
    assert result.kl_end < 0.9 * result.kl_start, (result.kl_start, result.kl_end)
    assert events and events[-1].stage == "tune" and events[-1].step == 30 and events[-1].total == 30
    assert {"loss", "kl", "recon_mse"} <= set(events[-1].metrics)
    assert events[-1].metrics["recon_mse"] > 0


def test_faithful_default_trains_only_adapters_after_the_splice(faithful):
    result, *_ = faithful
    b = lora_b_by_layer(result.out_dir)
    assert set(b) == {0, 1, 2, 3}
    assert b[0] == 0.0 and b[1] == 0.0  # no gradient reaches blocks <= 1 through the no-grad splice
    assert b[2] > 0 and b[3] > 0


def test_adapter_folder_is_plain_peft_with_manifest(faithful, skill, llama):
    result, *_ = faithful
    assert sorted(p.name for p in result.out_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    config = json.loads((result.out_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (32, 128, 0.05)
    assert set(config["target_modules"]) == set(DEFAULT_TARGET_MODULES)
    m = result.manifest
    assert m == json.loads((result.out_dir / "manifest.json").read_text())
    assert m["skill"] == "arith" and m["target"] == {"model": "tiny-llama", "sha256": llama.sha256}
    assert (m["layer"], m["objective"], m["splice_grad"], m["seed"]) == (1, "kl", False, 0)
    assert m["lora"] == {"r": 32, "alpha": 128, "dropout": 0.05, "target_modules": list(DEFAULT_TARGET_MODULES)}
    assert m["train"]["steps"] == 30 and m["train"]["lr"] == 1e-4 and m["train"]["chunk_len"] == 64
    assert m["train"]["epochs"] == 2 and m["train"]["batch_size"] == 1 and m["train"]["grad_clip"] == 1.0
    assert m["dataset"]["rows"] == len(ROWS) and m["dataset"]["sha256"] == skill.manifest["dataset"]["sha256"]
    assert m["kl_start"] == result.kl_start and m["kl_end"] == result.kl_end and m["wall_s"] > 0
    assert {"torch", "transformers", "peft", "sparsify", "resa"} <= set(m["versions"])


def test_tuning_leaves_the_target_model_untouched(faithful, llama):
    from peft import PeftModel

    _, _, before, after = faithful
    assert not isinstance(llama.model, PeftModel)
    assert not any("lora" in n for n, _ in llama.model.named_modules())
    assert torch.equal(before, after)
    assert not any(p.requires_grad for p in llama.model.parameters())


def test_splice_grad_trains_every_adapter(llama, skill, tmp_path):
    result = tune_adapter(llama, skill, ROWS, TuneConfig(max_steps=4, layer=1, splice_grad=True, **FAST), tmp_path / "a")
    b = lora_b_by_layer(result.out_dir)
    assert all(b[i] > 0 for i in range(4)), b
    assert result.manifest["splice_grad"] is True


def test_ce_objective_is_sft_with_the_splice_in(llama, skill, tmp_path):
    result = tune_adapter(llama, skill, ROWS, TuneConfig(max_steps=4, objective="ce", layer=2, **FAST), tmp_path / "a")
    b = lora_b_by_layer(result.out_dir)
    assert b[0] == b[1] == b[2] == 0.0 and b[3] > 0  # splice after block 2: only block 3 learns
    # next-token cross-entropy over a 380-token vocabulary starts near ln(380) for a random model
    assert 4.0 < result.losses[0] < 7.0
    assert result.manifest["objective"] == "ce" and result.manifest["layer"] == 2


def test_prefix_reuse_computes_the_same_loss_and_gradients_as_the_hook_splice(llama, skill):
    sae = skill.sae(1)
    peft_model = add_lora(llama, LoraSettings(dropout=0.0), seed=0)
    try:
        with torch.no_grad():  # a trained-looking adapter after the splice, zero before it (as the faithful default keeps it)
            for name, p in peft_model.named_parameters():
                if "lora_B" in name and int(name.split(".layers.")[1].split(".")[0]) > 1:
                    p.normal_(0, 0.05)
        ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
        results = []
        for reuse in (True, False):
            obj = SpliceObjective(peft_model, sae, 1)
            obj.reuse_prefix = reuse
            peft_model.zero_grad(set_to_none=True)
            out = obj(ids)
            out.loss.backward()
            grad = next(p.grad.clone() for n, p in peft_model.named_parameters() if "layers.3.mlp.down_proj.lora_B" in n)
            results.append((float(out.loss.detach()), out.recon_mse, grad))
        (l1, m1, g1), (l2, m2, g2) = results
        assert l1 > 0 and l1 == pytest.approx(l2, rel=1e-5) and m1 == pytest.approx(m2, rel=1e-5)
        assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-7) and g1.abs().max() > 0
    finally:
        remove_lora(llama, peft_model)


def test_plain_peft_load_gives_the_same_tokens_as_the_engine(faithful, tiny_llama_dir):
    from _helpers_serving import load_private, reference_greedy
    from resa_engine.engine import open_native
    from resa_engine.sampling import SamplingParams

    result, *_ = faithful
    prompt, n = [5, 6, 7, 8, 9, 10, 11], 12
    engine = open_native(load_private(tiny_llama_dir), {"skill": result.out_dir}.__getitem__).start()
    try:
        ours = engine.submit(prompt, SamplingParams(max_tokens=n), "skill", ignore_eos=True).result(60).token_ids
        base = engine.submit(prompt, SamplingParams(max_tokens=n), ignore_eos=True).result(60).token_ids
    finally:
        engine.stop()
    assert ours == reference_greedy(tiny_llama_dir, result.out_dir, prompt, n)  # PeftModel.from_pretrained, unchanged folder
    assert base == reference_greedy(tiny_llama_dir, None, prompt, n)  # a base request beside it is untouched


def test_cross_model_attach_between_same_shapes_and_refusal_otherwise(faithful, llama, registry, session_cache_dir):
    result, *_ = faithful
    same = check_compat(result.out_dir, llama)
    assert same.ok and not same.cross_model
    other = load_model(registry.get("tiny-llama-b"), device="cpu", cache_dir=session_cache_dir)
    compat = check_compat(result.out_dir, other)
    assert compat.ok and compat.cross_model and other.sha256 != llama.sha256
    assert PeftAdapter.read(result.out_dir).check(other) is True  # what serving reports as a cross-model attach

    qwen = load_model(registry.get("tiny-qwen"), device="cpu", cache_dir=session_cache_dir)
    refused = check_compat(result.out_dir, qwen)
    assert not refused.ok
    assert "model.layers.0." in refused.reason and "64" in refused.reason and "96" in refused.reason
    with pytest.raises(AdapterMismatch, match="does not fit model tiny-qwen"):
        PeftAdapter.read(result.out_dir).check(qwen)


def test_refuses_sae_width_mismatch_and_missing_layers(llama, skill_store, skill, tmp_path):
    store, root = skill_store
    wide = make_skill(store, "wide", root / "wide", d_in=96, layers=(1,), rows=ROWS)
    with pytest.raises(ModelError, match="width 96 does not match tiny-llama hidden size 64"):
        tune_adapter(llama, wide, ROWS, TuneConfig(max_steps=1, **FAST), tmp_path / "a")
    deep = make_skill(store, "deep", root / "deep", layers=(7,), rows=ROWS)
    with pytest.raises(ModelError, match="layer 7 is out of range"):
        tune_adapter(llama, deep, ROWS, TuneConfig(max_steps=1, **FAST), tmp_path / "b")
    with pytest.raises(ModelError, match="no SAE at layer 3"):
        tune_adapter(llama, skill, ROWS, TuneConfig(max_steps=1, layer=3, **FAST), tmp_path / "c")
    with pytest.raises(ValueError, match="objective"):
        tune_adapter(llama, skill, ROWS, TuneConfig(objective="mse"), tmp_path / "d")
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


def test_cancel_then_resume_ends_with_the_uninterrupted_weights(llama, skill, tmp_path):
    from safetensors.torch import load_file

    cfg = TuneConfig(max_steps=6, layer=1, checkpoint_every=2, **FAST)
    straight = tune_adapter(llama, skill, ROWS, cfg, tmp_path / "straight")

    polls = []
    ckpt = tmp_path / "ckpt"

    def stop_after_three() -> bool:
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(Cancelled):
        tune_adapter(llama, skill, ROWS, cfg, tmp_path / "resumed", should_stop=stop_after_three, checkpoint_dir=ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 3
    assert sorted(p.suffix for p in ckpt.iterdir()) == [".json", ".safetensors"]  # the one checkpoint format
    assert not (tmp_path / "resumed").exists()

    resumed = tune_adapter(llama, skill, ROWS, cfg, tmp_path / "resumed", checkpoint_dir=ckpt)
    assert resumed.resumed_from == 3 and resumed.steps == 6
    assert resumed.losses == straight.losses and resumed.kl_start == straight.kl_start
    a = load_file(str(straight.out_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.out_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not ckpt.exists()  # nothing left to resume once the adapter is written


def test_a_checkpoint_of_other_settings_is_not_resumed(llama, skill, tmp_path):
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Cancelled):
        tune_adapter(llama, skill, ROWS, TuneConfig(max_steps=4, **FAST), tmp_path / "a", should_stop=lambda: True, checkpoint_dir=ckpt)
    other = tune_adapter(llama, skill, ROWS, TuneConfig(max_steps=2, seed=5, **FAST), tmp_path / "a", checkpoint_dir=ckpt)
    assert other.resumed_from == 0 and other.steps == 2


# ---------------------------------------------------------------- task and CLI


def test_cli_tune_end_to_end_commits_a_loadable_adapter(resa_env, store, registry, session_cache_dir, tmp_path, capsys):
    from peft import PeftModel

    from app.cli import main

    make_skill(store, "arith", tmp_path / "skill", rows=ROWS)
    args = ["tune", "--skill", "arith", "--target", "tiny-llama", "--lr", "1e-4", "--max-steps", "3", "--chunk-len", "64", "--lora-r", "8"]
    assert main(args + ["--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    m = store.manifest("adapter", ("tiny-llama", "arith"))
    assert printed["files"] == m["files"] and set(m["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert m["lora"]["r"] == 8 and m["train"]["steps"] == 3 and m["target"]["model"] == "tiny-llama"
    folder = store.fetch("adapter", ("tiny-llama", "arith"))
    base = load_model(registry.get("tiny-llama"), device="cpu", cache_dir=session_cache_dir)
    PeftModel.from_pretrained(base.model, str(folder))  # loads unchanged
    assert not staging_for(resa_env).path("adapter", "tiny-llama", "arith").exists()

    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--replace", "--objective", "ce"]) == 0
    assert store.manifest("adapter", ("tiny-llama", "arith"))["objective"] == "ce"
    assert "STEPS" in capsys.readouterr().out


def test_cli_tune_bad_input_exits_2_and_writes_nothing(resa_env, store, tmp_path, capsys):
    from app.cli import main

    make_skill(store, "arith", tmp_path / "skill", rows=ROWS)
    datasets = store.list_datasets()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "no answer"}\nnot json\n')
    base = ["tune", "--skill", "arith", "--target", "tiny-llama-b", "--max-steps", "1", "--chunk-len", "64"]
    cases = [
        (base + ["--data", str(bad)], "line 2"),
        (base + ["--data", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["tune", "--skill", "nope", "--target", "tiny-llama-b"], "not found"),
        (["tune", "--skill", "arith", "--target", "no-such-model"], "unknown model"),
        (["tune", "--skill", "arith", "--target", "tiny-qwen", "--chunk-len", "64"], "does not match"),
        (base + ["--lr", "-1"], "lr must be positive"),
        (base + ["--layer", "3"], "no SAE at layer 3"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after any weight-loading bar
        assert err.startswith("resa tune: error:") and message in err, err
    assert store.list("adapter") == []
    assert store.list_datasets() == datasets


def test_cli_tune_with_its_own_data_file(resa_env, store, tmp_path, capsys):
    from app.cli import main

    make_skill(store, "arith", tmp_path / "skill", rows=ROWS)
    data = write_jsonl(tmp_path / "more.jsonl", arithmetic_rows(30, seed=9))
    argv = ["tune", "--skill", "arith", "--target", "tiny-llama-b", "--data", str(data), "--max-steps", "2", "--chunk-len", "64", "--json"]
    assert main(argv) == 0
    m = store.manifest("adapter", ("tiny-llama-b", "arith"))
    assert m["dataset"]["rows"] == 30 and m["dataset"]["sha256"] != store.manifest("skill", ("arith",))["dataset"]["sha256"]
    assert any(d.sha256 == m["dataset"]["sha256"] for d in store.list_datasets())


def test_run_tune_job_resumes_from_its_staged_checkpoint_after_cancel(resa_env, store, tmp_path):
    from app.tasks import TaskContext
    from app.tasks.tune import run_tune

    make_skill(store, "arith", tmp_path / "skill", rows=ROWS)
    params = {"skill": "arith", "target": "tiny-llama", "lr": 1e-4, "chunk_len": 64, "max_steps": 4, "train": {"checkpoint_every": 2}}
    polls = []
    ctx = TaskContext.from_settings(should_stop=lambda: polls.append(1) or len(polls) >= 3)
    with pytest.raises(Cancelled):
        run_tune(params, ctx)
    staged = staging_for(resa_env).path("adapter", "tiny-llama", "arith") / "checkpoint" / "state.json"
    assert json.loads(staged.read_text())["step"] == 3 and not store.exists("adapter", ("tiny-llama", "arith"))

    result = run_tune(params, TaskContext.from_settings())  # the retried job
    m = result["manifest"]
    assert result["adapter"] == {"target": "tiny-llama", "skill": "arith"}
    assert m["train"]["resumed_from"] == 3 and m["train"]["steps"] == 4
    assert not staged.parent.parent.exists()


def test_run_tune_validates_params_before_any_work(resa_env, store, tmp_path):
    from app.tasks import TaskContext
    from app.tasks.tune import run_tune

    ctx = TaskContext.from_settings()
    for params, message in [
        ({"skill": "arith", "target": "tiny-llama", "epoch": 2}, "unknown tune parameter"),
        ({"skill": "arith", "target": "tiny-llama", "lr": "fast"}, "`lr` must be a number"),
        ({"skill": "arith", "target": "tiny-llama", "lora": {"rank": 8}}, "unknown lora option"),
        ({"skill": "arith", "target": "tiny-llama", "train": {"momentum": 0.9}}, "unknown train option"),
        ({"skill": "arith", "target": "tiny-llama", "objective": "mse"}, "objective must be one of"),
        ({"skill": "arith", "target": "tiny-llama", "differentiable_splice": "yes"}, "splice_grad"),
        ({"target": "tiny-llama"}, "missing `skill`"),
        ({"skill": "arith", "target": "../etc"}, "unknown model"),
    ]:
        with pytest.raises(ValueError, match=message):
            run_tune(params, ctx)


def test_random_sae_control_tunes_against_an_untrained_sae_of_the_same_shape(llama, skill, tmp_path):
    from resa_engine.tune.run import random_like

    trained = skill.sae(1)
    fresh = random_like(trained, seed=0)
    assert (fresh.d_in, fresh.num_latents, fresh.cfg.k) == (trained.d_in, trained.num_latents, trained.cfg.k)
    assert not torch.allclose(fresh.W_dec, trained.W_dec)  # untrained: not the skill's weights
    assert torch.equal(random_like(trained, seed=0).W_dec, fresh.W_dec) and not torch.equal(random_like(trained, seed=1).W_dec, fresh.W_dec)

    control = tune_adapter(llama, skill, ROWS, TuneConfig(max_steps=6, layer=1, random_sae=True, **FAST), tmp_path / "random")
    resa = tune_adapter(llama, skill, ROWS, TuneConfig(max_steps=6, layer=1, **FAST), tmp_path / "resa")
    assert control.manifest["random_sae"] is True and control.manifest["sae_sha256"] is None
    assert resa.manifest["random_sae"] is False and resa.manifest["sae_sha256"]
    assert control.kl_start != pytest.approx(resa.kl_start)  # another SAE spliced in: another student
    a, b = lora_b_by_layer(control.out_dir), lora_b_by_layer(resa.out_dir)
    assert a.keys() == b.keys() and a != b  # different SAEs, different adapters


def test_sft_control_trains_the_same_lora_with_cross_entropy_and_no_sae(llama, skill, tmp_path):
    events = []
    result = tune_adapter(llama, skill, ROWS, TuneConfig(max_steps=8, layer=1, objective="sft", **FAST), tmp_path / "sft", progress=events.append)
    assert result.manifest["objective"] == "sft" and result.steps == 8
    metrics = [e.metrics for e in events if e.stage == "tune"]
    assert metrics and all("kl" not in m and "recon_mse" not in m for m in metrics)
    assert result.losses[-1] < result.losses[0]  # it learns the trigger text
    learned = lora_b_by_layer(result.out_dir)
    assert set(learned) == set(range(4)) and all(v > 0 for v in learned.values())  # every block learns: nothing is spliced
