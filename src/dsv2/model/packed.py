"""Inference-only weight prepacking for CPU: every bf16 matrix the model multiplies by is reordered once into
oneDNN's blocked layout, so decode's matrix-vector products stream memory ~1.7x faster (measured on the benchmark
model: 42 vs 24 GB/s) with bit-identical results. An unmodified model goes in; the packed model can run but no
longer train or be saved (the plain weights are released to keep one copy in memory).

kv_b_proj stays plain (prefill decompresses with it) and its per-head slices W_UK / W_UV^T are laid out contiguously
for the absorbed decode path. The router stays fp32 and plain.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP
from .mla import MLA
from .moe import Experts


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


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


class PackedExperts(Experts):
    """Experts with one packed matrix pair per expert (same token grouping as Experts.forward)."""

    def __init__(self, experts: Experts):
        nn.Module.__init__(self)
        self.n_experts = experts.n_experts
        self.packed = [(_pack(experts.gate_up_proj[e]), _pack(experts.down_proj[e])) for e in range(self.n_experts)]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.packed[e]
        gate, up = _packed_linear(x, gate_up).chunk(2, dim=-1)
        return _packed_linear(F.silu(gate) * up, down)


class PackedMLP(nn.Module):
    """SwiGLU MLP with gate and up fused into one packed matrix (dense layers and shared experts)."""

    def __init__(self, mlp: MLP):
        super().__init__()
        self.gate_up = _pack(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        self.down = _pack(mlp.down_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = _packed_linear(x, self.gate_up).chunk(2, dim=-1)
        return _packed_linear(F.silu(gate) * up, self.down)


def fuse_input_projections(mla: MLA, wrap=None) -> None:
    """[q_proj or q_a_proj | kv_a_proj_with_mqa] as one matrix, wrapped by `wrap` (PackedLinear by default)."""
    first = mla.q_proj if mla.q_lora_rank is None else mla.q_a_proj
    second = mla.kv_a_proj_with_mqa
    fused = nn.Linear(first.in_features, first.out_features + second.out_features, bias=first.bias is not None,
                      device="meta")
    fused.weight = nn.Parameter(torch.cat([first.weight, second.weight]), requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([first.bias, second.bias]), requires_grad=False)
    mla.fused_input_proj = (wrap or PackedLinear)(fused)
    mla.fused_input_split = (first.out_features, second.out_features)
    for name in ("q_proj" if mla.q_lora_rank is None else "q_a_proj", "kv_a_proj_with_mqa"):
        setattr(mla, name, None)  # the fused copy replaces them


def pack_for_cpu_inference(model: nn.Module) -> nn.Module:
    """Replace the model's linear layers, MLPs and routed experts by packed versions, in place; returns the model.
    Each plain weight is released as soon as its packed copy exists, so memory peaks near one model plus one layer."""
    prepare_attention(model)
    swap_matrices(model, PackedMLP, lambda m: PackedLinear(m) if m.weight.dtype == torch.bfloat16 else None,
                  lambda e: None if isinstance(e, PackedExperts) else PackedExperts(e))
    model.packed = True
    return model


def prepare_attention(model: nn.Module, wrap=None) -> None:
    """Every MLA for inference: the fused input projection (wrapped by `wrap`, PackedLinear by default) and
    contiguous per-head W_UK / W_UV^T for absorbed decode."""
    for module in model.modules():
        if isinstance(module, MLA) and module.fused_input_proj is None:
            fuse_input_projections(module, wrap)
            w_uk, w_uv_t = module.absorbed_weights()
            module.absorbed = (w_uk.contiguous(), w_uv_t.contiguous())


def swap_matrices(module: nn.Module, mlp, linear, experts) -> None:
    """Replace, recursively, every MLP, nn.Linear (except kv_b_proj) and Experts child by mlp(child), linear(child)
    or experts(child); a factory that returns None keeps the child. Each plain child is dropped as soon as it is
    replaced, so memory peaks near one model plus one layer."""
    for name, child in list(module.named_children()):
        new = None
        if isinstance(child, MLP):
            new = mlp(child)
        elif isinstance(child, nn.Linear) and name != "kv_b_proj":
            new = linear(child)
        elif isinstance(child, Experts):
            new = experts(child)
        if new is not None:
            setattr(module, name, new)
        elif not isinstance(child, nn.Linear):
            swap_matrices(child, mlp, linear, experts)
        del child  # drop this frame's reference too, so the plain weights go now
