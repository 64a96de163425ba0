"""The vLLM general plugin of resa (entry point `vllm.general_plugins: resa`). vLLM calls `register()` in
every one of its processes (API, EngineCore, each worker) before the model loads. It does two things:

1. Per-request SAEs inside vLLM's forward: a forward hook on every decoder layer applies, to the rows of
   the requests that asked (`SamplingParams.extra_args["resa_sae"]`), the same `SaeSplice` the native
   engine applies (resa_engine.sae.splice: steering or splice mode). Rows are found as vLLM's V1 model
   runner lays out a step: request i of `input_batch.req_ids` owns rows `query_start_loc[i]:[i+1]` of
   the flattened [tokens, hidden] batch. vLLM's Llama/Qwen layers return (hidden, residual) with the
   residual add deferred to the next layer's fused add+norm, so the residual stream after block i is
   hidden + residual; an SAE row gets residual = SaeSplice(hidden + residual), hidden = 0. The SAE is
   loaded in the worker from the checksum-verified local skill folder the request names. Python hooks
   only run per step in eager mode (`enforce_eager`); the engine refuses SAE requests otherwise.
2. On CPU builds (vLLM <= 0.32), the torch LoRA ops select the last adapter slot for "no adapter" rows
   (index -1 wraps around; vllm-project/vllm PR #48421): base requests batched with adapter requests got
   an adapter. The fix runs those ops on clamped indices and restores the rows of index -1.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

logger = logging.getLogger("resa.vllm")

EXTRA_KEY = "resa_sae"
"""SamplingParams.extra_args key: {"folder", "layer", "keep_error", "edits": [[latent, mode, value], ...]}."""
_REGISTERED = False
_SAES: "OrderedDict[tuple, object]" = OrderedDict()
_SAE_CACHE = 8


def register() -> None:
    """vLLM's entry point: idempotent; RESA_VLLM_PLUGIN=0 turns it off."""
    global _REGISTERED
    if _REGISTERED or os.environ.get("RESA_VLLM_PLUGIN", "1") in ("0", "false", "no"):
        return
    _REGISTERED = True
    _fix_cpu_lora_ops()
    _patch_model_runners()


# ---------------------------------------------------------------- 1. per-request SAEs


def _splice_for(spec: dict, device, dtype):
    """The request's SaeSplice, its SAE loaded once per (folder, layer) and device."""
    from ...artifacts import sae_subdir
    from ...sae.edits import LatentEdit
    from ...sae.load import load_sae
    from ...sae.splice import SaeSplice

    key = (spec["folder"], int(spec["layer"]), str(device))
    sae = _SAES.get(key)
    if sae is None:
        sae = load_sae(os.path.join(spec["folder"], sae_subdir(int(spec["layer"]))), device=device)
        _SAES[key] = sae
        while len(_SAES) > _SAE_CACHE:
            _SAES.popitem(last=False)
    _SAES.move_to_end(key)
    edits = [LatentEdit(int(latent), mode, float(value)) for latent, mode, value in spec.get("edits") or []]
    return SaeSplice(sae, int(spec["layer"]), edits, keep_error=bool(spec.get("keep_error", True)))


def _plan(runner) -> dict[int, list[tuple[int, int, dict]]]:
    """layer -> [(first row, end row, spec)] of the current forward, computed once per forward."""
    from vllm.forward_context import get_forward_context

    ctx = get_forward_context()
    plan = getattr(ctx, "_resa_plan", None)
    if plan is not None:
        return plan
    plan = {}
    batch = runner.input_batch
    n = batch.num_reqs
    starts = None
    if n:
        metadata = ctx.attn_metadata
        if isinstance(metadata, list):
            metadata = metadata[0] if metadata else None
        for m in (metadata or {}).values():
            if getattr(m, "query_start_loc", None) is not None:
                starts = m.query_start_loc.tolist()
                break
    if starts is not None:
        for i, req_id in enumerate(batch.req_ids[:n]):
            state = runner.requests.get(req_id)
            extra = getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}
            spec = extra.get(EXTRA_KEY)
            if spec:
                plan.setdefault(int(spec["layer"]), []).append((starts[i], starts[i + 1], spec))
    try:
        ctx._resa_plan = plan
    except AttributeError:
        pass
    return plan


def _hook(runner, layer: int):
    def hook(_module, _args, output):
        items = _plan(runner).get(layer)
        if not items:
            return None
        hidden, residual = (output[0], output[1]) if isinstance(output, tuple) else (output, None)
        new_hidden = hidden.clone()
        new_residual = residual.clone() if residual is not None else None
        for start, end, spec in items:
            stream = hidden[start:end] + residual[start:end] if residual is not None else hidden[start:end]
            out = _splice_for(spec, stream.device, stream.dtype).apply(stream)
            if new_residual is not None:
                new_residual[start:end] = out
                new_hidden[start:end] = 0
            else:
                new_hidden[start:end] = out
        return (new_hidden, new_residual, *output[2:]) if isinstance(output, tuple) else new_hidden

    return hook


def _decoder_layers(model):
    for path in ("model.layers", "language_model.model.layers", "model.language_model.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise RuntimeError(f"resa: no decoder layers found in {type(model).__name__}")


def install_hooks(runner) -> None:
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    if getattr(model, "_resa_hooks", False):
        return
    for i, layer in enumerate(_decoder_layers(model)):
        layer.register_forward_hook(_hook(runner, i))
    model._resa_hooks = True


def _patch_model_runners() -> None:
    import importlib

    for path, name in (("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"), ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner")):
        try:
            cls = getattr(importlib.import_module(path), name)
        except Exception:  # noqa: BLE001 - that platform's runner is not in this build
            continue
        if getattr(cls.load_model, "_resa", False):
            continue
        original = cls.load_model

        def load_model(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            try:
                install_hooks(self)
            except Exception:  # noqa: BLE001 - never break the engine's start; SAE requests then fail loudly
                logger.exception("resa: installing the SAE hooks failed")
            return out

        load_model._resa = True
        cls.load_model = load_model


# ---------------------------------------------------------------- 2. CPU LoRA index -1


def _fix_cpu_lora_ops() -> None:
    try:
        from vllm.lora.ops.torch_ops import lora_ops
    except Exception:  # noqa: BLE001 - a build without the torch LoRA ops
        return
    modules = [lora_ops]
    for path in ("vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu"):
        try:
            import importlib

            modules.append(importlib.import_module(path))
        except Exception:  # noqa: BLE001
            continue
    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        original = getattr(lora_ops, name, None)
        if original is None:
            continue
        fixed = original if getattr(original, "_resa", False) else _skip_no_adapter_rows(original)
        for module in modules:
            if hasattr(module, name):
                setattr(module, name, fixed)


def _skip_no_adapter_rows(op):
    def fixed(inputs, weights, output, indices, *args, **kwargs):
        none = indices < 0
        if not bool(none.any()) or none.shape[0] != output.shape[0]:
            return op(inputs, weights, output, indices, *args, **kwargs)
        rows = none.nonzero().squeeze(1)
        kept = output[rows].clone()
        result = op(inputs, weights, output, indices.clamp(min=0), *args, **kwargs)
        output[rows] = kept
        return result

    fixed._resa = True
    return fixed
