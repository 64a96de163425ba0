"""The PEFT reference the engines are checked against: a plain KV-cached decode loop over an HF
model (transformers' own DynamicCache, left padding), adapters attached with PeftModel and picked
per call with PEFT's `adapter_names` (`__base__` for none). Not product code: tests only.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from resa_engine.engine.text import format_prompt
from resa_engine.lora.peft_io import check_compat
from resa_engine.models import LoadedModel, last_logits_only
from resa_engine.sampling import Completion, SamplingParams, Usage, find_stop, make_generator, sample_next

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in per-row adapter_names


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _cache_kwarg(model) -> str:
    """transformers 5 names the KV cache argument `cache`; 4.x calls it `past_key_values`."""
    base = model.get_base_model() if _is_peft(model) else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _new_cache(model):
    from transformers import DynamicCache

    base = model.get_base_model() if _is_peft(model) else model
    try:
        return DynamicCache(config=base.config)
    except TypeError:
        return DynamicCache()


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    return ids


def generate(
    model,
    tokenizer,
    *,
    prompt: str | None = None,
    messages: list[dict] | None = None,
    input_ids: list[int] | None = None,
    params: SamplingParams | None = None,
    adapter: str | None = None,
) -> Completion:
    """One completion of a prompt, chat messages or token ids; `adapter` names an attached adapter (None: base)."""
    params = params or SamplingParams()
    ids = list(input_ids) if input_ids is not None else format_prompt(tokenizer, prompt, messages)
    return generate_batch(model, tokenizer, [ids], params, adapter=adapter, seeds=[params.seed])[0]


@torch.inference_mode()
def generate_batch(
    model,
    tokenizer,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    adapter: str | None = None,
    seeds: list[int | None] | None = None,
    on_token: Callable[[int], None] | None = None,
) -> list[Completion]:
    """Complete several token-id prompts together (left padding, KV cache); row r samples with seeds[r].

    A row ends at EOS or a stop string (`stop`) or after max_tokens (`length`). Stop strings are
    cut from the text; usage counts every sampled token, EOS included.
    """
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if adapter is not None and not _is_peft(model):
        raise ValueError(f"adapter {adapter!r} requested but the model has no adapters attached")
    if model.training:
        raise ValueError("generation needs the model in eval mode")
    n = len(prompts)
    seeds = seeds if seeds is not None else [params.seed] * n
    if len(seeds) != n:
        raise ValueError("seeds must have one entry per prompt")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model, tokenizer)
    gens = [make_generator(s, device) for s in seeds]

    width = max(len(p) for p in prompts)
    input_ids = torch.full((n, width), pad, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        input_ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention[r, width - len(p) :] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)

    cache_kw, cache = _cache_kwarg(model), _new_cache(model)
    active = list(range(n))
    tokens: list[list[int]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    cut: list[int | None] = [None] * n  # character index of a stop string in the text

    def forward(ids: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        extra = {"adapter_names": [adapter or BASE_ADAPTER] * ids.shape[0]} if _is_peft(model) else {}
        keep = last_logits_only(ids.shape[1], ids.device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=keep, **{cache_kw: cache}, **extra)
        return out.logits[:, -1, :]

    logits = forward(input_ids, attention, positions)
    last_pos = positions[:, -1]
    for _ in range(params.max_tokens):
        next_ids = []
        for j, r in enumerate(active):
            tok = sample_next(logits[j], params, gens[r])
            tokens[r].append(tok)
            next_ids.append(tok)
            if tok in eos:
                finish[r] = "stop"
            elif params.stop:
                text = tokenizer.decode(tokens[r], skip_special_tokens=True)
                at = find_stop(text, params.stop)
                if at is not None:
                    finish[r], cut[r] = "stop", at
            if finish[r] is None and len(tokens[r]) >= params.max_tokens:
                finish[r] = "length"
        if on_token is not None:
            on_token(len(active))
        keep = [j for j, r in enumerate(active) if finish[r] is None]
        if not keep:
            break
        step_ids = torch.tensor(next_ids, dtype=torch.long, device=device)
        if len(keep) < len(active):
            # finished rows leave the batch: drop their cache rows instead of decoding padding
            index = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(index)
            attention, last_pos, step_ids = attention[index], last_pos[index], step_ids[index]
            active = [active[j] for j in keep]
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        last_pos = last_pos + 1
        logits = forward(step_ids[:, None], attention, last_pos[:, None])

    completions = []
    for r in range(n):
        kept = [t for t in tokens[r] if t not in eos]
        text = tokenizer.decode(kept, skip_special_tokens=True)
        if cut[r] is not None:
            text = text[: cut[r]]
        completions.append(
            Completion(text=text, finish_reason=finish[r] or "length", usage=Usage(len(prompts[r]), len(tokens[r])), token_ids=kept)
        )
    return completions


def attach_adapter(model: LoadedModel, adapter_dir: Path | str, name: str = "skill", *, target_sha256: str | None = None):
    """Load the adapter into `model` under `name` (replacing one of that name) and return the PeftModel.

    The model stays usable without it: generation picks adapters per call (`adapter_names`),
    so attaching one never changes what the base model answers.
    """
    from peft import PeftModel

    compat = check_compat(adapter_dir, model, target_sha256=target_sha256)
    if not compat.ok:
        raise ValueError(f"adapter {adapter_dir} cannot be attached to {model.name}: {compat.reason}")
    if name == BASE_ADAPTER:
        raise ValueError(f"adapter name {BASE_ADAPTER!r} is reserved")
    if isinstance(model.model, PeftModel):
        if name in model.model.peft_config:
            detach_adapter(model, name)
    if isinstance(model.model, PeftModel):
        model.model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
    else:
        model.model = PeftModel.from_pretrained(model.model, str(adapter_dir), adapter_name=name, is_trainable=False)
    model.model.eval()
    model.extra.setdefault("adapters", {})[name] = {"dir": str(adapter_dir), "cross_model": compat.cross_model}
    return model.model


def detach_adapter(model: LoadedModel, name: str) -> None:
    """Remove one attached adapter; with none left the plain base model is restored."""
    from peft import PeftModel

    peft_model = model.model
    if not isinstance(peft_model, PeftModel) or name not in peft_model.peft_config:
        raise ValueError(f"no adapter {name!r} is attached to {model.name}")
    model.extra.get("adapters", {}).pop(name, None)
    if len(peft_model.peft_config) == 1:
        model.model = peft_model.unload()  # drops the LoRA layers, keeps the base weights untouched
        model.model.eval()
        return
    if name in peft_model.active_adapters:
        peft_model.set_adapter(next(n for n in peft_model.peft_config if n != name))
    peft_model.delete_adapter(name)


def attached_adapters(model: LoadedModel) -> list[str]:
    from peft import PeftModel

    return list(model.model.peft_config) if isinstance(model.model, PeftModel) else []


# ---------------------------------------------------------------- the SAE splice, computed the long way


def make_edit_fn(edits, *, num_latents: int | None = None):
    """A `(top_acts, top_indices) -> (acts, indices)` edit of the SAE code, built independently of
    resa_engine.sae.splice: clamp/add on a latent that is not in a token's top-k append one column
    (index = latent, activation = value); where it is present the appended slot carries 0.
    sparsify's decoders sum activation * W_dec[index] over any number of slots."""
    from resa_engine.sae.edits import check_edits

    edits = check_edits(edits, num_latents)

    def edit(top_acts, top_indices):
        acts, indices = top_acts, top_indices
        for e in edits:
            hit = indices == e.latent
            if e.mode == "scale":
                acts = torch.where(hit, acts * e.value, acts)
                continue
            present = hit.any(-1, keepdim=True)
            if e.mode == "clamp":
                acts = torch.where(hit, torch.full_like(acts, e.value), acts)
            else:
                acts = torch.where(hit, acts + e.value, acts)
            extra = torch.where(present, torch.zeros_like(acts[..., :1]), torch.full_like(acts[..., :1], e.value))
            acts = torch.cat([acts, extra], dim=-1)
            indices = torch.cat([indices, torch.full_like(indices[..., :1], e.latent)], dim=-1)
        return acts, indices

    return edit


def reference_splice(sae, x, edits=(), *, keep_error: bool = False):
    """decode(edit(encode(x))) [+ x - decode(encode(x))], decoding the whole edited code."""
    h = x.to(sae.dtype).reshape(-1, x.shape[-1])
    top_acts, top_indices, _ = sae.encode(h)
    recon = sae.decode(top_acts, top_indices)
    out = sae.decode(*make_edit_fn(edits)(top_acts, top_indices)) if edits else recon
    if keep_error:
        out = out + (h - recon)
    return out.view(x.shape).to(x.dtype)


from contextlib import contextmanager  # noqa: E402


@contextmanager
def reference_splice_hook(layers, layer: int, sae, edits=(), *, keep_error: bool = False, rows=None):
    """Block `layer`'s output through `reference_splice` (only `rows`, a bool [batch], when given)."""

    def hook(_module, _inputs, output):
        x = output[0] if isinstance(output, tuple) else output
        new = reference_splice(sae, x, edits, keep_error=keep_error)
        if rows is not None:
            new = torch.where(rows.view(-1, *([1] * (x.dim() - 1))), new, x)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
