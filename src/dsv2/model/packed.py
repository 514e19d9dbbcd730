"""oneDNN-prepacked bf16 weights for CPU inference (the "packed" plan of dsv2.capability): every bf16 matrix the
model multiplies by is reordered once into oneDNN's blocked layout, so decode's matrix-vector products stream memory
~1.7x faster (measured on the benchmark model: 42 vs 24 GB/s). oneDNN's blocked kernels accumulate in another order than torch's plain bf16 matmul, so the
results agree to bf16 rounding, not bit for bit: on the tests' tiny models the logits stay within 2% of the largest
logit of the unpacked bf16 model with the same argmax at over 97% of positions (tests/test_model_internals.py), and
greedy engine output equals the unpacked engine's (tests/test_engine.py). Only used where dsv2.capability found
oneDNN's bf16 path working.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP
from .moe import ExpertGroup, Experts


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)  # layout tuned for one row at a time


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = _pack(linear.weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_linear(x, self.packed, self.bias)


class PackedMLP(nn.Module):
    """SwiGLU MLP with gate and up fused into one packed matrix (dense layers and shared experts)."""

    def __init__(self, mlp: MLP):
        super().__init__()
        self.gate_up = _pack(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        self.down = _pack(mlp.down_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = _packed_linear(x, self.gate_up).chunk(2, dim=-1)
        return _packed_linear(F.silu(gate) * up, self.down)


class PackedExperts(ExpertGroup):
    """Routed experts with one packed matrix pair per expert (the token grouping is ExpertGroup's)."""

    def __init__(self, experts: Experts):
        super().__init__(experts.n_experts)
        self.packed = [(_pack(experts.gate_up_proj[e]), _pack(experts.down_proj[e])) for e in range(self.n_experts)]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.packed[e]
        gate, up = _packed_linear(x, gate_up).chunk(2, dim=-1)
        return _packed_linear(F.silu(gate) * up, down)
