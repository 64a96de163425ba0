"""The one settings object of the service, read from `RESA_*` environment variables.

Every field has a default that works on a laptop with no environment at all:
a local store under ./data/store, an embedded Redis, the bundled model registry.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SCOPES = ("admin", "generate")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RESA_", extra="ignore")

    store_url: str = "file://./data/store"
    """Artifact store root: `file://path` (relative paths resolve from the working dir) or `s3://bucket/prefix`."""

    store_options: dict = {}
    """fsspec storage options as JSON, e.g. `{"client_kwargs": {"endpoint_url": "http://minio:9000"}}` for S3-compatible stores."""

    redis_url: str | None = None
    """Redis for the job queue; unset means `resa serve` starts an embedded Redis and one local worker."""

    models_file: Path | None = None
    """TOML models registry that extends (and may override) the built-in one."""

    api_keys: str = ""
    """Comma-separated `key:scope` pairs, scope `admin` or `generate`; empty means local development mode."""

    cache_dir: Path = Path.home() / ".cache" / "resa"
    """Local cache: converted model weights, artifacts fetched from remote stores, job checkpoints."""

    default_model: str = "smollm2-135m"
    """Model loaded at start by the API (readiness waits for it); empty to load lazily."""

    device: str | None = None
    """Force a torch device (`cpu`, `cuda`, `cuda:1`); unset picks CUDA when present."""

    max_body_bytes: int = 32 * 1024 * 1024
    """Largest request body accepted, in bytes (datasets included)."""

    max_dataset_rows: int = 200_000
    """Largest QA dataset accepted, in rows."""

    datasets_max_bytes: int = 4 * 1024**3
    """Budget for all stored datasets together, in bytes: an upload past it gets 413 (delete old ones with an admin key)."""

    max_prompt_tokens: int = 4096
    """Longest prompt accepted for generation, in tokens."""

    max_new_tokens: int = 2048
    """Largest `max_tokens` a generation request may ask for."""

    max_batch: int = 32
    """Most sequences decoded together in one batch by the serving scheduler."""

    max_tokens_in_flight: int = 65_536
    """Cap on prompt + generated tokens held by running sequences at once."""

    max_queue: int = 256
    """Generation requests waiting beyond the running batch before new ones get 429."""

    adapter_cache_size: int = 16
    """Adapters kept loaded per served model (least recently used are evicted, never one in use)."""

    engine: Literal["native", "vllm", "auto"] = "auto"
    """Which engine generates tokens (serving, evaluation, the CLI): `native` (the continuous-batching engine
    of this package: CPU, tests, embedded mode), `vllm` (vLLM: GPU), `auto` (vLLM when it is installed and a
    CUDA device is present, else native)."""

    vllm_gpu_memory_utilization: float = 0.9
    """vLLM: share of GPU memory for weights and KV cache (on CPU: of RAM, unless RESA_VLLM_KV_CACHE_GIB)."""

    vllm_max_model_len: int | None = None
    """vLLM: longest sequence served, in tokens (unset: the model's context)."""

    vllm_max_num_seqs: int | None = None
    """vLLM: sequences decoded together (unset: RESA_MAX_BATCH)."""

    vllm_max_loras: int = 4
    """vLLM: adapters in one batch."""

    vllm_max_lora_rank: int = 32
    """vLLM: largest adapter rank served (1, 8, 16, 32, 64, 128, 256, 320 or 512)."""

    vllm_max_cpu_loras: int | None = None
    """vLLM: adapters kept in host memory (unset: RESA_ADAPTER_CACHE_SIZE)."""

    vllm_tensor_parallel_size: int = 1
    """vLLM: GPUs one model is split over."""

    vllm_dtype: str = "auto"
    """vLLM: `auto` (bf16 on GPU, fp32 on CPU), `bfloat16`, `float16` or `float32`."""

    vllm_enforce_eager: bool = True
    """vLLM: no CUDA graphs; per-request SAEs need it (with false, requests with `sae` get 422 naming this setting)."""

    vllm_kv_cache_gib: int | None = None
    """vLLM on CPU: GiB of RAM for the KV cache (unset: 1)."""

    vllm_enable_prefix_caching: bool = True
    """vLLM: reuse KV blocks of shared prompt prefixes (requests with an SAE never share theirs)."""

    engine_threads: int = Field(default=0, ge=0)
    """CPU only: torch intra-op threads of each served model's decode engine (0: torch's default,
    one per core); the server's other threads run torch work on one thread."""

    job_timeout_s: int = 6 * 3600
    """Wall-clock limit of one background job, in seconds."""

    result_ttl_s: int = 7 * 24 * 3600
    """How long finished and failed jobs (and their results) are kept in Redis, in seconds."""

    queues: str = "resa"
    """Comma-separated RQ queue names a worker listens on."""

    @model_validator(mode="after")
    def _check_vllm(self) -> "Settings":
        if self.engine == "vllm":
            self.vllm_settings()  # a bad setting is a one-line error at start, not a failed engine later
        return self

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: str) -> str:
        parse_api_keys(value)
        return value

    @property
    def keys(self) -> dict[str, str]:
        """API key -> scope."""
        return parse_api_keys(self.api_keys)

    def vllm_settings(self):
        """The vLLM engine's settings, checked (ValueError with one line naming the setting)."""
        from resa_engine.engine.vllm.settings import VllmSettings

        values = {name: getattr(self, f"vllm_{name}") for name in VllmSettings.names()}
        values["max_cpu_loras"] = values["max_cpu_loras"] or max(int(self.adapter_cache_size), values["max_loras"])
        return VllmSettings(**values).validate()

    def engine_kind(self) -> str:
        """`native` or `vllm`: what RESA_ENGINE asks for, `auto` resolved on this machine."""
        if self.engine != "auto":
            return self.engine
        from resa_engine.engine.vllm.settings import vllm_available

        if self.device and not self.device.startswith("cuda"):
            return "native"
        import torch

        return "vllm" if vllm_available() and torch.cuda.is_available() else "native"

    def open_store(self):
        """The artifact store these settings name (the one way to get one)."""
        from adapters_store import ArtifactStore

        return ArtifactStore(self.store_url, cache_dir=self.cache_dir, storage_options=self.store_options)

    @property
    def queue_names(self) -> list[str]:
        return [q.strip() for q in self.queues.split(",") if q.strip()]

    log_json: bool = True
    """Log one JSON object per line (ts, level, logger, msg, request_id, job_id, extra fields); false: plain text."""

    log_level: str = "INFO"
    """Lowest level logged: DEBUG, INFO, WARNING, ERROR or CRITICAL (`resa serve --log-level` overrides it)."""

    host: str = "127.0.0.1"
    """Interface `resa serve` listens on (0.0.0.0 in a container); `--host` overrides it."""

    port: int = 8000
    """TCP port `resa serve` listens on; `--port` overrides it."""

    failure_ttl_s: int | None = None
    """How long failed jobs (and why they failed) are kept in Redis, in seconds; unset: result_ttl_s."""

    drain_timeout_s: float = 20.0
    """On SIGTERM/SIGINT, how long in-flight requests, and a worker's running job, get to finish or checkpoint, in seconds."""


def parse_api_keys(value: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, scope = item.rpartition(":")
        if not sep or not key or scope not in SCOPES:
            raise ValueError(f"RESA_API_KEYS entry {item[:4]}… must be `key:scope` with scope in {SCOPES}")
        keys[key] = scope
    return keys


@lru_cache
def get_settings() -> Settings:
    return Settings()

