"""The two small building blocks every layer uses: RMSNorm and the SwiGLU MLP (dense FFN and shared experts)."""
import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_moe


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # y = x * rsqrt(mean(x^2) + eps) in fp32 (one fused op), cast back *before* the weight multiply, as the
        # reference does
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype) * self.weight


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._cpu_kernel_takes(x):  # CPU inference on a few rows (decode): one C++ call (kernels/cpu_moe.py)
            return cpu_moe.mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def _cpu_kernel_takes(self, x: torch.Tensor) -> bool:
        linears = (self.gate_proj, self.up_proj, self.down_proj)  # exactly nn.Linear: a LoRA or parallel wrapper
        return (all(type(m) is nn.Linear and m.bias is None for m in linears)  # has its own forward
                and cpu_moe.takes(x, self.gate_proj.weight, cpu_moe.MLP_ROWS))
