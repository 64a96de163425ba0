"""The Stage II objective (paper §3, authors' code): the target with the skill's frozen SAE spliced in
after block i (the student, target + LoRA) is trained to match the target without it (the teacher):

  loss = KL(p_base || p_student), summed over the vocabulary, mean over token positions
  p_base    = target, adapter disabled, no splice, no grad
  p_student = target + LoRA, block i output replaced by splice(SAE, h_i) = decode(encode(h_i))

In the authors' code the splice runs under no_grad, so LoRA on blocks <= i never gets a gradient,
keeps B = 0 and computes exactly what the frozen target computes. The student then reuses the
teacher's h_i and runs only blocks i+1.. (same numbers, a cheaper step). With `splice_grad` the SAE
is differentiable and every adapter learns; the student runs in full. `objective="ce"` is the
paper-text variant: next-token cross-entropy with the splice in; `objective="sft"` is the SFT baseline
control (the same LoRA and data, cross-entropy, no SAE).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import decoder_layers
from ..sae.hooks import capture_residual, run_until
from ..sae.splice import splice, splice_sae


class StepLoss(NamedTuple):
    loss: Tensor
    """The objective to backpropagate (KL or CE)."""
    kl: float
    """KL(p_base || p_student) per token, nats (NaN for `ce` and `sft` steps, which skip the teacher)."""
    recon_mse: float
    """Mean squared error of the SAE reconstruction at the splice (NaN for `sft`, which has none)."""


class _Skip(nn.Module):
    """Stands in for a block whose output the student takes from the teacher."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Inject(nn.Module):
    """Stands in for block i: returns the (spliced) hidden state computed beforehand."""

    def __init__(self, hidden: Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return self.hidden


class SpliceObjective:
    """The Stage II loss of one batch for a LoRA-wrapped target with the SAE spliced after `layer`."""

    def __init__(self, peft_model, sae, layer: int, *, objective: str = "kl", splice_grad: bool = False):
        self.model, self.sae, self.layer = peft_model, sae, layer
        self.objective, self.splice_grad = objective, splice_grad
        self.base = peft_model.get_base_model()
        self.layers = decoder_layers(self.base)
        # Blocks <= layer get no gradient without splice_grad, so their LoRA stays exactly zero.
        self.reuse_prefix = not splice_grad

    def __call__(self, input_ids: Tensor) -> StepLoss:
        if self.objective == "ce":
            return self._ce(input_ids)
        if self.objective == "sft":
            return self._sft(input_ids)
        return self._kl(input_ids)

    def kl(self, input_ids: Tensor) -> float:
        """KL(p_base || p_student) per token for a batch, without gradient."""
        with torch.no_grad():
            return self._kl(input_ids).kl

    def _teacher(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Base log-probs (adapter off, no splice) and the block-i output, no grad."""
        with torch.no_grad(), self.model.disable_adapter(), capture_residual(self.layers, [self.layer]) as cap:
            logits = self.model(input_ids=input_ids, use_cache=False).logits
            return F.log_softmax(logits.float(), dim=-1), cap[self.layer]

    def _student_logits(self, input_ids: Tensor, h: Tensor | None) -> tuple[Tensor, float]:
        """Student logits with block i's output replaced by SAE(h_i), and the reconstruction MSE."""
        if self.reuse_prefix:
            if h is None:
                with torch.no_grad(), self.model.disable_adapter():
                    h = run_until(self.model, input_ids, self.layers, [self.layer])[self.layer]
            with torch.no_grad():
                recon = splice(self.sae, h)
                mse = float((recon.float() - h.float()).pow(2).mean())
            return self._suffix_logits(input_ids, recon), mse
        with capture_residual(self.layers, [self.layer]) as cap, splice_sae(self.layers, self.layer, self.sae, grad=self.splice_grad):
            logits = self.model(input_ids=input_ids, use_cache=False).logits
        with torch.no_grad():
            h = cap[self.layer]
            mse = float((splice(self.sae, h).float() - h.float()).pow(2).mean())
        return logits, mse

    def _suffix_logits(self, input_ids: Tensor, recon: Tensor) -> Tensor:
        """Run only blocks i+1.. on the spliced hidden state (blocks <= i are skipped, not recomputed)."""
        inner = self.base.model
        original = inner.layers
        skip = _Skip()
        inner.layers = nn.ModuleList([skip] * self.layer + [_Inject(recon)] + list(original)[self.layer + 1 :])
        try:
            return self.model(input_ids=input_ids, use_cache=False).logits
        finally:
            inner.layers = original

    def _kl(self, input_ids: Tensor) -> StepLoss:
        base_logp, h = self._teacher(input_ids)
        logits, mse = self._student_logits(input_ids, h)
        student_logp = F.log_softmax(logits.float(), dim=-1)
        # sum over the vocabulary, mean over token positions (authors' code)
        kl = F.kl_div(student_logp, base_logp, log_target=True, reduction="sum") / (input_ids.numel())
        return StepLoss(kl, float(kl.detach()), mse)

    def _ce(self, input_ids: Tensor) -> StepLoss:
        logits, mse = self._student_logits(input_ids, None)
        return StepLoss(_next_token_ce(logits, input_ids), float("nan"), mse)

    def _sft(self, input_ids: Tensor) -> StepLoss:
        """The SFT baseline control: the same LoRA and data, next-token CE, no SAE anywhere."""
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        return StepLoss(_next_token_ce(logits, input_ids), float("nan"), float("nan"))


def _next_token_ce(logits: Tensor, input_ids: Tensor) -> Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))
