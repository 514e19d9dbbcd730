"""Weight-only int8 quantization for inference: `LLM(..., quantization="int8")`, `--quantization int8`.

Every matrix the decoder multiplies by -- the attention projections except kv_b_proj, the dense MLPs, the shared and
routed experts and lm_head -- is stored as int8 with one scale per output row (symmetric: scale = max|row| / 127).
That is half the bytes of bf16, and single-sequence decode on a CPU is bound by how fast it reads the weights.
Kept as they are: the embedding (a lookup), the norms, the fp32 router, and kv_b_proj, which prefill uses to
decompress the latent cache and decode folds into the query (W_UK) and output (W_UV).

A few rows at a time (decode) go through torch's int8 GEMV kernel, which dequantizes on the fly
(aten._weight_int8pack_mm, CPU, bf16 activations), where dsv2.capability found it giving right answers; more rows
(prefill, large decode batches) dequantize the matrix by tiles of rows into a small reused buffer, in the compute
dtype, and multiply each tile there (`linear_by_tiles`): the dequantization is amortized over the rows, stays in
cache, and never holds the whole matrix in the compute dtype. `int8_linear_reference` is the slow twin the tests
compare both paths against. model/inference.py swaps these modules in (`quantize_int8`).

Buffers (state_dict): <name> int8 [*S, N, K] and <name>_scale fp32 [*S, N] (S: the experts of a stack, or nothing);
not saved, derived on load: <name>_kernel_scale, the scales in bf16 for the GEMV kernel where the plan uses it. A loader of quantized checkpoints
builds these modules from shapes alone by preparing a model built on the meta device (model/inference.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..capability import GEMV_ROWS
from .layers import MLP
from .moe import ExpertGroup, Experts
from .upcast import Workspace

KERNEL_DTYPE = torch.bfloat16  # torch's int8 GEMV kernel is fast with bf16 activations, many times slower in fp32


_CHUNK = 1 << 22  # elements converted to fp32 at a time while quantizing (16 MB)
# weights dequantized at a time when many rows are multiplied (4 MB in fp32): at 256 rows, 2^18 was 5-25% slower
# (narrower matmuls, more calls) and 2^22 no faster (2816 x 1024 and 1024 x 512, emulated AVX2, one thread)
TILE = 1 << 20
TILES = Workspace(TILE)  # one tile buffer per thread and device, shared by every int8 and int4 matrix


def quantize_rows(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (int8 [..., N, K], scale [..., N]) with w ~= q * scale[..., None]. A block of rows at a time,
    so the fp32 temporaries stay ~16 MB however big w is (a stack of experts, lm_head): what a streaming load holds
    beside the model is the part being converted, not fp32 copies of it."""
    rows = w.detach().reshape(-1, w.shape[-1])
    q = torch.empty(rows.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(rows.shape[0], dtype=torch.float32, device=w.device)
    step = max(1, _CHUNK // max(1, w.shape[-1]))
    for a in range(0, rows.shape[0], step):
        w32 = rows[a:a + step].to(torch.float32, copy=True)  # (divided in place below)
        s = w32.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
        q[a:a + step] = w32.div_(s.unsqueeze(-1)).round_().clamp_(-127, 127)
        scale[a:a + step] = s
    return q.view(w.shape), scale.view(w.shape[:-1]).to(scale_dtype)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q * scale.to(dtype).unsqueeze(-1)  # int8 * dtype promotes to dtype in one pass


def linear_by_tiles(x2: torch.Tensor, out_features: int, tile, step: int) -> torch.Tensor:
    """x2 [M, K] @ W^T -> [M, N], W made `step` rows at a time by tile(start, m, buffer) -> W[start:start+m] [m, K]
    (any strides: a transposed view multiplies as well), into the shared tile buffer, in x2's dtype."""
    N, K = out_features, x2.shape[1]
    buf = TILES.buffer(x2.device).view(torch.uint8).view(x2.dtype)
    if min(step, N) * K > buf.numel():  # a tile bigger than the buffer (K in the millions, or int4's 64-row blocks)
        buf = x2.new_empty(min(step, N) * K)
    if step >= N:
        return x2 @ tile(0, N, buf[:N * K]).T
    y = x2.new_empty(x2.shape[0], N)
    for n in range(0, N, step):
        m = min(step, N - n)
        y[:, n:n + m] = x2 @ tile(n, m, buf[:m * K]).T
    return y


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                kernel_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ (q * scale)^T (+ bias) -> [..., N] in x's dtype; q [N, K] int8, scale [N].
    With kernel_scale (the scales in KERNEL_DTYPE), up to GEMV_ROWS rows go through the int8 GEMV kernel with the
    activations rounded to KERNEL_DTYPE; otherwise, and for more rows, q is dequantized by tiles to x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    if kernel_scale is not None and x2.shape[0] <= GEMV_ROWS and x.device.type == "cpu" and q.shape[1] % 16 == 0:
        # (the CPU kernel reads K in blocks of 16: in bf16 any other K gives garbage or a crash, torch 2.13)
        y = torch.ops.aten._weight_int8pack_mm(x2.to(kernel_scale.dtype).contiguous(), q, kernel_scale).to(x.dtype)
    else:  # the codes are exact in bf16 and fp32: convert them alone (one vectorized pass), scale the output
        N, K = q.shape
        y = linear_by_tiles(x2, N, lambda n, m, buf: buf.view(m, K).copy_(q[n:n + m]), max(1, TILE // K))
        y.mul_(scale.to(x.dtype))
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.view(*x.shape[:-1], q.shape[0])


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The slow twin: dequantize in fp32, multiply in fp32."""
    y = x.float() @ (q.float() * scale.float().unsqueeze(-1)).T
    return (y if bias is None else y + bias.float()).to(x.dtype)


def _register(module: nn.Module, name: str, w: torch.Tensor, kernel: bool) -> None:
    """int8 rows and fp32 scales as buffers, so that .to(device) moves them and state_dict() shows them; plus, for
    the GEMV kernel, the scales in KERNEL_DTYPE: derived, so kept out of state_dict() (whether the kernel runs is
    the loading machine's business) and derived again by load_state_dict()."""
    q, scale = quantize_rows(w)
    module.register_buffer(name, q)
    module.register_buffer(name + "_scale", scale)
    module.register_buffer(name + "_kernel_scale", scale.to(KERNEL_DTYPE) if kernel else None, persistent=False)
    if kernel:
        def derive(m: nn.Module, incompatible) -> None:
            with torch.no_grad():
                getattr(m, name + "_kernel_scale").copy_(getattr(m, name + "_scale"))
        module.register_load_state_dict_post_hook(derive)


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, kernel: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        _register(self, "qweight", linear.weight, kernel)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def scale(self) -> torch.Tensor:
        return self.qweight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.qweight_scale, self.bias, self.qweight_kernel_scale)


class Int8MLP(nn.Module):
    """SwiGLU MLP (dense layers, shared experts) with gate and up fused into one int8 matrix."""

    def __init__(self, mlp: MLP, kernel: bool = True):
        super().__init__()
        _register(self, "gate_up", torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), kernel)
        _register(self, "down", mlp.down_proj.weight, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = int8_linear(x, self.gate_up, self.gate_up_scale, None, self.gate_up_kernel_scale).chunk(2, dim=-1)
        return int8_linear(F.silu(gate) * up, self.down, self.down_scale, None, self.down_kernel_scale)


class Int8Experts(ExpertGroup):
    """Routed experts as stacked int8 matrices with per-row scales (the token grouping is ExpertGroup's)."""

    def __init__(self, experts: Experts, kernel: bool = True):
        super().__init__(experts.n_experts)
        _register(self, "gate_up", experts.gate_up_proj, kernel)  # [E, 2I, H], scales [E, 2I]
        _register(self, "down", experts.down_proj, kernel)  # [E, H, I], scales [E, H]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        ks = self.gate_up_kernel_scale
        gate, up = int8_linear(x, self.gate_up[e], self.gate_up_scale[e], None,
                               None if ks is None else ks[e]).chunk(2, dim=-1)
        ks = self.down_kernel_scale
        return int8_linear(F.silu(gate) * up, self.down[e], self.down_scale[e], None, None if ks is None else ks[e])
