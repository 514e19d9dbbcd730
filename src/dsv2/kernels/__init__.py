"""Kernels and their plain twins, kept apart from the model so the model stays math:

- triton_mla.py: absorbed MLA decode over the paged latent cache (Triton, split-KV), and the static-shape slots a
  torch fallback gathers with (CUDA-graph capturable either way).
- cpu_mla.py: absorbed MLA decode through SDPA's fused CPU kernel, and its paged form as one opaque operator.
- moe_grouped.py: routed experts as one grouped GEMM per projection, tokens sorted by expert once, no host sync.

Nothing here imports the model; the model calls in (see each function's docstring for its twin).
"""
from .moe_grouped import grouped_experts, grouped_mm_supported
from .triton_mla import mla_decode, paged_slots, triton_unavailable_reason

__all__ = ["grouped_experts", "grouped_mm_supported", "mla_decode", "paged_slots", "triton_unavailable_reason"]
