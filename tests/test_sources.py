"""Source models made here: a GRPO LoRA (TRL's GRPOTrainer, accuracy reward) and the `run_source` job
(SFT or GRPO, committed as an adapter), on tiny real models, real TRL and a real store.

A random 64-wide model never states the right answer, so every completion scores 0, every GRPO
advantage is 0 and the LoRA cannot move; the training test swaps in a reward that varies within a
group (the real reward is tested on its own, and trains in the run_source test).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import arithmetic_rows

from adapters_store import ArtifactConflict, ArtifactNotFound
from resa_engine.data import rows_to_jsonl
from resa_engine.errors import Cancelled, ModelError
from resa_engine.sources import grpo
from resa_engine.sources.grpo import GRPOSourceConfig, accuracy_reward, completion_reward, train_grpo_lora

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = arithmetic_rows(24, seed=5)
TINY = dict(steps=3, batch_size=2, num_generations=2, max_completion_length=8, lr=1e-2, warmup_ratio=0.0)
PROBE = "User:\n What is 12 + 30?\n\nAssistant:\n <think>"


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def _state(model) -> dict:
    base = model.model
    return {
        "config": base.config.to_dict(),
        "generation": base.generation_config.to_dict(),
        "attrs": sorted(base.__dict__),
        "grad": [p.requires_grad for p in base.parameters()],
        "training": base.training,
    }


# ---------------------------------------------------------------- the reward


@pytest.mark.parametrize(
    ("completion", "gold", "reward"),
    [
        ("<answer> Answer: 42</answer>", "42", 1.0),
        (" 40 + 2 = 42 </think>\n<answer> Answer: 42</answer>", "42", 1.0),
        ("<answer> Answer: 41</answer>", "42", 0.0),
        (" I do not know </think>", "42", 0.0),
        ("", "42", 0.0),
        ("<answer> Answer: 1,000</answer>", "1000", 1.0),  # math-verify equivalence
        ("<answer> Answer: 0.5</answer>", "\\frac{1}{2}", 1.0),
        # read as evaluation reads it: nothing after its stop strings counts
        ("<answer> Answer: 42</answer>\nUser:\n What is 1 + 1?\n<answer> Answer: 2</answer>", "42", 1.0),
        (" 7 \nUser:\n What is 6 * 7? 42", "42", 0.0),
    ],
)
def test_reward_is_accuracy_of_the_final_answer(completion, gold, reward):
    assert completion_reward(completion, gold) == reward


def test_reward_reads_up_to_evaluations_stop_strings():
    from resa_engine.evaluate import EvalConfig

    assert grpo.EVAL_STOP == tuple(EvalConfig().stop)


def test_reward_function_takes_trl_columns():
    out = accuracy_reward(completions=["<answer> Answer: 42</answer>", "<answer> Answer: 5</answer>"], answer=["42", "42"], prompts=["p", "p"])
    assert out == [1.0, 0.0]


# ---------------------------------------------------------------- training


def test_grpo_trains_a_lora_and_leaves_the_model_alone(tiny_llama, tiny_llama_dir, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # a reward that differs inside a group (odd/even completion length), so advantages are non-zero
    monkeypatch.setattr(grpo, "completion_reward", lambda completion, gold: float(len(completion) % 2))
    before_logits, before = _logits(tiny_llama.model, tiny_llama.tokenizer), _state(tiny_llama)
    events = []
    out = tmp_path / "grpo"
    res = train_grpo_lora(tiny_llama, ROWS, GRPOSourceConfig(**TINY), out, progress=events.append)

    # a plain PEFT folder on the registered name
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny-llama"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (32, 128, 0.05)
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    # it loads with peft and changes the model's output
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    plain = _logits(fresh, tiny_llama.tokenizer)
    tuned = _logits(PeftModel.from_pretrained(fresh, str(out)), tiny_llama.tokenizer)
    assert torch.allclose(plain, before_logits, atol=1e-5)
    assert (tuned - plain).abs().max() > 1e-3

    # the caller's model is the plain base again, exactly as it was
    assert not isinstance(tiny_llama.model, PeftModel)
    assert torch.equal(_logits(tiny_llama.model, tiny_llama.tokenizer), before_logits)
    assert _state(tiny_llama) == before

    # progress: stage grpo, per-step reward and loss, ending at the last step
    assert events and all(e.stage == "grpo" and e.total == 3 for e in events)
    assert {"reward", "loss"} <= set(events[-1].metrics) and events[-1].step == 3
    assert res.steps == 3 and len(res.history["reward"]) == 3 and len(res.history["loss"]) == 3
    assert all(0.0 <= r <= 1.0 for r in res.history["reward"])

    m = res.manifest
    assert m["origin"] == "grpo" and m["target"] == {"model": "tiny-llama", "sha256": tiny_llama.sha256}
    assert m["lora"] == {"r": 32, "alpha": 128, "dropout": 0.05, "target_modules": list(GRPOSourceConfig().target_modules)}
    assert m["train"]["steps"] == 3 and m["train"]["rows"] == len(ROWS) and m["train"]["num_generations"] == 2
    assert m["reward_start"] == res.reward_start and m["reward_end"] == res.reward_end and m["wall_s"] > 0
    json.dumps(m)  # the store manifest body must be JSON


def test_grpo_cancel_stops_at_a_step_boundary(tiny_llama, tmp_path):
    before_logits, before = _logits(tiny_llama.model, tiny_llama.tokenizer), _state(tiny_llama)
    polls = []

    def should_stop() -> bool:
        polls.append(1)
        return True  # asked once the first step is done

    with pytest.raises(Cancelled, match=r"grpo cancelled at step 1/3"):
        train_grpo_lora(tiny_llama, ROWS, GRPOSourceConfig(**TINY), tmp_path / "out", should_stop=should_stop)
    assert len(polls) == 1
    assert not (tmp_path / "out").exists()
    assert torch.equal(_logits(tiny_llama.model, tiny_llama.tokenizer), before_logits)
    assert _state(tiny_llama) == before


def test_grpo_failing_inside_trl_leaves_the_model_alone(tiny_llama, tmp_path, monkeypatch):
    import trl.trainer.grpo_trainer as grpo_trainer
    from peft.tuners.tuners_utils import BaseTunerLayer

    def broken(*args, **kwargs):  # fails after TRL has wrapped the model with the LoRA
        raise RuntimeError("broken inside TRL")

    monkeypatch.setattr(grpo_trainer, "add_fused_lm_head", broken)
    before_logits, before = _logits(tiny_llama.model, tiny_llama.tokenizer), _state(tiny_llama)
    with pytest.raises(RuntimeError, match="broken inside TRL"):
        train_grpo_lora(tiny_llama, ROWS, GRPOSourceConfig(**TINY), tmp_path / "out")
    assert not any(isinstance(m, BaseTunerLayer) for m in tiny_llama.model.modules())
    assert torch.equal(_logits(tiny_llama.model, tiny_llama.tokenizer), before_logits)
    assert _state(tiny_llama) == before


def test_grpo_refuses_unusable_input_before_training(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="num_generations"):
        train_grpo_lora(tiny_llama, ROWS, GRPOSourceConfig(num_generations=1), tmp_path / "a")
    with pytest.raises(ValueError, match="at least batch_size = 4 rows"):
        train_grpo_lora(tiny_llama, ROWS[:3], GRPOSourceConfig(batch_size=4), tmp_path / "b")
    with pytest.raises(ModelError, match="no linear module named lm_proj"):
        train_grpo_lora(tiny_llama, ROWS, GRPOSourceConfig(**{**TINY, "target_modules": ["q_proj", "lm_proj"]}), tmp_path / "c")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- the job


@pytest.fixture
def source_ctx(resa_env, store):
    from app.tasks import TaskContext

    info = store.put_dataset(rows_to_jsonl(ROWS), len(ROWS))
    events = []
    ctx = TaskContext(settings=resa_env, store=store, progress=events.append, job_id="job-7")
    return ctx, info.sha256, events


@pytest.mark.parametrize(
    ("method", "options", "stage"),
    [("sft", {"max_steps": 2, "batch_size": 4, "lora_r": 4, "lora_alpha": 8}, "sft"), ("grpo", TINY, "grpo")],
)
def test_run_source_commits_an_adapter(source_ctx, store, method, options, stage):
    from app.tasks.source import run_source

    ctx, sha, events = source_ctx
    out = run_source({"model": "tiny-llama", "name": f"src-{method}", "dataset": sha, "method": method, "options": options}, ctx)

    assert out["adapter"] == {"target": "tiny-llama", "skill": f"src-{method}"}
    manifest = store.manifest("adapter", ("tiny-llama", f"src-{method}"))
    assert manifest == out["manifest"]
    assert manifest["origin"] == method and manifest["method"] == method and manifest["job_id"] == "job-7"
    assert manifest["dataset"] == {"sha256": sha, "rows": len(ROWS)}
    assert manifest["target"]["model"] == "tiny-llama"
    assert sorted(manifest["files"]) == ["adapter_config.json", "adapter_model.safetensors"]
    folder = store.fetch("adapter", ("tiny-llama", f"src-{method}"))
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
    assert events and events[-1].stage == stage
    assert not (ctx.staging.path("source", "tiny-llama", f"src-{method}")).exists()

    # the same name again: refused before any model is loaded, unless asked to replace
    again = type(ctx)(settings=ctx.settings, store=store)
    with pytest.raises(ArtifactConflict, match=f"tiny-llama/src-{method} already exists"):
        run_source({"model": "tiny-llama", "name": f"src-{method}", "dataset": sha, "method": method, "options": options}, again)
    assert again._models == {}


BAD = [
    ([], "must be a JSON object"),
    ({"model": "tiny-llama", "name": "s", "dataset": "0" * 64, "epochs": 3}, "unknown source parameter"),
    ({"name": "s", "dataset": "0" * 64}, "missing `model`"),
    ({"model": "tiny-llama", "dataset": "0" * 64}, "missing `name`"),
    ({"model": "tiny-llama", "name": "s"}, "missing `dataset`"),
    ({"model": "tiny-llama", "name": "s", "dataset": "0" * 64}, "missing `method`"),
    ({"model": "", "name": "s", "dataset": "0" * 64, "method": "sft"}, "`model` must be a non-empty string"),
    ({"model": "tiny-llama", "name": "../up", "dataset": "0" * 64, "method": "sft"}, "invalid adapter name"),
    ({"model": "tiny-llama", "name": "s", "dataset": "abc", "method": "sft"}, "dataset id"),
    ({"model": "tiny-llama", "name": "s", "dataset": "0" * 64, "method": "ppo"}, "`method` must be one of sft, grpo"),
    ({"model": "tiny-llama", "name": "s", "dataset": "0" * 64, "method": "grpo", "options": [1]}, "`options` must be an object"),
    ({"model": "tiny-llama", "name": "s", "dataset": "0" * 64, "method": "grpo", "options": {"epochs": 1}}, "unknown grpo option"),
    ({"model": "tiny-llama", "name": "s", "dataset": "0" * 64, "method": "grpo", "options": {"steps": "3"}}, "`options.steps` of grpo must be an integer"),
    ({"model": "tiny-llama", "name": "s", "dataset": "0" * 64, "method": "grpo", "options": {"steps": True}}, "must be an integer"),
    ({"model": "tiny-llama", "name": "s", "dataset": "0" * 64, "method": "grpo", "options": {"num_generations": 1}}, "num_generations"),
    ({"model": "tiny-llama", "name": "s", "dataset": "0" * 64, "method": "grpo", "options": {"micro_batch_size": 3}}, "micro_batch_size"),
    ({"model": "tiny-llama", "name": "s", "dataset": "0" * 64, "method": "grpo", "options": {"target_modules": "q_proj"}}, "list of module names"),
    ({"model": "tiny-llama", "name": "s", "dataset": "0" * 64, "method": "sft", "options": {"lr": -1}}, "sft `lr` must be positive"),
    ({"model": "tiny-llama", "name": "s", "dataset": "0" * 64, "method": "sft", "options": {"steps": 3}}, "unknown sft option"),
    ({"model": "tiny-llama", "name": "s", "dataset": "0" * 64, "method": "sft", "replace": "yes"}, "`replace` must be true or false"),
]


@pytest.mark.parametrize(("params", "message"), BAD)
def test_bad_params_are_refused_without_io(params, message):
    from app.tasks.source import check_params

    with pytest.raises(ValueError, match=message):
        check_params(params)


def test_check_params_fills_in_the_defaults():
    from app.tasks.source import check_params

    got = check_params({"model": "tiny-llama", "name": "s", "dataset": "a" * 64, "method": "grpo", "options": {"steps": 5}})
    assert got["method"] == "grpo" and got["replace"] is False
    assert got["options"]["steps"] == 5 and got["options"]["lora_r"] == 32 and got["options"]["lora_alpha"] == 128
    sft = check_params({"model": "tiny-llama", "name": "s", "dataset": "a" * 64, "method": "sft", "replace": True})
    assert sft["options"]["max_steps"] is None and sft["options"]["lora_r"] == 16 and sft["replace"] is True


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"options": {"steps": 0}}, ValueError, "steps"),
        ({"model": "nope"}, ModelError, "unknown model 'nope'"),
        ({"dataset": "f" * 64}, ArtifactNotFound, "not found"),
        ({"options": {"batch_size": 30}}, ValueError, "grpo needs at least batch_size = 30"),
    ],
)
def test_run_source_refuses_before_any_work(source_ctx, store, change, error, message):
    from app.tasks.source import run_source

    ctx, sha, events = source_ctx
    params = {"model": "tiny-llama", "name": "s", "dataset": sha, "method": "grpo", "options": dict(TINY), **change}
    with pytest.raises(error, match=message):
        run_source(params, ctx)
    assert ctx._models == {} and events == []
    assert store.list("adapter") == []
    assert not (ctx.staging.path("source", "tiny-llama", "s")).exists()


# ---------------------------------------------------------------- POST /sources and `resa source`


@pytest.fixture(scope="module")
def svc(tmp_path_factory, models_file, session_cache_dir, redis_server):
    """The app (TestClient) with a real `resa worker` on a real Redis."""
    from _helpers_service import start_service

    yield from start_service(tmp_path_factory.mktemp("sources"), models_file, session_cache_dir, redis_server.url)


def test_post_sources_checks_at_submission_and_the_job_commits_a_source_to_extract_from(svc):
    from _helpers_service import upload_rows

    client = svc.client
    sha = upload_rows(client, ROWS)
    body = {"model": "tiny-llama", "name": "src", "dataset": sha, "method": "sft", "options": {"max_steps": 2, "batch_size": 4, "lora_r": 4}}
    for change, status, where in (
        ({"options": {"bogus": 1}}, 422, "unknown sft option(s) bogus"),
        ({"options": {"lr": float("nan")}}, 422, "sft `lr` must be positive"),
        ({"method": "ppo"}, 422, "method"),
        ({"method": "grpo", "options": {"num_generations": 1}}, 422, "num_generations"),
        ({"model": "nope"}, 404, "nope"),
        ({"dataset": "f" * 64}, 404, "dataset"),
        ({"name": "../x"}, 422, "name"),
    ):
        res = client.post("/sources", content=json.dumps({**body, **change}), headers={"content-type": "application/json"})  # NaN too
        assert res.status_code == status and where in res.text, (change, res.text)
    assert client.get("/jobs", params={"kind": "source"}).json()["jobs"] == []  # nothing was queued

    res = client.post("/sources", json=body)
    assert res.status_code == 202, res.text
    accepted = res.json()
    assert accepted["method"] == "sft" and accepted["options"]["max_steps"] == 2 and accepted["options"]["lr"] == 2e-4
    assert accepted["job"]["kind"] == "source"
    again = client.post("/sources", json=body)
    assert again.status_code == 409 and again.json()["error"]["type"] in ("job_in_progress", "name_taken")
    job = svc.wait_job(accepted["job"]["id"], timeout_s=240)
    assert job["state"] == "finished", job
    manifest = svc.settings.open_store().manifest("adapter", ("tiny-llama", "src"))
    assert manifest["origin"] == "sft" and manifest["job_id"] == accepted["job"]["id"]
    assert client.post("/sources", json=body).json()["error"]["type"] == "name_taken"
    skill = client.post("/skills", json={"name": "from-src", "source": {"model": "tiny-llama", "adapter": "src"}, "layers": [1], "dataset": sha,
                                        "sae": {"expansion_factor": 2, "k": 4}, "train": {"chunk_len": 32, "max_tokens": 512}})  # fmt: skip
    assert skill.status_code == 202, skill.text
    assert svc.wait_job(skill.json()["job"]["id"], timeout_s=240)["state"] == "finished"


def test_cli_source_refuses_bad_options_in_one_line(resa_env, tmp_path, capsys):
    from app.cli import main

    data = tmp_path / "rows.jsonl"
    data.write_text(rows_to_jsonl(ROWS).decode())
    argv = ["source", "--model", "tiny-llama", "--data", str(data), "--name", "s", "--method", "grpo"]
    assert main([*argv, "--option", "num_generations=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("resa source: error:") and "num_generations" in err and "\n" not in err
    assert main([*argv, "--option", "steps"]) == 2 and "KEY=VALUE" in capsys.readouterr().err
    assert resa_env.open_store().list("adapter") == [] and resa_env.open_store().list_datasets() == []


def test_cli_source_trains_and_commits(resa_env, tmp_path, capsys):
    from app.cli import main

    data = tmp_path / "rows.jsonl"
    data.write_text(rows_to_jsonl(ROWS).decode())
    argv = ["source", "--model", "tiny-llama", "--data", str(data), "--name", "s", "--method", "sft",
            "--option", "max_steps=2", "--option", "batch_size=4", "--option", "lora_r=4"]  # fmt: skip
    assert main(argv) == 0
    assert "adapter tiny-llama/s committed: sft source, loss" in capsys.readouterr().out
    assert resa_env.open_store().manifest("adapter", ("tiny-llama", "s"))["origin"] == "sft"
