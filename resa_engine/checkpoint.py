"""One checkpoint format for every resumable loop (SAE extraction, adapter tuning).

A checkpoint is a folder holding one safetensors file of named tensors (weights, optimizer
state, counters, RNG state) and `state.json`, written last, which names that file and carries
the JSON side (step, figures, optimizer param groups and scalars). A crash mid-save leaves the
previous checkpoint intact. Every checkpoint carries the run's key: a checkpoint made for
another run (other data, config, model) is ignored. Never pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

STATE_FILE = "state.json"


class Checkpoint:
    """The checkpoint folder of one run, identified by `key`."""

    def __init__(self, folder: Path | str, key: str):
        self.folder, self.key = Path(folder), key

    def save(self, step: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Write the tensors, then `state.json` naming them; older tensor files are removed afterwards."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"state-{step:09d}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.folder / name)
        tmp_meta = self.folder / f".{STATE_FILE}.tmp"
        tmp_meta.write_text(json.dumps({**meta, "key": self.key, "step": step, "tensors": name}))
        os.replace(tmp_meta, self.folder / STATE_FILE)
        for old in self.folder.glob("state-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def load(self, device: torch.device | str = "cpu") -> tuple[dict[str, Any], dict[str, Tensor]] | None:
        """(meta, tensors) of this run's checkpoint, or None when there is none (or only another run's)."""
        from safetensors.torch import load_file

        try:
            meta = json.loads((self.folder / STATE_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if meta.get("key") != self.key or not (self.folder / str(meta.get("tensors", ""))).is_file():
            return None
        return meta, load_file(str(self.folder / meta["tensors"]), device=str(device))


def optimizer_state(optimizer: torch.optim.Optimizer, prefix: str = "opt.") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer's state as (tensors, JSON): tensors by `<prefix><param index>.<name>`, the rest as JSON."""
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], saved: dict[str, Any], prefix: str = "opt.") -> None:
    """The inverse of `optimizer_state` (tuples in param groups, e.g. Adam's betas, come back as tuples)."""
    fresh = optimizer.state_dict()
    groups = []
    for new, old in zip(fresh["param_groups"], saved["param_groups"]):
        merged = dict(new)
        for k, v in old.items():
            merged[k] = tuple(v) if isinstance(new.get(k), tuple) else v
        groups.append(merged)
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith(prefix):
            idx, key = name[len(prefix) :].split(".", 1)
            state.setdefault(int(idx), {})[key] = t
    for idx, scalars in saved.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> dict[str, Tensor]:
    """Torch's RNG state (CPU, and CUDA when present), so a resumed run draws the same dropout masks."""
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"].cpu())
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"].cpu())
