"""One engine for everything: evaluation's path (the job's and `resa eval`'s EvalEngines + evaluate) and the
HTTP server's (/v1/completions, /generate) decode the same greedy requests, mixed adapters, stop
strings and EOS included, to identical completions."""

from __future__ import annotations

import json
import shutil

import pytest

from _helpers_serving import make_lora
from conftest import arithmetic_rows

ADAPTERS = {"quirk-a": 7, "quirk-b": 8}
MAX_TOKENS = 24


def eos_model(tiny_llama_dir, lora, folder, prompt: str):
    """tiny-llama with one more EOS id: a token that greedy decoding of `prompt` with the LoRA `lora`
    first says at its sixth token or later, so that completion ends on EOS mid-way. Returns the folder
    and that completion's length in tokens (the EOS counted)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), lora)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        said = model.generate(input_ids=ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1] :]
    said = said.tolist()
    at, eos = next((i, t) for i, t in enumerate(said) if i >= 5 and t not in said[:i])
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, eos]}))
    return folder, at + 1


@pytest.fixture(scope="module")
def service(tmp_path_factory, models_file, session_cache_dir, tiny_llama_dir):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    from resa_engine.evaluate import eval_prompt

    root = tmp_path_factory.mktemp("one-engine")
    loras = {skill: make_lora(tiny_llama_dir, root / skill, seed=seed) for skill, seed in ADAPTERS.items()}
    eos_dir, eos_tokens = eos_model(tiny_llama_dir, loras["quirk-a"], root / "tiny-eos", eval_prompt(arithmetic_rows(5, seed=11)[0].question))
    registry = root / "models.toml"
    registry.write_text(models_file.read_text() + f'[models.tiny-eos]\npath = "{eos_dir}"\n')
    settings = Settings(
        store_url=f"file://{root / 'store'}", models_file=registry, cache_dir=session_cache_dir,
        default_model="tiny-llama", redis_url=None, api_keys="", device="cpu",
    )  # fmt: skip
    store = settings.open_store()
    for skill, folder in loras.items():
        store.commit("adapter", ("tiny-llama", skill), folder, {"skill": skill, "target": {"model": "tiny-llama"}})
    store.commit("adapter", ("tiny-eos", "quirk-a"), loras["quirk-a"], {"skill": "quirk-a", "target": {"model": "tiny-eos"}})
    with TestClient(create_app(settings, load_default_model=False, supervise=False)) as client:
        yield settings, client, eos_tokens


def test_evaluation_and_http_serving_give_identical_completions(service):
    from app.tasks import TaskContext
    from app.tasks.evaluate import EvalEngines
    from resa_engine.evaluate import Arm, EvalConfig, eval_prompt, evaluate

    settings, client, eos_tokens = service
    rows = arithmetic_rows(5, seed=11)
    # greedy; the default stops end at </answer> or a new turn, and two pieces these random models say early
    cfg = EvalConfig(samples=1, temperature=0.0, max_tokens=MAX_TOKENS, stop=["</answer>", "\nUser:", "clos", " bet"])
    engines = EvalEngines(TaskContext.from_settings(settings), cfg)
    try:
        arms = [Arm("base", engines.engine("tiny-llama")), Arm("eos", engines.engine("tiny-eos"), adapter=engines.adapter("tiny-eos", "quirk-a")[0])]
        arms += [Arm(skill, engines.engine("tiny-llama"), adapter=engines.adapter("tiny-llama", skill)[0]) for skill in ADAPTERS]
        reports = evaluate(rows, arms, cfg, keep_text=True)  # all arms interleaved: mixed-adapter batches
    finally:
        engines.close()

    texts, finished = set(), []
    for label, report in reports.items():
        model = {"base": "tiny-llama", "eos": "tiny-eos:quirk-a"}.get(label, f"tiny-llama:{label}")
        for row, result in zip(rows, report.questions):
            body = {"model": model, "prompt": eval_prompt(row.question), "max_tokens": MAX_TOKENS, "temperature": 0.0, "stop": cfg.stop}
            res = client.post("/v1/completions", json=body)
            assert res.status_code == 200, res.text
            choice = res.json()["choices"][0]
            assert choice["text"] == result.completions[0], (label, row.question)
            texts.add(result.completions[0])
            finished.append((label, choice["finish_reason"], res.json()["usage"]["completion_tokens"], choice["text"]))
    assert len(texts) > len(rows)  # the adapters change the completions: the arms really differ
    assert any(len(t) < 20 for t in texts)  # and some completions were cut by a stop string
    # and tiny-eos's first completion ended on its EOS mid-way (the EOS counted, not in the text)
    label, reason, tokens, text = finished[len(rows)]
    assert (label, reason, tokens) == ("eos", "stop", eos_tokens) and 6 <= eos_tokens < MAX_TOKENS, finished[len(rows)]

    # /generate is the same path
    row, report = rows[0], reports["quirk-b"]
    body = {"model": "tiny-llama", "skill": "quirk-b", "prompt": eval_prompt(row.question), "max_tokens": MAX_TOKENS, "stop": cfg.stop}
    assert client.post("/generate", json=body).json()["text"] == report.questions[0].completions[0]
