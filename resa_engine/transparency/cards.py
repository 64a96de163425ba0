"""Latent cards: what each latent of a layer's SAE responds to over a corpus (density, mean
activation, top-activating contexts), computed in one pass and stored as `sae/layers.<i>/latents.json`."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..data import special_token_mask
from ..models import LoadedModel
from .inspect import check_sae, encode_layer, token_text

CARDS_FILE = "latents.json"
CARDS_FORMAT = "resa.latent_cards"
CARDS_VERSION = 1
FIRING_OPEN, FIRING_CLOSE = "«", "»"


@dataclass
class LatentContext:
    """One top-activating occurrence of a latent: a token window around the firing token."""

    chunk: int
    """Row of `token_chunks` the token is in."""
    position: int
    """Position of the firing token inside that chunk."""
    activation: float
    """The latent's activation at that token."""
    token_id: int
    """Vocabulary id of the firing token."""
    token: str
    """The firing token as text."""
    before: str
    """Up to `window` tokens before it, as text."""
    after: str
    """Up to `window` tokens after it, as text."""

    @property
    def text(self) -> str:
        """The window with the firing token marked: `before «token» after`."""
        return f"{self.before}{FIRING_OPEN}{self.token}{FIRING_CLOSE}{self.after}"

    def to_dict(self) -> dict:
        return {**self.__dict__, "text": self.text}

    @classmethod
    def from_dict(cls, d: dict) -> "LatentContext":
        return cls(
            chunk=int(d["chunk"]),
            position=int(d["position"]),
            activation=float(d["activation"]),
            token_id=int(d["token_id"]),
            token=str(d["token"]),
            before=str(d["before"]),
            after=str(d["after"]),
        )


@dataclass
class LatentCard:
    """What one latent responds to over a corpus."""

    index: int
    """Latent index in the SAE."""
    density: float
    """Fraction of counted tokens where the latent is active (0 = dead)."""
    mean_activation: float
    """Mean activation over the tokens where it is active (0 when dead)."""
    contexts: list[LatentContext] = field(default_factory=list)
    """Top-activating contexts, strongest first."""

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "density": self.density,
            "mean_activation": self.mean_activation,
            "contexts": [c.to_dict() for c in self.contexts],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LatentCard":
        return cls(
            index=int(d["index"]),
            density=float(d["density"]),
            mean_activation=float(d["mean_activation"]),
            contexts=[LatentContext.from_dict(c) for c in d.get("contexts", [])],
        )


@dataclass
class LatentCards:
    """Cards for the live latents of one layer's SAE; dead latents (density 0) have none."""

    layer: int
    """Hookpoint layer of the SAE."""
    num_latents: int
    """Latents in the SAE (live and dead)."""
    k: int
    """The SAE's top-k."""
    num_tokens: int
    """Tokens counted (non-special unless a mask said otherwise)."""
    window: int
    """Tokens kept on each side of a firing token in contexts."""
    cards: dict[int, LatentCard]
    """Latent index -> card, live latents only."""

    @property
    def live(self) -> int:
        return len(self.cards)

    @property
    def dead_fraction(self) -> float:
        return 1.0 - self.live / self.num_latents if self.num_latents else 0.0

    def card(self, index: int) -> LatentCard:
        """The card of a latent; a dead latent gets an empty card (density 0, no contexts)."""
        if not isinstance(index, int) or not 0 <= index < self.num_latents:
            raise ValueError(f"latent {index} is out of range (SAE has {self.num_latents} latents: 0..{self.num_latents - 1})")
        return self.cards.get(index) or LatentCard(index=index, density=0.0, mean_activation=0.0)

    def to_dict(self) -> dict:
        return {
            "format": CARDS_FORMAT,
            "version": CARDS_VERSION,
            "layer": self.layer,
            "num_latents": self.num_latents,
            "k": self.k,
            "num_tokens": self.num_tokens,
            "window": self.window,
            "live": self.live,
            "dead_fraction": self.dead_fraction,
            "cards": [self.cards[i].to_dict() for i in sorted(self.cards)],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LatentCards":
        if not isinstance(d, dict) or d.get("format") != CARDS_FORMAT:
            raise ValueError(f"not a latent cards document (expected format {CARDS_FORMAT!r})")
        if d.get("version") != CARDS_VERSION:
            raise ValueError(f"latent cards version {d.get('version')!r} is not supported (expected {CARDS_VERSION})")
        try:
            cards = [LatentCard.from_dict(c) for c in d["cards"]]
            return cls(
                layer=int(d["layer"]),
                num_latents=int(d["num_latents"]),
                k=int(d["k"]),
                num_tokens=int(d["num_tokens"]),
                window=int(d["window"]),
                cards={c.index: c for c in cards},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed latent cards document: {exc!r}") from None


def _merge_top(
    top_vals: Tensor, top_locs: Tensor, latents: Tensor, vals: Tensor, locs: Tensor
) -> tuple[Tensor, Tensor]:
    """Running top-N per latent: merge new (latent, activation, location) triples into [F, N] tables.

    Vectorised group-wise top-N: sort by activation (descending), then stably by latent, and keep
    the first N of each latent's run. Earlier entries win ties, so the result is deterministic.
    """
    num_latents, n = top_vals.shape
    held = top_vals.flatten() > -math.inf
    all_lat = torch.cat([torch.arange(num_latents, device=latents.device).repeat_interleave(n)[held], latents])
    all_val = torch.cat([top_vals.flatten()[held], vals])
    all_loc = torch.cat([top_locs.flatten()[held], locs])
    order = torch.sort(all_val, descending=True, stable=True).indices
    order = order[torch.sort(all_lat[order], stable=True).indices]
    lat, val, loc = all_lat[order], all_val[order], all_loc[order]
    counts = torch.bincount(lat, minlength=num_latents)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(lat.numel(), device=lat.device) - starts[lat]
    keep = rank < n
    new_vals = torch.full_like(top_vals, -math.inf)
    new_locs = torch.full_like(top_locs, -1)
    new_vals[lat[keep], rank[keep]] = val[keep]
    new_locs[lat[keep], rank[keep]] = loc[keep]
    return new_vals, new_locs


@torch.no_grad()
def latent_cards(
    model: LoadedModel,
    sae,
    layer: int,
    token_chunks: Tensor,
    tokenizer,
    *,
    top_contexts: int = 5,
    window: int = 8,
    mask: Tensor | None = None,
    batch_size: int = 8,
    progress=None,
) -> LatentCards:
    """Density, mean activation and top contexts of every live latent, in one pass over `token_chunks`.

    token_chunks: LongTensor [n, L] (e.g. `TriggerDataset.chunks`). mask: BoolTensor [n, L], True
    where a token counts; default every token that is not BOS/EOS/PAD (the SAE never trained on
    those). Memory stays bounded: per latent only a running top-`top_contexts` table of
    (activation, location) tensors is kept. progress: an optional ProgressTracker (step = chunks done).
    """
    layer = check_sae(model, sae, layer)
    if not isinstance(token_chunks, Tensor) or token_chunks.dim() != 2 or token_chunks.dtype != torch.long:
        raise ValueError("token_chunks must be a LongTensor [n_chunks, chunk_len]")
    if token_chunks.numel() == 0:
        raise ValueError("token_chunks is empty")
    if top_contexts < 1 or window < 0 or batch_size < 1:
        raise ValueError("top_contexts and batch_size must be at least 1 and window at least 0")
    n_chunks, chunk_len = token_chunks.shape
    if mask is None:
        mask = ~special_token_mask(token_chunks, tokenizer)
    elif mask.shape != token_chunks.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a BoolTensor of shape {tuple(token_chunks.shape)}")

    # Running statistics live next to the SAE (GPU when there is one); all are O(num_latents).
    dev, num_latents = sae.device, int(sae.num_latents)
    counts = torch.zeros(num_latents, dtype=torch.long, device=dev)
    sums = torch.zeros(num_latents, dtype=torch.float64, device=dev)
    top_vals = torch.full((num_latents, top_contexts), -math.inf, device=dev)
    top_locs = torch.full((num_latents, top_contexts), -1, dtype=torch.long, device=dev)
    for start in range(0, n_chunks, batch_size):
        ids = token_chunks[start : start + batch_size]
        acts, indices = encode_layer(model, sae, layer, ids)
        active = (acts > 0) & mask[start : start + batch_size, :, None].to(dev)
        b, t, k = acts.shape
        # Global token location = chunk * L + position, the same for every slot of that token.
        pos = torch.arange(start, start + b, device=dev)[:, None] * chunk_len + torch.arange(t, device=dev)[None, :]
        locs = pos[..., None].expand(b, t, k)
        lat, val, loc = indices[active], acts[active], locs[active]
        counts += torch.bincount(lat, minlength=num_latents)
        sums.index_add_(0, lat, val.double())
        top_vals, top_locs = _merge_top(top_vals, top_locs, lat, val, loc)
        if progress is not None:
            progress.update(start + b)

    num_tokens = int(mask.sum())
    counts, sums, top_vals, top_locs = counts.cpu(), sums.cpu(), top_vals.cpu(), top_locs.cpu()
    cards = {}
    for i in torch.nonzero(counts).flatten().tolist():
        contexts = []
        for val, loc in zip(top_vals[i].tolist(), top_locs[i].tolist()):
            if loc < 0:
                break
            chunk, pos = divmod(loc, chunk_len)
            lo = max(0, pos - window)
            span = token_chunks[chunk, lo : pos + 1 + window].tolist()
            token_id = span[pos - lo]
            contexts.append(
                LatentContext(
                    chunk=chunk,
                    position=pos,
                    activation=float(val),
                    token_id=token_id,
                    token=token_text(tokenizer, token_id),
                    before=tokenizer.decode(span[: pos - lo]),
                    after=tokenizer.decode(span[pos - lo + 1 :]),
                )
            )
        cards[i] = LatentCard(
            index=i,
            density=int(counts[i]) / num_tokens if num_tokens else 0.0,
            mean_activation=float(sums[i] / counts[i]),
            contexts=contexts,
        )
    return LatentCards(layer=layer, num_latents=num_latents, k=int(sae.cfg.k), num_tokens=num_tokens, window=window, cards=cards)


def save_cards(cards: LatentCards, folder: Path | str) -> Path:
    """Write `<folder>/latents.json` atomically (next to the layer's cfg.json + sae.safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CARDS_FILE
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".latents-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(cards.to_dict(), fh, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_cards(folder: Path | str) -> LatentCards:
    """Read `<folder>/latents.json`; a missing or malformed file is a clear error."""
    path = Path(folder) / CARDS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no latent cards at {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    try:
        return LatentCards.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
