"""Routed experts as grouped GEMMs: the T*K token-expert assignments sorted by expert once, then one grouped matrix
product per projection (gate|up, down) over all experts, and the weighted sum back per token. No Python loop over
experts and no host sync where torch._grouped_mm runs (CUDA on Hopper, CPU in recent torch), so a CUDA graph can
hold a whole MoE layer; elsewhere a padded batched matmul stands in, at the price of one sync for its padding.

The slow twins are model/moe.py's Experts.forward (grouped by a Python loop) and Experts.forward_reference (every
expert on every token); tests/test_moe_grouped.py compares all three.

Shape legend: T tokens, H hidden, E experts, K experts per token, A = T*K assignments, I expert width,
C the most assignments any expert got.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_support: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_supported(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs on this device and dtype and agrees with per-group matmuls: tried once with
    a small problem (including an empty group), never assumed from version numbers. The answer is cached."""
    device = torch.device(device)
    key = (str(device), dtype)
    if key not in _support:
        _support[key] = _try_grouped_mm(device, dtype)
    return _support[key]


def _try_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(40, 64, generator=g).to(device, dtype)
    w = torch.randn(3, 32, 64, generator=g).to(device, dtype)  # [E, out, in], stored as the experts are
    ends = torch.tensor([16, 16, 40], dtype=torch.int32, device=device)  # expert 1 gets nothing
    try:
        y = torch._grouped_mm(x, w.transpose(1, 2), offs=ends)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    want = torch.cat([x[:16] @ w[0].T, x[16:40] @ w[2].T])
    return bool(torch.allclose(y.float(), want.float(), rtol=2e-2, atol=2e-2))


def grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """x [A, in] sorted by expert, w [E, out, in] (nn.Linear layout), ends [E] int32 cumulative counts, expert [A]
    each row's expert -> [A, out], row a = w[expert[a]] @ x[a]."""
    aligned = all(d * x.element_size() % 16 == 0 for d in w.shape[1:])  # _grouped_mm wants 16-byte row strides
    if aligned and grouped_mm_supported(x.device, x.dtype):
        return torch._grouped_mm(x, w.transpose(1, 2), offs=ends)
    # padded batched matmul: each expert's rows in a [C, in] slab, C read back from the device (the one sync)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    C = int(counts.max())
    row = torch.arange(x.shape[0], device=x.device) - (ends - counts).long()[expert]  # position within its expert
    slabs = x.new_zeros(w.shape[0], C, x.shape[1]).index_put_((expert, row), x)  # [E, C, in]
    return torch.bmm(slabs, w.transpose(1, 2))[expert, row]  # [E, C, out] -> [A, out]


def grouped_experts(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, weights: torch.Tensor,
                    idx: torch.Tensor) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{idx[t, k]}(x[t]) for x [T, H], gate_up_proj [E, 2I, H] (rows [gate | up]),
    down_proj [E, H, I], weights [T, K] fp32, idx [T, K] -> [T, H] in x's dtype. Combined in fp32, as
    Experts.forward combines; every assignment is computed (no token dropping: that is training-only)."""
    T, K = idx.shape
    E = gate_up_proj.shape[0]
    flat = idx.flatten()  # [A]
    order = flat.argsort(stable=True)  # assignments grouped by expert, token order within each
    expert = flat[order]  # [A] ascending
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))  # bincount without its host sync for the size
    ends = counts.cumsum(0, dtype=torch.int32)  # [E]
    xs = x.index_select(0, order // K)  # [A, H]
    gate, up = grouped_mm(xs, gate_up_proj, ends, expert).chunk(2, dim=-1)  # [A, I] each
    ys = grouped_mm((F.silu(gate) * up).contiguous(), down_proj, ends, expert)  # [A, H]
    # back to token-major order, then a fixed-order sum over k: no atomics, so the result is deterministic
    ys = torch.empty_like(ys).index_copy_(0, order, ys).view(T, K, -1)  # [T, K, H]
    return torch.einsum("tk,tkh->th", weights.float(), ys.float()).to(x.dtype)
