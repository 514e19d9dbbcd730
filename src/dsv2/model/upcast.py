"""Compact weights, fp32 compute: the "upcast" plan of dsv2.capability, for CPUs without fast bf16 matrix products
(AVX2, ARM without bf16), where torch's bf16 GEMM is many times slower than fp32.

Weights stay bf16 (or fp16) in memory -- half of fp32, and decode is bound by reading them -- while activations,
the residual stream and attention run in fp32. Each matmul picks its kernel by the number of rows it multiplies:
up to `kernel_rows` (decode, batches of up to 32 sequences), where kernels/moe_cpu.cpp is built, one C++ call
multiplies the fp32 rows by the bf16 weight, widening each weight row in registers and reading it once for all
rows; without that kernel, up to `gemv_rows` the activations are rounded to the weight dtype and torch's
half-precision matrix-vector kernel streams the weight (fp32 accumulation); above (prefill) the weight is converted
to fp32 for the call and the product runs in fp32, where the conversion is amortized over the rows.
The slow twin is the same model loaded in fp32 (tests/test_cpu_paths.py compares them).
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_moe
from .layers import MLP
from .moe import ExpertGroup, Experts


class Workspace:
    """Scratch memory for the fp32 copies of weights: one buffer of `elements` floats per thread and device, reused by
    every matmul. A fresh fp32 copy per call would come from the allocator each time, and for large matrices from
    new pages the kernel must zero (lm_head of the benchmark model, 32000 x 1024, emulated AVX2: 43 ms to convert
    into fresh memory, 10 ms into this buffer). Matrices larger than the buffer are multiplied in row chunks."""

    def __init__(self, elements: int = 4 << 20):
        self.elements = elements
        self._local = threading.local()

    def buffer(self, device: torch.device) -> torch.Tensor:
        buffers = self._local.__dict__.setdefault("buffers", {})
        if device not in buffers:
            with torch.inference_mode(False):  # a normal tensor: usable inside and outside inference mode
                buffers[device] = torch.empty(self.elements, dtype=torch.float32, device=device)
        return buffers[device]


def upcast_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, gemv_rows: int,
                  workspace: Workspace, kernel_rows: int = 0) -> torch.Tensor:
    """x [..., K] (fp32) @ w^T [K, N] (half precision) (+ bias) -> [..., N] in x's dtype."""
    if kernel_rows and cpu_moe.takes(x, w, kernel_rows):
        y = cpu_moe.linear(x, w)
        return y if bias is None else y + bias.to(y.dtype)
    if x.numel() <= gemv_rows * x.shape[-1]:
        y = F.linear(x.to(w.dtype), w).to(x.dtype)
        return y if bias is None else y + bias.to(x.dtype)
    N, K = w.shape
    buf = workspace.buffer(x.device)
    rows = max(1, min(N, buf.numel() // K))  # output features per chunk
    b = None if bias is None else bias.to(x.dtype)
    if rows == N:
        return F.linear(x, buf[:N * K].view(N, K).copy_(w), b)
    out = x.new_empty(*x.shape[:-1], N)
    for n in range(0, N, rows):
        m = min(rows, N - n)
        out[..., n:n + m] = F.linear(x, buf[:m * K].view(m, K).copy_(w[n:n + m]), None if b is None else b[n:n + m])
    return out


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach(), requires_grad=False)  # the same storage: no copy of the weight


class UpcastLinear(nn.Module):
    def __init__(self, linear: nn.Linear, gemv_rows: int, workspace: Workspace, kernel_rows: int = 0):
        super().__init__()
        self.in_features, self.out_features, self.gemv_rows = linear.in_features, linear.out_features, gemv_rows
        self.workspace, self.kernel_rows = workspace, kernel_rows
        self.weight = _frozen(linear.weight)
        self.bias = None if linear.bias is None else _frozen(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upcast_linear(x, self.weight, self.bias, self.gemv_rows, self.workspace, self.kernel_rows)


class UpcastMLP(nn.Module):
    """SwiGLU MLP (dense layers, shared experts) with gate and up fused into one matrix."""

    def __init__(self, mlp: MLP, gemv_rows: int, workspace: Workspace, kernel_rows: int = 0):
        super().__init__()
        self.gemv_rows, self.workspace, self.kernel_rows = gemv_rows, workspace, kernel_rows
        self.gate_up = _frozen(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        self.down = _frozen(mlp.down_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_rows and cpu_moe.takes(x, self.gate_up, self.kernel_rows):  # the weights widened in the kernel
            I = self.down.shape[-1]
            return cpu_moe.mlp(x, self.gate_up[:I], self.gate_up[I:], self.down)
        gate, up = upcast_linear(x, self.gate_up, None, self.gemv_rows, self.workspace).chunk(2, dim=-1)
        return upcast_linear(F.silu(gate) * up, self.down, None, self.gemv_rows, self.workspace)


class UpcastExperts(ExpertGroup):
    """Routed experts on their stacked half-precision weights (the token grouping is ExpertGroup's)."""

    def __init__(self, experts: Experts, gemv_rows: int, workspace: Workspace, kernel_rows: int = 0):
        super().__init__(experts.n_experts)
        self.gemv_rows, self.workspace, self.kernel_rows = gemv_rows, workspace, kernel_rows
        self.gate_up_proj = _frozen(experts.gate_up_proj)  # [E, 2I, H]
        self.down_proj = _frozen(experts.down_proj)  # [E, H, I]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        if (keep is None and self.kernel_rows
                and cpu_moe.takes(x, self.gate_up_proj, max(cpu_moe.EXPERT_ROWS, self.kernel_rows))):  # one C++ call
            return cpu_moe.stacked_experts(x, self.gate_up_proj, self.down_proj, weights, idx)
        return super().forward(x, weights, idx, keep)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gu, d, rows, ws, k = self.gate_up_proj[e], self.down_proj[e], self.gemv_rows, self.workspace, self.kernel_rows
        gate, up = upcast_linear(x, gu, None, rows, ws, k).chunk(2, dim=-1)
        return upcast_linear(F.silu(gate) * up, d, None, rows, ws, k)


class UpcastEmbedding(nn.Module):
    """The token embedding (any embedding module: plain or vocabulary-parallel), looked up in its stored dtype and
    handed on in the compute dtype."""

    def __init__(self, embedding: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.embedding, self.dtype = embedding, dtype

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight  # shared with lm_head when the embeddings are tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids).to(self.dtype)
