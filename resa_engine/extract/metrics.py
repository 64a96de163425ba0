"""Stage I held-out metrics: FVU, L0, and the model's next-token loss with the SAE spliced in,
against clean and zero-ablated (loss recovered), plus KL(clean || spliced)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import TriggerDataset
from ..models import LoadedModel
from ..progress import ProgressFn, ProgressTracker, StopFn
from ..sae.hooks import capture_residual, zero_ablate
from ..sae.splice import splice_sae
from .config import ExtractConfig
from .train import training_positions

# Held-out logits are materialised per batch; keep a batch under ~2**28 floats (1 GiB fp32).
_HELDOUT_LOGIT_BUDGET = 2**28


def _next_token_logprobs(lm, ids: Tensor) -> Tensor:
    return F.log_softmax(lm(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)


class _FVU:
    """Fraction of variance unexplained over all tokens fed to it, around their global mean."""

    def __init__(self):
        self.err, self.sq, self.sum, self.n, self.l0 = 0.0, 0.0, None, 0, 0.0

    def update(self, x: Tensor, recon: Tensor, active: Tensor) -> None:
        xd = x.double()
        self.err += float((xd - recon.double()).pow(2).sum())
        self.sq += float(xd.pow(2).sum())
        self.sum = xd.sum(0) if self.sum is None else self.sum + xd.sum(0)
        self.n += x.shape[0]
        self.l0 += float(active.sum())

    @property
    def value(self) -> float:
        if not self.n:
            return float("nan")
        total_var = self.sq - float(self.sum.pow(2).sum()) / self.n
        return self.err / total_var if total_var > 0 else float("nan")


@torch.no_grad()
def heldout_metrics(model: LoadedModel, saes: dict[int, Any], data: TriggerDataset, cfg: ExtractConfig,
                    progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> dict[int, dict]:
    """Per layer on held-out chunks: FVU, L0, and next-token loss clean / spliced / zero-ablated.

    `fvu` and `l0` cover content positions: not BOS/EOS/PAD and not a chunk's first position,
    which acts as the attention sink (its norm is ~100x the rest in mid layers and would
    otherwise make up most of the variance); `fvu_all` keeps first positions, as training
    does. The losses splice every position, as Stage II does.
    """
    lm, blocks, layers = model.model, model.layers, sorted(saes)
    vocab = int(model.config.vocab_size)
    hb = max(1, min(16, _HELDOUT_LOGIT_BUDGET // (data.chunk_len * vocab)))
    fvu_content = {i: _FVU() for i in layers}
    fvu_all = {i: _FVU() for i in layers}
    nll = {i: dict(spliced=0.0, zero=0.0, kl=0.0) for i in layers}
    nll_clean, n_pred = 0.0, 0
    tracker = ProgressTracker("heldout", data.num_tokens, progress, should_stop)
    done = 0
    for _, ids in data.batches(hb):
        ids = ids.to(model.device)
        targets = ids[:, 1:].unsqueeze(-1)
        keep = training_positions(ids, model.tokenizer, cfg)
        first = (torch.arange(ids.shape[1], device=ids.device) == 0).expand_as(ids).flatten()[keep]
        with capture_residual(blocks, layers) as captured:
            logp_clean = _next_token_logprobs(lm, ids)
        nll_clean += float(-logp_clean.gather(-1, targets).sum())
        n_pred += targets.numel()
        for i in layers:
            sae = saes[i]
            x = captured[i].flatten(0, 1)[keep].float()
            for part, is_first in zip(x.split(cfg.micro_batch_tokens), first.split(cfg.micro_batch_tokens)):
                top_acts, top_idx, _ = sae.encode(part)
                recon = sae.decode(top_acts, top_idx)
                active = (top_acts > 0).sum(-1)
                fvu_all[i].update(part, recon, active)
                fvu_content[i].update(part[~is_first], recon[~is_first], active[~is_first])
            with splice_sae(blocks, i, sae):
                logp = _next_token_logprobs(lm, ids)
            nll[i]["spliced"] += float(-logp.gather(-1, targets).sum())
            # KL(clean || spliced) = sum_v p_clean (log p_clean - log p_spliced), summed over positions
            nll[i]["kl"] += float(F.kl_div(logp, logp_clean, log_target=True, reduction="sum"))
            del logp
            with zero_ablate(blocks, i):
                logp = _next_token_logprobs(lm, ids)
            nll[i]["zero"] += float(-logp.gather(-1, targets).sum())
            del logp
        done += ids.numel()
        tracker.update(done)
    out = {}
    for i in layers:
        fvu = fvu_content[i].value
        clean, spliced, zero = nll_clean / n_pred, nll[i]["spliced"] / n_pred, nll[i]["zero"] / n_pred
        recovered = (zero - spliced) / (zero - clean) if abs(zero - clean) > 1e-12 else None
        out[i] = {
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "fvu_all": fvu_all[i].value,
            "l0": fvu_content[i].l0 / fvu_content[i].n if fvu_content[i].n else 0.0,
            "loss_clean": clean,
            "loss_spliced": spliced,
            "loss_zero": zero,
            "loss_recovered": recovered,
            "kl": nll[i]["kl"] / n_pred,
            "heldout_tokens": fvu_content[i].n,
        }
    return out
