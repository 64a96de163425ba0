"""Transfer diagnostics of an adapter, recorded in its manifest (`transfer`): how well the skill's SAE
reads the *target* (not only the source it was trained on), how far the SAE splice moves the target
before and after tuning, and how much the adapter changes the target's residual stream per layer.

All on held-out chunks (rows split off before tuning), under no_grad, in eval mode (no LoRA
dropout), batched so memory stays bounded. tune_adapter calls them at three points:

  sae_on_target(model, sae, layer, chunks)   before the LoRA is added: the plain target
  heldout_kl(objective, chunks)              right after add_lora (B = 0) and again after training
  residual_delta(peft_model, layers, ...)    after training: adapter on vs `disable_adapter()`
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from .data import QARow, TriggerDataset, special_token_mask
from .models import LoadedModel
from .provenance import finite
from .sae.hooks import run_until

# Residual-delta batches hold every block's output twice: 2 x 28 layers x 2048 tokens x 3584 x 2 bytes ~ 0.8 GiB for a 7B in bf16.
_DELTA_BATCH_TOKENS = 2048
# KL batches materialise two [batch, chunk_len, vocab] fp32 log-prob tensors; the bound of extract/metrics.py.
_KL_LOGIT_BUDGET = 2**28


@dataclass
class TransferDiagnostics:
    """What tuning did to the target, on held-out chunks; stored as the adapter manifest's `transfer`.

    "Relative" residual change is `residual_delta_rel`: ||delta|| / ||h_base|| per token, then averaged (0.1 = the
    adapter moves a token's residual by a tenth of its norm), not the ratio of the two means.
    """

    layer: int
    """Decoder block (0-based) after which the SAE is spliced and whose output it reads."""
    target_fvu: float
    """FVU (unitless; 0 perfect, 1 = no better than the mean) of the SAE on the TARGET's block output, content positions."""
    target_loss_recovered: float | None
    """(loss_zero - loss_spliced) / (loss_zero - loss_clean) on the plain target (unitless, 1 = free); None when undefined."""
    target_kl_spliced: float
    """KL(p_clean || p_spliced) of the plain target, nats per predicted token (extract.metrics: positions 0..T-2)."""
    kl_heldout_before: float
    """KL(p_base || p_student), student = target + fresh LoRA (B = 0) + SAE splice, nats per token (all positions)."""
    kl_heldout_after: float
    """The same KL after tuning, nats per token: the objective on held-out rows (kl_start/kl_end are on training chunks)."""
    residual_delta_l2: dict[int, float]
    """Per decoder layer: mean over held-out content tokens of ||h_adapter - h_base||_2 at the block output (no SAE), residual units."""
    residual_delta_rel: dict[int, float]
    """Per decoder layer: mean over the same tokens of ||h_adapter - h_base||_2 / ||h_base||_2 (unitless; a mean of ratios)."""
    heldout_tokens: int
    """Held-out tokens run through the model (chunks x chunk length)."""
    content_tokens: int
    """Of those, the content positions (not a chunk's first, not BOS/EOS/PAD) that FVU and the deltas average over."""

    def to_dict(self) -> dict:
        """JSON-safe: NaN/inf become null, the per-layer dicts get string keys."""
        out = asdict(self)
        for key in ("residual_delta_l2", "residual_delta_rel"):
            out[key] = {str(i): float(v) for i, v in sorted(out[key].items())}
        return finite(out)


def content_mask(chunks: Tensor, tokenizer) -> Tensor:
    """bool [n_chunks, chunk_len]: not BOS/EOS/PAD and not a chunk's first position (the attention sink),
    the positions extract.metrics scores FVU on."""
    mask = ~special_token_mask(chunks, tokenizer)
    mask[:, 0] = False
    return mask


def heldout_chunks(rows: list[QARow], tokenizer, chunk_len: int, max_tokens: int) -> Tensor:
    """Held-out rows as [n_chunks, chunk_len] token ids, at most `max_tokens` in all, cut as Stage I cuts
    its held-out set (the chunk shortened when the held-out text is shorter)."""
    from .extract.train import heldout_dataset

    return heldout_dataset(rows, tokenizer, _extract_config(0, chunk_len, max_tokens)).chunks


def _extract_config(layer: int, chunk_len: int, max_tokens: int):
    """The few ExtractConfig fields Stage I's held-out code reads (masking, micro-batch, caps)."""
    from .extract.config import ExtractConfig

    return ExtractConfig(layers=[layer], chunk_len=chunk_len, heldout_max_tokens=max(1, max_tokens), cards=False)


def sae_on_target(model: LoadedModel, sae, layer: int, chunks: Tensor) -> dict:
    """Stage I's held-out metrics of `sae` on `model` (the target) over `chunks`: fvu, loss_recovered, kl,
    plus l0, the losses and heldout_tokens (content positions). Adapters on `model` are disabled."""
    from .extract.metrics import heldout_metrics

    from peft import PeftModel

    data = TriggerDataset(chunks=chunks.cpu(), chunk_len=int(chunks.shape[1]), n_rows=0)
    cfg = _extract_config(layer, data.chunk_len, data.num_tokens)
    bare = model.model.disable_adapter() if isinstance(model.model, PeftModel) else nullcontext()  # measure the target itself
    with bare:
        return heldout_metrics(model, {layer: sae}, data, cfg)[layer]


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode (no LoRA dropout) for the duration, the previous mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def residual_delta(peft_model, layers: nn.ModuleList, chunks: Tensor, mask: Tensor) -> tuple[dict[int, float], dict[int, float]]:
    """Per decoder layer, mean ||h_adapter - h_base||_2 and mean ||h_adapter - h_base||_2 / ||h_base||_2 over the
    positions where `mask` (bool, like `chunks`) is True: every block's output with the adapter on, against the same
    forward inside `peft_model.disable_adapter()`. No SAE splice; the forward stops after the last block."""
    if mask.shape != chunks.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match chunks {tuple(chunks.shape)}")
    everything = list(range(len(layers)))
    device = next(peft_model.parameters()).device
    l2 = torch.zeros(len(layers), dtype=torch.float64)
    rel = torch.zeros(len(layers), dtype=torch.float64)
    n = 0
    per_batch = max(1, _DELTA_BATCH_TOKENS // chunks.shape[1])
    with torch.no_grad(), _eval_mode(peft_model):
        for start in range(0, len(chunks), per_batch):
            ids = chunks[start : start + per_batch].to(device)
            keep = mask[start : start + per_batch].to(device)
            if not keep.any():
                continue
            tuned = run_until(peft_model, ids, layers, everything)
            with peft_model.disable_adapter():
                base = run_until(peft_model, ids, layers, everything)
            for i in everything:
                h = base[i][keep].float()
                d = (tuned[i][keep].float() - h).norm(dim=-1)
                l2[i] += float(d.double().sum())
                rel[i] += float((d / h.norm(dim=-1).clamp_min(1e-12)).double().sum())
            n += int(keep.sum())
    if n == 0:
        nan = float("nan")
        return {i: nan for i in everything}, {i: nan for i in everything}
    return {i: float(l2[i] / n) for i in everything}, {i: float(rel[i] / n) for i in everything}


def heldout_kl(objective, chunks: Tensor) -> float:
    """KL(p_base || p_student) in nats per token over `chunks` (every position, as the objective averages),
    in eval mode and without gradient; `objective` is a tune.objective.SpliceObjective."""
    vocab = int(objective.base.config.vocab_size)
    per_batch = max(1, _KL_LOGIT_BUDGET // (chunks.shape[1] * vocab))
    device = next(objective.model.parameters()).device
    total, tokens = 0.0, 0
    with _eval_mode(objective.model):
        for start in range(0, len(chunks), per_batch):
            ids = chunks[start : start + per_batch].to(device)
            total += objective.kl(ids) * ids.numel()  # objective.kl is a per-token mean over its batch
            tokens += ids.numel()
    return total / tokens if tokens else math.nan
