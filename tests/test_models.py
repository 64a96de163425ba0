"""Model registry and loading with tiny real models and the bundled SmolLM2."""

import pytest
import torch

from resa_engine.models import ModelError, ModelRegistry, describe, load_model, pick_device


def test_builtin_registry_holds_bundled_smollm2():
    reg = ModelRegistry.load()
    spec = reg.get("smollm2-135m")
    assert spec.kind == "gguf"
    folder, gguf = spec.resolve()
    assert (folder / gguf).is_file() and gguf.endswith(".gguf")


def test_models_file_extends_builtin(registry):
    assert {"smollm2-135m", "tiny-llama", "tiny-qwen"} <= set(registry.names())


@pytest.mark.parametrize("name,arch,hidden", [("tiny-llama", "llama", 64), ("tiny-qwen", "qwen2", 96)])
def test_tiny_models_load_through_registry(registry, session_cache_dir, name, arch, hidden):
    m = load_model(registry.get(name), cache_dir=session_cache_dir)
    assert m.architecture == arch
    assert m.num_layers == 4 and m.hidden_size == hidden
    assert m.tokenizer.pad_token is not None
    assert m.device.type == pick_device()[0].type
    assert m.dtype == pick_device()[1]
    assert len(m.sha256) == 64
    info = describe(registry.get(name))
    assert (info.architecture, info.num_layers, info.hidden_size) == (arch, 4, hidden)


def test_cpu_is_fp32():
    dev, dtype = pick_device("cpu")
    assert dev.type == "cpu" and dtype == torch.float32


def test_unknown_model_and_missing_path_are_clear(registry):
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        registry.get("nope")
    with pytest.raises(ModelError, match="does not exist"):
        registry.resolve("./no/such/folder", allow_path=True)
    with pytest.raises(ModelError, match="unknown model"):
        registry.resolve("./no/such/folder")  # paths only when the caller allows them (CLI)


def test_local_path_allowed_for_cli(registry, tiny_llama_dir):
    spec = registry.resolve(str(tiny_llama_dir), allow_path=True)
    assert spec.kind == "path"


def test_bad_registry_file(tmp_path):
    bad = tmp_path / "m.toml"
    bad.write_text('[models.x]\npath = "/a"\ngguf = "b"\n')
    with pytest.raises(ModelError, match="exactly one of"):
        ModelRegistry.load(bad)
    bad.write_text("[models.x\n")
    with pytest.raises(ModelError, match="models file"):
        ModelRegistry.load(bad)


def test_unsupported_architecture_refused(tmp_path, tiny_tokenizer_dir, session_cache_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    spec = ModelRegistry({}).resolve(str(tmp_path), allow_path=True)
    with pytest.raises(ModelError, match="not supported"):
        load_model(spec, cache_dir=session_cache_dir)


def test_layer_range_check(tiny_llama):
    assert tiny_llama.check_layer(3) == 3
    with pytest.raises(ModelError, match="out of range"):
        tiny_llama.check_layer(4)


@pytest.mark.slow
def test_bundled_smollm2_generates(smollm2):
    assert smollm2.architecture == "llama" and smollm2.num_layers == 30 and smollm2.hidden_size == 576
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = smollm2.model.generate(ids, max_new_tokens=5, do_sample=False)
    text = smollm2.tokenizer.decode(out[0, ids.shape[1]:])
    assert out.shape[1] == ids.shape[1] + 5 and text.strip()
