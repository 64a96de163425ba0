"""What CLI verbs share: the settings, the store, the registry, model loading and progress bars."""

from __future__ import annotations

import hashlib
import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from app.settings import get_settings


def store():
    return get_settings().open_store()


def registry():
    from resa_engine.models import ModelRegistry

    return ModelRegistry.load(get_settings().models_file)


def load(name_or_path: str):
    """A registered model name or a local path (the CLI accepts both)."""
    from resa_engine.models import load_model

    s = get_settings()
    spec = registry().resolve(name_or_path, allow_path=True)
    return load_model(spec, device=s.device, cache_dir=s.cache_dir)


class ProgressBar:
    """An engine progress callback drawn with tqdm, one bar per stage."""

    def __init__(self, unit: str = "it"):
        self.unit, self.bar, self.stage = unit, None, None

    def __call__(self, p) -> None:
        from tqdm import tqdm

        if p.stage != self.stage:
            self.close()
            self.stage = p.stage
            self.bar = tqdm(total=p.total, desc=p.stage, unit=self.unit, file=sys.stderr, dynamic_ncols=True)
        self.bar.n = p.step
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in p.metrics.items()}, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


@contextmanager
def stored_rows(store, rows) -> Iterator[str]:
    """The rows stored as a dataset for one run (its id); removed again when the run fails and the rows were
    new, so a failed run leaves the store as it found it."""
    from resa_engine.data import rows_to_jsonl

    jsonl = rows_to_jsonl(rows)
    existed = store.has_dataset(hashlib.sha256(jsonl).hexdigest())
    sha = store.put_dataset(jsonl, len(rows)).sha256
    try:
        yield sha
    except BaseException:
        if not existed:
            store.delete_dataset(sha)
        raise


def run_task(task, params: dict, ctx, rows=None) -> dict:
    """Run a task function in this process: `rows` (if any) stored as its dataset for the run, the
    context's progress bar closed whatever happens."""
    try:
        if rows is None:
            return task(params, ctx)
        with stored_rows(ctx.store, rows) as params["dataset"]:
            return task(params, ctx)
    finally:
        ctx.progress.close()
