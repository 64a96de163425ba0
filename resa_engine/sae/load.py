"""Loading a frozen SAE from a sparsify folder (cfg.json + sae.safetensors)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path


def import_sparsify():
    """sparsify prints a notice on stdout at import; keep stdout clean for `--json` output. On a machine
    without CUDA its Triton decoder cannot run (vLLM's dependencies install triton): use the eager one."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    with contextlib.redirect_stdout(sys.stderr):
        import sparsify
    return sparsify


def load_sae(folder: Path | str, *, device="cpu"):
    """`sparsify.SparseCoder.load_from_disk`, frozen and in eval mode."""
    sae = import_sparsify().SparseCoder.load_from_disk(Path(folder), device=device)
    sae.requires_grad_(False)
    return sae.eval()
