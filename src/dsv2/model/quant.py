"""Weight-only int8 quantization for inference: `LLM(..., quantization="int8")`, `--quantization int8`.

Every matrix the decoder multiplies by -- the attention projections except kv_b_proj, the dense MLPs, the shared and
routed experts and lm_head -- is stored as int8 with one scale per output row (symmetric: scale = max|row| / 127).
That is half the bytes of bf16, and single-sequence decode on a CPU is bound by how fast it reads the weights.
Kept as they are: the embedding (a lookup), the norms, the fp32 router, and kv_b_proj, which prefill uses to
decompress the latent cache and decode folds into the query (W_UK) and output (W_UV).

A few rows at a time (decode) go through torch's int8 GEMV kernel, which dequantizes on the fly
(aten._weight_int8pack_mm, CPU); more rows (prefill, large decode batches) dequantize the matrix to the activation
dtype and run an ordinary matmul, where the weight read is amortized over the rows. `int8_linear_reference` is the
slow twin the tests compare both paths against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP
from .moe import Experts
from .packed import prepare_attention, swap_matrices

GEMV_ROWS = 16  # up to this many rows use the int8 kernel, beyond that dequantize + matmul wins (2 EPYC cores)
QUANTIZATIONS = ("int8",)


def quantize_rows(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (int8 [..., N, K], scale [..., N]) with w ~= q * scale[..., None]."""
    w32 = w.detach().float()
    scale = w32.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = (w32 / scale.unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale.to(scale_dtype)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q * scale.to(dtype).unsqueeze(-1)  # int8 * dtype promotes to dtype in one pass


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ (q * scale)^T (+ bias) -> [..., N]; q [N, K] int8, scale [N] in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] <= GEMV_ROWS and x.device.type == "cpu" and q.shape[1] % 16 == 0:
        # (the CPU kernel reads K in blocks of 16: in bf16 any other K gives garbage or a crash, torch 2.13)
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), q, scale)
        if bias is not None:
            y = y + bias
    else:
        y = F.linear(x2, dequantize_rows(q, scale, x.dtype), bias)
    return y.view(*x.shape[:-1], q.shape[0])


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The slow twin: dequantize in fp32, multiply in fp32."""
    y = x.float() @ (q.float() * scale.float().unsqueeze(-1)).T
    return (y if bias is None else y + bias.float()).to(x.dtype)


def _register(module: nn.Module, name: str, quantized: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Buffers, so that .to(device) moves them and state_dict() shows them."""
    module.register_buffer(name, quantized[0])
    module.register_buffer(name + "_scale", quantized[1])


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        dtype = linear.weight.dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, s = quantize_rows(linear.weight, dtype)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", s)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.scale, self.bias)


class Int8MLP(nn.Module):
    """SwiGLU MLP (dense layers, shared experts) with gate and up fused into one int8 matrix."""

    def __init__(self, mlp: MLP):
        super().__init__()
        dtype = mlp.down_proj.weight.dtype
        _register(self, "gate_up", quantize_rows(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), dtype))
        _register(self, "down", quantize_rows(mlp.down_proj.weight, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = int8_linear(x, self.gate_up, self.gate_up_scale).chunk(2, dim=-1)
        return int8_linear(F.silu(gate) * up, self.down, self.down_scale)


class Int8Experts(Experts):
    """Routed experts as stacked int8 matrices with per-row scales (same token grouping as Experts.forward)."""

    def __init__(self, experts: Experts):
        nn.Module.__init__(self)
        self.n_experts = experts.n_experts
        dtype = experts.down_proj.dtype
        _register(self, "gate_up", quantize_rows(experts.gate_up_proj, dtype))  # [E, 2I, H], scales [E, 2I]
        _register(self, "down", quantize_rows(experts.down_proj, dtype))  # [E, H, I], scales [E, H]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = int8_linear(x, self.gate_up[e], self.gate_up_scale[e]).chunk(2, dim=-1)
        return int8_linear(F.silu(gate) * up, self.down[e], self.down_scale[e])


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace the model's matrices by int8 versions, in place; returns the model, which can then run but not train
    or be saved. Each plain weight is released as soon as its int8 copy exists."""
    prepare_attention(model, Int8Linear)
    swap_matrices(model, Int8MLP, Int8Linear, lambda e: None if isinstance(e, Int8Experts) else Int8Experts(e))
    model.quantization = "int8"
    return model
