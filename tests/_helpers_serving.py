"""Shared by test_serving.py and test_adapter_cache.py: random PEFT LoRA adapters on the tiny
models, a private (mutable) copy of a tiny model, and a reference greedy decoder that runs
each request alone through plain PEFT."""

from __future__ import annotations

from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora(model_dir: Path, out: Path, seed: int, *, r: int = 8, alpha: int = 16, targets: list[str] = TARGETS) -> Path:
    """A PEFT LoRA folder with random A and B (init_lora_weights=False), so it changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():  # B starts small; scale it so the adapter clearly changes greedy tokens
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(4.0)
    peft_model.save_pretrained(out)
    return out


def load_private(model_dir: Path, name: str = "tiny-llama"):
    """A LoadedModel of our own: the scheduler adds hooks to it, so never share the session one."""
    from resa_engine.models import ModelSpec, load_model

    return load_model(ModelSpec(name=name, kind="path", location=str(model_dir)), device="cpu", cache_dir=model_dir.parent / "cache")


_REFERENCE: dict = {}


def reference_model(model_dir: Path, adapter_dir: Path | None):
    """The base model, or PeftModel.from_pretrained over it; one cached copy per (model, adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    key = (str(model_dir), str(adapter_dir))
    if key not in _REFERENCE:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, adapter_dir)
        _REFERENCE[key] = model.eval()
    return _REFERENCE[key]


def _cache_kwarg(model) -> str:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def reference_greedy(model_dir: Path, adapter_dir: Path | None, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens for one request alone: PeftModel.from_pretrained, HF's own KV cache, no EOS stop."""
    model = reference_model(model_dir, adapter_dir)
    out_ids, feed, cache = [], list(prompt), None
    with torch.inference_mode():
        for _ in range(n):
            out = model(input_ids=torch.tensor([feed]), use_cache=True, **{_cache_kwarg(model): cache})
            cache = getattr(out, "cache", None) or out.past_key_values
            feed = [int(out.logits[0, -1].argmax())]
            out_ids.append(feed[0])
    return out_ids
