"""EngineConfig: the engine's own settings, apart from how the model runs (an InferencePlan, dsv2.capability)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """The engine's own settings (what the model runs on is an InferencePlan)."""
    max_num_seqs: int = 256
    max_model_len: int | None = None  # None: the model's, capped by what the cache holds
    max_num_batched_tokens: int = 2048
    kv_cache_memory: int | None = None  # bytes; None: sized from free memory after a profile of one step
    gpu_memory_utilization: float | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    seed: int = 0

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be an integer >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len}: must be at least 2 (a prompt token and an answer)")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization}: must be in (0, 1]")
