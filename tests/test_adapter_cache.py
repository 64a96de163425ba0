"""The adapter cache: lazy loads off the decode loop, LRU eviction that never hits an adapter in
use or a pinned one, and clear errors for adapters that do not fit the model."""

from __future__ import annotations

import json
import threading

import pytest

import torch

from _helpers_serving import load_private, make_lora, reference_greedy, reference_model
from resa_engine.engine.native import Scheduler
from resa_engine.errors import AdapterCacheFull, AdapterMismatch
from resa_engine.lora.bank import LoraBank
from resa_engine.lora.cache import AdapterCache
from resa_engine.lora.peft_io import PeftAdapter
from resa_engine.sampling import SamplingParams

WAIT = 60


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_private(tiny_llama_dir)


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-adapters")
    return {k: make_lora(tiny_llama_dir, root / k, seed=i) for i, k in enumerate("abcd", start=10)}


@pytest.fixture
def make_cache(model):
    made = []

    def make(loader, capacity: int) -> AdapterCache:
        made.append(AdapterCache(model, loader, capacity=capacity))
        return made[-1]

    yield make
    for cache in made:
        cache.close()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0)


def test_loads_on_first_use_and_reuses_the_loaded_copy(make_cache, adapter_dirs):
    calls = []

    def loader(key):
        calls.append(key)
        return adapter_dirs[key]

    cache = make_cache(loader, capacity=2)
    first = cache.acquire("a")
    slot = first.wait(WAIT)
    second = cache.acquire("a")
    assert second.ready and second.slot == slot and calls == ["a"]
    assert first.info.rank == 8 and first.info.modules == 7 * 4
    assert cache.stats().in_use == {"a": 2}
    first.release()
    second.release()
    first.release()  # releasing twice is harmless
    assert cache.stats().in_use == {} and cache.resident() == ["a"]


def test_in_use_adapter_is_never_evicted_new_one_waits_for_a_slot(make_cache, adapter_dirs):
    cache = make_cache(adapter_dirs.__getitem__, capacity=1)
    a = cache.acquire("a")
    a.wait(WAIT)
    b = cache.acquire("b")
    stats = cache.stats()
    assert stats.waiting == ["b"] and stats.resident == ["a"] and not b.ready
    a.release()  # the only slot frees up: b takes it, a is evicted
    b.wait(WAIT)
    stats = cache.stats()
    assert stats.resident == ["b"] and stats.evictions == 1
    b.release()


def test_pinned_adapter_is_never_evicted(make_cache, adapter_dirs):
    cache = make_cache(adapter_dirs.__getitem__, capacity=2)
    cache.pin("a", wait=WAIT)
    for key in ("b", "c", "d"):
        ref = cache.acquire(key)
        ref.wait(WAIT)
        ref.release()
    assert set(cache.resident()) == {"a", "d"}
    assert cache.stats().pinned == ["a"]
    cache.unpin("a")
    ref = cache.acquire("b")
    ref.wait(WAIT)
    ref.release()
    assert set(cache.resident()) == {"d", "b"}  # a was least recently used once unpinned


def test_all_slots_pinned_is_a_clear_error(make_cache, adapter_dirs):
    cache = make_cache(adapter_dirs.__getitem__, capacity=1)
    cache.pin("a", wait=WAIT)
    with pytest.raises(AdapterCacheFull, match="pinned"):
        cache.acquire("b")
    ref = cache.acquire("a")  # the pinned one itself is still served
    assert ref.wait(WAIT) >= 0


def test_waiting_adapter_with_no_users_left_stops_waiting(make_cache, adapter_dirs):
    cache = make_cache(adapter_dirs.__getitem__, capacity=1)
    a = cache.acquire("a")
    b = cache.acquire("b")
    assert cache.stats().waiting == ["b"]
    b.release()  # e.g. its only request was cancelled while queued
    assert cache.stats().waiting == []
    a.wait(WAIT)
    a.release()
    assert cache.resident() == ["a"] and cache.stats().loads == 1


def test_incompatible_adapter_names_the_mismatch(make_cache, tiny_qwen_dir, tmp_path):
    qwen_lora = make_lora(tiny_qwen_dir, tmp_path / "qwen", seed=0)
    cache = make_cache({"q": qwen_lora}.__getitem__, capacity=1)
    ref = cache.acquire("q")
    with pytest.raises(AdapterMismatch, match=r"does not fit model tiny-llama: adapter module model\.layers\.\d+\.\S+_proj is linear"):
        ref.wait(WAIT)
    assert cache.stats().resident == [] and cache.stats().in_use == {}


def test_unsupported_options_and_missing_adapters_are_errors(make_cache, adapter_dirs, tmp_path):
    import shutil

    dora = tmp_path / "dora"
    shutil.copytree(adapter_dirs["a"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    folders = {"dora": dora}

    def loader(key):
        if key not in folders:
            raise FileNotFoundError(f"adapter {key} is not in the store")
        return folders[key]

    cache = make_cache(loader, capacity=2)
    with pytest.raises(AdapterMismatch, match="DoRA"):
        cache.acquire("dora").wait(WAIT)
    with pytest.raises(FileNotFoundError, match="not in the store"):
        cache.acquire("nope").wait(WAIT)
    folders["nope"] = adapter_dirs["b"]
    assert cache.acquire("nope").wait(WAIT) >= 0  # a failed load is retried on the next use


def test_loading_happens_off_the_decode_loop(model, make_cache, adapter_dirs, tiny_llama_dir):
    gate = threading.Event()

    def slow_loader(key):
        gate.wait(WAIT)
        return adapter_dirs[key]

    cache = make_cache(slow_loader, capacity=2)
    sched = Scheduler(model, cache).start()
    try:
        prompt = model.tokenizer("What is 6 + 7?")["input_ids"]
        with_adapter = sched.submit(prompt, greedy(6), "a", ignore_eos=True)
        plain = sched.submit(prompt, greedy(6), None, ignore_eos=True)
        # The base request finishes while the adapter is still loading.
        assert plain.result(WAIT).token_ids == reference_greedy(tiny_llama_dir, None, prompt, 6)
        assert not with_adapter.done and sched.stats().waiting_for_adapter == 1
        gate.set()
        assert with_adapter.result(WAIT).token_ids == reference_greedy(tiny_llama_dir, adapter_dirs["a"], prompt, 6)
    finally:
        gate.set()
        sched.stop()


def test_concurrent_users_with_one_slot_get_correct_outputs(model, make_cache, adapter_dirs, tiny_llama_dir):
    cache = make_cache(adapter_dirs.__getitem__, capacity=1)
    sched = Scheduler(model, cache).start()
    try:
        prompts = {k: model.tokenizer(f"What is {i} + {i}?")["input_ids"] for i, k in enumerate("abc")}
        handles = [(k, sched.submit(prompts[k], greedy(8), k, ignore_eos=True)) for k in "abcab"]
        for key, handle in handles:
            assert handle.result(WAIT).token_ids == reference_greedy(tiny_llama_dir, adapter_dirs[key], prompts[key], 8)
        assert cache.stats().evictions >= 2
    finally:
        sched.stop()


@pytest.fixture(scope="module")
def bank(tiny_llama_dir, adapter_dirs, tmp_path_factory):
    """A bank over its own model copy: slot 0 = a (rank 8), 1 = a rank-4 adapter on 3 modules, 2 = c (rank 8)."""
    model = load_private(tiny_llama_dir)
    root = tmp_path_factory.mktemp("small")
    small = make_lora(tiny_llama_dir, root / "small", seed=5, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    folders = [adapter_dirs["a"], small, adapter_dirs["c"]]
    bank = LoraBank(model, capacity=3)
    for slot, folder in enumerate(folders):
        bank.install(slot, PeftAdapter.read(folder).load_weights(model))
    yield bank, folders
    bank.close()


@pytest.mark.parametrize(
    "row_slots",
    [
        [0, 1, -1, 0],  # unequal groups: gather with padding
        [0, 0, 1, 1],  # sorted, equal groups: slices only
        [-1, 2, 0],  # non-adjacent slots: stacks gathered, not sliced
        [-1, -1],  # no adapter at all: the hooks leave the base output alone
    ],
)
def test_gathered_lora_logits_match_peft_per_row(bank, tiny_llama_dir, row_slots):
    bank, folders = bank
    model = bank.model
    ids = torch.randint(3, len(model.tokenizer), (len(row_slots), 7), generator=torch.Generator().manual_seed(0))
    base = reference_model(tiny_llama_dir, None)
    with torch.inference_mode():
        with bank.route(row_slots, ids.shape[1]):
            got = model.model(input_ids=ids).logits
        plain = model.model(input_ids=ids).logits  # outside the route: the base model
        for row, slot in enumerate(row_slots):
            one = ids[row : row + 1]
            want = reference_model(tiny_llama_dir, folders[slot] if slot >= 0 else None)(input_ids=one).logits[0]
            torch.testing.assert_close(got[row], want, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(plain[row], base(input_ids=one).logits[0], atol=1e-4, rtol=1e-4)
