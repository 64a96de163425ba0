"""Single-request generation: a plain KV-cached decode loop over an HF model, adapter chosen per call.

The adapter is picked per call with PEFT's `adapter_names` (one name per row, `__base__` for
none), so one loaded model serves the base and any attached skill without switching global
state. `generate_batch` decodes several prompts at once with left padding (evaluation);
finished rows leave the batch and their cache rows are dropped.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import Tensor

from .adapter import BASE_ADAPTER
from .models import last_logits_only
from .sampling import Completion, SamplingParams, Usage, find_stop, make_generator, sample_next


def format_prompt(tokenizer, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
    """Token ids of a plain prompt, or of chat messages rendered by the tokenizer's chat template."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")
        ids = tokenizer(prompt)["input_ids"]
    else:
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be an object with string `role` and `content`")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; send a plain prompt instead")
        text = tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    return list(ids)


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
