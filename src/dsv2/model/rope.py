"""Rotary embedding on the 64 decoupled rope dims (MODEL_SPEC section 3): YaRN / linear / dynamic / plain tables
in fp32, applied to *interleaved* pairs (x[2j], x[2j+1]) -- the layout the checkpoints were trained with.

Shapes: P = any leading position dims, D = qk_rope_head_dim.
"""
from __future__ import annotations

import math

import torch

from ..config import ModelConfig, yarn_get_mscale


def rope_inv_freq(cfg: ModelConfig, seq_len: int | torch.Tensor | None = None,
                  device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [D/2] (fp32) and the cos/sin amplitude multiplier for the config's rope type.
    Dynamic NTK takes the sequence length: an int, or a tensor [*P] of per-token lengths (then [*P, D/2])."""
    d, theta, rs = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling
    exponents = torch.arange(0, d, 2, dtype=torch.float32, device=device) / d
    kind = cfg.rope_type
    if kind == "dynamic" and isinstance(seq_len, torch.Tensor):
        # one NTK-stretched base per token, from the length of the sequence it belongs to (not the batch's longest)
        f, m = rs["factor"], cfg.max_position_embeddings
        L = seq_len.to(device=device, dtype=torch.float64)
        base = torch.where(L > m, theta * ((f * L / m) - (f - 1)) ** (d / (d - 2)), torch.full_like(L, theta))
        return 1.0 / (base.float().unsqueeze(-1) ** exponents), 1.0
    if kind == "dynamic" and seq_len is not None and seq_len > cfg.max_position_embeddings:
        # NTK-aware base stretch, recomputed from the longest position this forward sees
        f = rs["factor"]
        theta = theta * ((f * seq_len / cfg.max_position_embeddings) - (f - 1)) ** (d / (d - 2))
    inv_freq = 1.0 / (theta ** exponents)
    if kind == "linear":
        return inv_freq / rs["factor"], 1.0
    if kind != "yarn":
        return inv_freq, 1.0

    factor = rs["factor"]
    original = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), d - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp  # 1 on the fast (high-frequency) dims, which keep their original frequency
    inv_freq = (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate
    # mscale defaults as in DeepSeek's reference code: mscale 1, mscale_all_dim 0 (-> denominator 1)
    amplitude = yarn_get_mscale(factor, rs.get("mscale", 1) or 0) / yarn_get_mscale(factor, rs.get("mscale_all_dim", 0) or 0)
    return inv_freq, float(amplitude)


def rope_freqs(cfg: ModelConfig, positions: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Rotations e^{i * pos * inv_freq} (times the YaRN amplitude) as complex64 [*P, D/2], for integer positions [*P].
    lengths [*P]: the length of each token's sequence, for dynamic NTK (default: the longest position + 1, what a
    plain forward over one batch of equal-length rows sees)."""
    seq_len = None
    if cfg.rope_type == "dynamic" and positions.numel():
        seq_len = lengths if lengths is not None else int(positions.max()) + 1
    inv_freq, amplitude = rope_inv_freq(cfg, seq_len, positions.device)
    angles = positions.float()[..., None] * inv_freq  # [*P, D/2], fp32
    return torch.polar(torch.full_like(angles, amplitude), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of x [..., D] as complex numbers x[2j] + i x[2j+1] by freqs
    [..., D/2] (broadcast), in fp32, back to x's dtype."""
    rotated = torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * freqs
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)
