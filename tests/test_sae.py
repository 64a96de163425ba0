"""The SAE at the hookpoint: the one splice (encode -> edit -> decode [+ error]), latent edits, and the
per-request SaeSplice the engines apply (steering and splice mode), checked against the long way
(tests/_reference.py decodes the whole edited code) and against the decoder-row formulas."""

from __future__ import annotations

import pytest
import torch

from _helpers_sae import block_code, prompt_tensor, seeded_sae
from _reference import make_edit_fn, reference_splice
from resa_engine.sae.edits import LatentEdit, check_edits
from resa_engine.sae.hooks import capture_residual
from resa_engine.sae.splice import SaeSplice, splice, splice_sae


LAYER = 1
PROMPT = "What is 12 + 30?"


@pytest.fixture(scope="module")
def sae():
    return seeded_sae()


def test_no_edit_splice_reproduces_clean_logits(tiny_llama, sae):
    ids = prompt_tensor(tiny_llama, PROMPT)
    with torch.no_grad():
        clean = tiny_llama.model(input_ids=ids).logits
        with splice_sae(tiny_llama.layers, LAYER, sae, edits=[], keep_error=True):
            spliced = tiny_llama.model(input_ids=ids).logits
        with splice_sae(tiny_llama.layers, LAYER, sae):
            lossy = tiny_llama.model(input_ids=ids).logits
    torch.testing.assert_close(spliced, clean, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lossy, clean, atol=1e-3)  # the splice is live: without the error term it changes logits


def _spliced_block_output(model, sae, ids, edits):
    """Block output after the splice hook: capture registered second, so it sees the edited output."""
    with torch.no_grad(), splice_sae(model.layers, LAYER, sae, edits=edits, keep_error=True):
        with capture_residual(model.layers, [LAYER]) as cap:
            model.model(input_ids=ids)
    return cap[LAYER]


def test_clamp_moves_block_output_along_the_latent_decoder_row(tiny_llama, sae):
    """Measured effect of a clamp: with keep_error the block output moves by exactly
    (value - a) * W_dec[latent], where a is the latent's own activation (0 where absent). This is
    what steering means on the decoder side and holds for any SAE; re-encoding the edited output is
    not a reliable check (the encoder is not the decoder's inverse, least of all for an untrained SAE).
    """
    ids = prompt_tensor(tiny_llama, PROMPT)
    with torch.no_grad():
        h, acts, indices = block_code(tiny_llama, sae, ids, LAYER)
    present = indices[0, 0, 0].item()  # active at token 0
    absent = next(i for i in range(128) if not (indices[0] == i).any())  # active nowhere in the prompt
    for latent in (present, absent):
        own = torch.where(indices == latent, acts, torch.zeros_like(acts)).sum(-1)  # [1, T]
        out = _spliced_block_output(tiny_llama, sae, ids, [LatentEdit(latent, "clamp", 5.0)])
        expected = h + (5.0 - own)[..., None] * sae.W_dec[latent]
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_clamp_sets_the_code_activation(sae):
    x = torch.randn(6, 64)
    acts, indices, _ = sae.encode(x)
    latent = indices[0, 0].item()
    new_acts, new_indices = make_edit_fn([LatentEdit(latent, "clamp", 3.5)])(acts, indices)
    assert new_indices.shape == (6, 9) and new_acts.shape == (6, 9)
    per_token = torch.where(new_indices == latent, new_acts, torch.zeros_like(new_acts)).sum(-1)
    torch.testing.assert_close(per_token, torch.full((6,), 3.5))  # present or appended, the latent holds exactly 3.5


def test_add_and_scale(sae):
    x = torch.randn(10, 64)
    acts, indices, _ = sae.encode(x)
    base = sae.decode(acts, indices)
    latent = indices[0, 0].item()
    own = torch.where(indices == latent, acts, torch.zeros_like(acts)).sum(-1)
    assert (own == 0).any() and (own > 0).any(), "need tokens with and without the latent"

    added = splice(sae, x, [LatentEdit(latent, "add", 2.0)])
    torch.testing.assert_close(added - base, 2.0 * sae.W_dec[latent].expand(10, 64), rtol=1e-4, atol=1e-5)

    s_acts, s_indices = make_edit_fn([LatentEdit(latent, "scale", 3.0)])(acts, indices)
    assert s_indices.shape == indices.shape  # absent stays absent: no column appended
    scaled = splice(sae, x, [LatentEdit(latent, "scale", 3.0)])
    torch.testing.assert_close(scaled, sae.decode(s_acts, s_indices), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scaled - base, (2.0 * own)[:, None] * sae.W_dec[latent], rtol=1e-4, atol=1e-5)

    off = splice(sae, x, [LatentEdit(latent, "scale", 0.0)])
    torch.testing.assert_close(off - base, -own[:, None] * sae.W_dec[latent], rtol=1e-4, atol=1e-5)


def test_edits_compose_over_several_latents(sae):
    x = torch.randn(4, 64)
    acts, indices, _ = sae.encode(x)
    base = sae.decode(acts, indices)
    edits = [LatentEdit(3, "add", 1.0), LatentEdit(7, "add", -0.5)]
    out = splice(sae, x, edits)
    torch.testing.assert_close(out, reference_splice(sae, x, edits), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out - base, (sae.W_dec[3] - 0.5 * sae.W_dec[7]).expand(4, 64), rtol=1e-4, atol=1e-5)


def test_steering_equals_the_spliced_edit_with_error_term(tiny_llama, sae):
    """The engines' SaeSplice (decoder-row deltas) computes exactly the splice with keep_error, decoded the long way."""
    ids = prompt_tensor(tiny_llama, PROMPT)
    with torch.no_grad():
        h, _, indices = block_code(tiny_llama, sae, ids, LAYER)
    present = indices[0, 0, 0].item()
    edits = [LatentEdit(present, "clamp", 4.0), LatentEdit(11, "add", -1.5), LatentEdit(indices[0, 1, 0].item(), "scale", 0.25)]
    expected = _spliced_block_output(tiny_llama, sae, ids, edits)
    torch.testing.assert_close(expected, reference_splice(sae, h, edits, keep_error=True), rtol=1e-4, atol=1e-4)
    steered = SaeSplice(sae, LAYER, edits).apply(h)
    assert steered.shape == h.shape and steered.dtype == h.dtype
    torch.testing.assert_close(steered, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(steered, h, atol=1e-3)
    assert SaeSplice(sae, LAYER, []).apply(h) is h  # no edits: the residual is untouched


def test_sae_splice_refuses_bad_edits(sae):
    with pytest.raises(ValueError, match="out of range"):
        SaeSplice(sae, LAYER, [LatentEdit(500, "add", 1.0)])
    with pytest.raises(ValueError, match="more than once"):
        SaeSplice(sae, LAYER, [LatentEdit(5, "add", 1.0), LatentEdit(5, "scale", 2.0)])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: LatentEdit(1, "boost", 1.0), "unknown edit mode"),
        (lambda: LatentEdit(-1, "clamp", 1.0), "non-negative"),
        (lambda: LatentEdit(1, "add", float("nan")), "finite"),
        (lambda: LatentEdit(1, "add", 1e300), "beyond"),
        (lambda: check_edits([LatentEdit(128, "clamp", 1.0)], num_latents=128), "out of range"),
        (lambda: check_edits([LatentEdit(5, "clamp", 1.0), LatentEdit(5, "add", 1.0)]), "more than once"),
    ],
)
def test_bad_edits_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()
