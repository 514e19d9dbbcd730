"""Kernels and their plain twins, kept apart from the model so the model stays math:

- triton_mla.py: absorbed MLA decode over the paged latent cache (Triton, split-KV), and the static-shape slots a
  torch fallback gathers with (CUDA-graph capturable either way).
- cpu_mla.py: absorbed MLA decode over the paged cache on the CPU (C++ flash-decoding kernel, mla_decode_cpu.cpp; SDPA
  where it cannot be built), and its paged form as one opaque operator.
- cpu_moe.py: routed experts / an MLP / a linear on few rows in one C++ call (moe_cpu.cpp), the CPU's decode products.
- cpu_build.py: building and caching those C++ kernels for this machine's vector ISA at first use.
- linear_ce.py: lm_head and the cross-entropy fused chunk by chunk (training's loss without the whole logits).
- moe_grouped.py: routed experts as one grouped GEMM per projection, tokens sorted by expert once, no host sync.

Nothing here imports the model; the model calls in (see each function's docstring for its twin).
"""
from .moe_grouped import grouped_experts, grouped_mm_supported
from .triton_mla import mla_decode, paged_slots, triton_unavailable_reason

__all__ = ["grouped_experts", "grouped_mm_supported", "mla_decode", "paged_slots", "triton_unavailable_reason"]
