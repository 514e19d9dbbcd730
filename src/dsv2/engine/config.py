"""EngineConfig: the engine's own settings, apart from how the model runs (an InferencePlan, dsv2.capability)."""
from __future__ import annotations

from dataclasses import dataclass

KV_CACHE_DTYPES = {
    "auto": "latents as the inference plan stores them (bf16, or fp32 for fp32 models)",
    "fp8": "DeepSeek's FP8 layout: e4m3 latent with a fp32 scale per 128 values, bf16 rope part; ~1.75x the tokens",
}


@dataclass(frozen=True)
class EngineConfig:
    """The engine's own settings (what the model runs on is an InferencePlan)."""
    max_num_seqs: int = 256
    max_model_len: int | None = None  # None: the model's, capped by what the cache holds
    max_num_batched_tokens: int = 2048
    kv_cache_memory: int | None = None  # bytes; None: sized from free memory after a profile of one step
    gpu_memory_utilization: float | None = None
    block_size: int = 16
    kv_cache_dtype: str = "auto"  # a key of KV_CACHE_DTYPES (vLLM's name and values)
    enable_prefix_caching: bool = True
    seed: int = 0

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be an integer >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len}: must be at least 2 (a prompt token and an answer)")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported; use one of: "
                             + "; ".join(f"{k!r} ({v})" for k, v in KV_CACHE_DTYPES.items()))
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization}: must be in (0, 1]")
