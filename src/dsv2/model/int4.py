"""Weight-only int4 in groups along K: `LLM(..., quantization="int4")`, `--quantization int4`.

Each row of a weight W [N, K] is cut into groups of `group_size` inputs (64 by default: capability.INT4_GROUP_SIZE;
a matrix whose K it does not divide takes the largest halving that does); a group holds 4-bit codes q in 0..15 and
one bf16 (scale, zero) pair, asymmetric, as torch's int4 kernels read them:

    w ~= (q - 8) * scale + zero          scale = (max - min) / 15,  zero = min + 8 * scale

4 + 32 / group_size bits a weight: 4.5 at 64, llama.cpp Q4_0's size. Which matrices a plan makes int4 is
model/inference.py's choice.

How a product runs depends on the matrix's layout (`Int4Layout`), chosen when it is built:
  "cpu"   torch's CPU int4 kernel (aten._weight_int4pack_mm_for_cpu) up to `kernel_rows` rows (decode): it
          dequantizes in registers and reads half a byte a weight, but again for every 4 rows; more rows (prefill)
          go by tiles (below). Its packing (blocks of 64 or 32 rows, by the CPU level torch runs at) is read back
          by `unpack`, so one copy of the weights serves both paths.
  "cuda"  torch's CUDA int4 kernel (aten._weight_int4pack_mm, tinygemm's layout) for every row count. (Not run on
          a GPU yet: chosen only where capability.int4_cuda_kernel's trial matched fp32.)
  "plain" the portable layout below, for every row count by tiles: no kernel here, its trial failed, or a shape
          it cannot take (N not a multiple of 16, a group size under 32).
Tiles: quant.linear_by_tiles dequantizes TILE weights at a time into one reused buffer, in the compute dtype, and
multiplies there, so the dequantization is amortized over the rows and never holds the whole matrix.
dsv2.capability tries each kernel once on a small matrix, and the plan uses it only where it gave right answers.
`int4_linear_reference` is the slow fp32 twin the tests compare every path with.

Buffers (what state_dict() holds and load_state_dict() takes, for any layout in memory):
    qweight      uint8 [*S, N, K / 2]    the codes two a byte: k even in the low nibble, k odd in the high one
    scale_zeros  bf16  [*S, K / g, N, 2] (scale, zero) per group, the kernels' layout
    bias         fp32  [N]               where the plain module had one
S: the experts of a stack, or nothing; g = K / scale_zeros.shape[-3]. In memory qweight is in the module's layout
(the CPU kernel's differs between CPU levels); state_dict() writes the portable one and load_state_dict() packs it
back, so a file written on one machine loads on another. A loader builds the modules from shapes alone by preparing
a model built on the meta device (model/inference.py), or with `Int4Linear(K, N, ...)` directly.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..capability import INT4_GROUP_SIZE as GROUP_SIZE, INT4_KERNEL_ROWS as KERNEL_ROWS, int4_cpu_packing
from .layers import MLP
from .moe import ExpertGroup, Experts
from .quant import TILE, linear_by_tiles

KERNEL_GROUPS = (32, 64, 128, 256)  # what torch's CPU and CUDA int4 kernels take
KERNEL_DTYPE = torch.bfloat16  # the kernels' activations and scales
_CHUNK = 1 << 20  # bytes of int32 codes packed at a time for torch's CPU kernel (2816 x 2048: 11 ms vs 16 at 16 MB)
_GROUP_CHUNK = 1 << 20  # weights quantized at a time (4 MB in fp32): 2816 x 2048 on a busy 2-core machine, 2 threads:
#   96 ms at 2^20, 224 at 2^18 (more, smaller parallel regions), 118 at 2^22, 500 before (one thread: 32, 47, 49, 106)


def group_size_for(k: int, group_size: int) -> int:
    """The group size a matrix with K inputs gets: `group_size`, or the largest halving of it that divides K."""
    g = group_size
    while k % g and g > 1:
        g //= 2
    return g


# ---- quantization and the portable layout ------------------------------------------------------------------------
def quantize_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (K a multiple of group_size) -> (codes uint8 [N, K] in 0..15, scale_zeros bf16 [K / g, N, 2]). The
    codes are rounded against the bf16 scale and zero the kernels will use. A block of rows at a time through one
    reused fp32 buffer of _GROUP_CHUNK weights (mostly in cache; no fresh pages to fault in), each pass one
    vectorized op in place. quantize_groups_reference is the slow twin, equal bit for bit."""
    N, K = w.shape
    G = K // group_size
    q = torch.empty(N, K, dtype=torch.uint8, device=w.device)
    sz = torch.empty(G, N, 2, dtype=KERNEL_DTYPE, device=w.device)
    if w.is_meta:  # a module built from shapes: nothing to compute
        return q, sz
    w = w.detach()
    step = max(1, _GROUP_CHUNK // K)
    buf = torch.empty(min(step, N) * K, dtype=torch.float32, device=w.device)
    for a in range(0, N, step):
        n = min(step, N - a)
        x = buf[:n * K].view(n, G, group_size).copy_(w[a:a + n].reshape(n, G, group_size))  # [n, G, g]
        lo = x.amin(dim=-1)  # [n, G]
        scale = x.amax(dim=-1).sub_(lo).div_(15).clamp_(min=1e-10).to(KERNEL_DTYPE)
        s = scale.float()
        zero = (lo + 8 * s).to(KERNEL_DTYPE)
        x.sub_(zero.float().unsqueeze(-1)).div_(s.unsqueeze(-1)).round_().add_(8).clamp_(0, 15)
        q[a:a + n] = x.view(n, K)
        sz[:, a:a + n, 0], sz[:, a:a + n, 1] = scale.T, zero.T
    return q, sz


def quantize_groups_reference(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The slow twin of quantize_groups: the whole matrix at once in fp32, the formulas as written above."""
    N, K = w.shape
    g = w.detach().float().view(N, K // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-10).to(KERNEL_DTYPE)
    zero = (lo + 8 * scale.float()).to(KERNEL_DTYPE)
    codes = (((g - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).round() + 8).clamp(0, 15)
    return codes.to(torch.uint8).view(N, K), torch.stack([scale, zero], dim=-1).transpose(0, 1)


def dequantize_groups(q: torch.Tensor, scale_zeros: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [n, K] + scale_zeros [G, n, 2] -> w [n, K] in `dtype` (arithmetic in fp32, as the kernels do)."""
    n, K = q.shape
    G = scale_zeros.shape[0]
    s, z = scale_zeros.float().permute(2, 1, 0).unsqueeze(-1)  # [n, G, 1] each
    return ((q.view(n, G, K // G).float() - 8) * s + z).view(n, K).to(dtype)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """codes [..., K] -> uint8 [..., K / 2], the portable layout: k even in the low nibble. Read as little-endian
    int16 pairs v = lo | hi << 8, the byte lo | hi << 4 is the low byte of v | v >> 4: two contiguous passes per
    block of rows, in cache, instead of strided slices (2816 x 2048, one thread: 1.5 ms vs 9)."""
    if sys.byteorder != "little" or q.shape[-1] % 2 or not q.is_contiguous() or q.is_meta:
        return pack_nibbles_reference(q)
    rows = q.reshape(-1, q.shape[-1])
    out = torch.empty(rows.shape[0], rows.shape[1] // 2, dtype=torch.uint8, device=q.device)
    step = max(1, _GROUP_CHUNK // rows.shape[1])
    for a in range(0, rows.shape[0], step):
        v = rows[a:a + step].view(torch.int16)
        out[a:a + step] = v.bitwise_or(v >> 4)  # (int16 -> uint8 keeps the low byte)
    return out.view(*q.shape[:-1], q.shape[-1] // 2)


def pack_nibbles_reference(q: torch.Tensor) -> torch.Tensor:
    """The slow twin of pack_nibbles."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K / 2] in the portable layout -> codes [..., K]. Each byte b widened in place to the int16
    (b & 15) | (b >> 4) << 8, which is the two codes in order read as little-endian bytes (5.6 -> 2.0 ms at
    2816 x 2048)."""
    if sys.byteorder != "little" or not p.is_contiguous() or p.is_meta:
        return unpack_nibbles_reference(p)
    rows = p.reshape(-1, p.shape[-1])
    out = torch.empty(rows.shape[0], 2 * rows.shape[1], dtype=torch.uint8, device=p.device)
    wide = out.view(torch.int16)  # [R, K / 2]
    step = max(1, _GROUP_CHUNK // out.shape[1])
    for a in range(0, rows.shape[0], step):
        v = wide[a:a + step].copy_(rows[a:a + step])
        v.bitwise_or_((v << 4).bitwise_and_(0x0F00)).bitwise_and_(0x0F0F)
    return out.view(*p.shape[:-1], 2 * p.shape[-1])


def unpack_nibbles_reference(p: torch.Tensor) -> torch.Tensor:
    """The slow twin of unpack_nibbles."""
    return torch.stack([p & 15, p >> 4], dim=-1).flatten(-2)


# ---- layouts -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Int4Layout:
    """How one matrix's qweight is stored in memory: "plain" (the portable layout), "cpu" (torch's CPU kernel:
    blocks of `block` rows, each k's byte j holding rows j and j + block/2 when `halves`, rows 2j and 2j+1
    otherwise; a last block of fewer rows holds pairs), "cuda" (tinygemm's int32 tiles, `inner_k_tiles`)."""
    kind: str = "plain"
    block: int = 0
    halves: bool = False
    inner_k_tiles: int = 0


PLAIN = Int4Layout()


def choose_layout(n: int, k: int, group_size: int, kernel: bool, device: torch.device | str) -> Int4Layout:
    """The layout a [n, k] matrix in groups of `group_size` gets: the device's kernel where `kernel` (the plan's
    trial passed) and the kernel takes the shape; "plain" otherwise."""
    device = torch.device(device)
    if not kernel or group_size not in KERNEL_GROUPS or k % group_size:
        return PLAIN
    if device.type == "cuda":
        inner = next((t for t in (8, 4, 2) if k % (t * 16) == 0), 0)
        return Int4Layout("cuda", inner_k_tiles=inner) if inner and n % 8 == 0 else PLAIN
    packing = int4_cpu_packing()
    if device.type in ("cpu", "meta") and packing is not None and n % 16 == 0:
        return Int4Layout("cpu", block=packing[0], halves=packing[1])
    return PLAIN


def pack(q: torch.Tensor, layout: Int4Layout) -> torch.Tensor:
    """codes [N, K] -> qweight in `layout`."""
    if layout.kind == "cpu":  # it takes int32 codes: whole blocks of rows at a time through one small buffer
        N, K = q.shape
        step = max(1, _CHUNK // 4 // K // layout.block) * layout.block
        buf = torch.empty(min(step, N) * K, dtype=torch.int32, device=q.device)
        out = torch.empty(N, K // 2, dtype=torch.uint8, device=q.device)
        for a in range(0, N, step):
            n = min(step, N - a)
            codes = buf[:n * K].view(n, K).copy_(q[a:a + n])
            out[a:a + n] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        return out
    if layout.kind == "cuda":  # tinygemm's input: k even in the HIGH nibble
        return torch.ops.aten._convert_weight_to_int4pack((q[:, 1::2] | (q[:, 0::2] << 4)).contiguous(),
                                                          layout.inner_k_tiles)
    return pack_nibbles(q)


def unpack(p: torch.Tensor, layout: Int4Layout) -> torch.Tensor:
    """qweight rows [n, K / 2] (for "cpu": starting at a block boundary) -> codes uint8 [n, K]."""
    if layout.kind == "plain":
        return unpack_nibbles(p)
    if layout.kind != "cpu":
        raise NotImplementedError(f"int4 layout {layout.kind!r} cannot be read back; quantize on the CPU to save")
    n, K = p.shape[0], 2 * p.shape[1]
    B = layout.block
    full = n // B * B
    out = torch.empty(n, K, dtype=torch.uint8, device=p.device)
    if full:
        b = p[:full].view(full // B, K, B // 2)  # each block: K rows of B/2 bytes
        q = torch.stack([b & 15, b >> 4], dim=-2 if layout.halves else -1)  # [nb, K, 2, B/2] or [nb, K, B/2, 2]
        out[:full] = q.view(full // B, K, B).transpose(1, 2).reshape(full, K)
    if full < n:  # the last, shorter block: pairs of rows
        b = p[full:].view(K, (n - full) // 2)
        out[full:] = torch.stack([b & 15, b >> 4], dim=-1).view(K, n - full).T
    return out


# ---- the product -------------------------------------------------------------------------------------------------
def dequantize_tile_t(qweight: torch.Tensor, scale_zeros: torch.Tensor, layout: Int4Layout, start: int,
                      out: torch.Tensor) -> torch.Tensor:
    """Rows start : start + m of the matrix, dequantized and transposed into `out` [K, m] (its dtype). Transposed,
    because torch's CPU packing stores each block of rows k-major: codes land in runs of B/2 contiguous values and
    the scales broadcast along the contiguous dimension. Eager torch, so the fewest passes: the high nibbles are
    copied as 16 * code (b & 0xF0; a uint8 shift is several times slower) and their scales divided by 16."""
    K, m = out.shape
    G = scale_zeros.shape[0]
    p = qweight[start:start + m]
    sz = scale_zeros[:, start:start + m].float()  # [G, m, 2]
    s, z = sz[..., 0], sz[..., 1] - 8 * sz[..., 0]  # z: the value of code 0
    if layout.kind == "cpu":
        B = layout.block
        full = m // B * B
        if full:
            b = p[:full].view(full // B, K, B // 2)  # [nb, K, B/2] bytes
            dst = out[:, :full].unflatten(1, (full // B, B)).transpose(0, 1)  # [nb, K, B], a view of out
            dst = dst.unflatten(2, (2, B // 2) if layout.halves else (B // 2, 2))
            low, high = (dst[:, :, 0], dst[:, :, 1]) if layout.halves else (dst[..., 0], dst[..., 1])
            low.copy_(b & 15)
            high.copy_(b & 240)
        if full < m:  # a last, shorter block: pairs of rows
            b = p[full:].view(K, (m - full) // 2)
            dst = out[:, full:].unflatten(1, ((m - full) // 2, 2))
            dst[..., 0].copy_(b & 15)
            dst[..., 1].copy_(b & 240)
        s = s * _high_rows(layout, m, s.device)
    else:
        dst = out.view(K // 2, 2, m)
        dst[:, 0].copy_((p & 15).T)
        dst[:, 1].copy_((p >> 4).T)
    w = out.view(G, K // G, m)
    return torch.addcmul(z.unsqueeze(1).to(out.dtype), w, s.unsqueeze(1).to(out.dtype), out=w).view(K, m)


@functools.lru_cache(maxsize=64)
def _high_rows(layout: Int4Layout, m: int, device: torch.device) -> torch.Tensor:
    """[m]: 1/16 for the rows a "cpu" tile of m rows keeps in high nibbles (copied as 16 * code), 1 elsewhere."""
    B, full = layout.block, m // layout.block * layout.block
    f = torch.ones(m, device=device)
    f[full + 1::2] = 1 / 16  # a shorter last block holds pairs
    f[:full].view(-1, 2, B // 2)[:, 1] = 1 / 16 if layout.halves else 1
    if not layout.halves:
        f[1:full:2] = 1 / 16
    return f


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scale_zeros: torch.Tensor, layout: Int4Layout,
                out_features: int, bias: torch.Tensor | None = None, kernel_rows: int = KERNEL_ROWS) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] in x's dtype, W int4 in `layout`. The kernels take activations in
    bf16 (rounded on the way in) and accumulate in fp32; the tile path multiplies in x's dtype."""
    N, K = out_features, x.shape[-1]
    x2 = x.reshape(-1, K)
    if layout.kind == "cuda" or (layout.kind == "cpu" and x2.shape[0] <= kernel_rows):
        op = torch.ops.aten._weight_int4pack_mm if layout.kind == "cuda" else \
            torch.ops.aten._weight_int4pack_mm_for_cpu
        y = op(x2.to(KERNEL_DTYPE).contiguous(), qweight, K // scale_zeros.shape[0], scale_zeros).to(x.dtype)
    else:
        step = max(1, TILE // K)
        if layout.kind == "cpu":
            step = max(layout.block, step // layout.block * layout.block)  # tiles start on block boundaries
        y = linear_by_tiles(x2, N, lambda n, m, buf: dequantize_tile_t(qweight, scale_zeros, layout, n,
                                                                          buf.view(K, m)).T, step)
    y = y if bias is None else y + bias.to(x.dtype)
    return y.view(*x.shape[:-1], N)


def int4_linear_reference(x: torch.Tensor, q: torch.Tensor, scale_zeros: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The slow twin: codes [N, K] dequantized in fp32, multiplied in fp32."""
    y = x.float() @ dequantize_groups(q, scale_zeros).T
    return (y if bias is None else y + bias.float()).to(x.dtype)


# ---- modules -----------------------------------------------------------------------------------------------------
class Int4Linear(nn.Module):
    """y = x @ W^T (+ bias), W [N, K] in int4 groups; or a stack of E such matrices (`stack=E`, the routed
    experts), multiplied one at a time with `forward(x, e)`. Built empty from shapes (then loaded), or from a
    plain tensor with `from_weight` / `from_linear`. `device` holds the buffers; `target` is the device the layout
    is for (default: `device`; a module built on the meta device for CUDA passes target="cuda")."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = GROUP_SIZE,
                 kernel: bool = True, stack: int | None = None, kernel_rows: int = KERNEL_ROWS,
                 device: torch.device | str | None = None, target: torch.device | str | None = None):
        super().__init__()
        device = torch.device(device) if device is not None else torch.get_default_device()
        self.in_features, self.out_features, self.stack = in_features, out_features, stack
        self.group_size = group_size_for(in_features, group_size)
        self.layout = choose_layout(out_features, in_features, self.group_size, kernel, target or device)
        self.kernel_rows = kernel_rows
        S = () if stack is None else (stack,)
        G = in_features // self.group_size
        if self.layout.kind == "cuda":  # tinygemm's tiles
            t = self.layout.inner_k_tiles
            shape, dtype = (out_features // 8, in_features // (t * 16), 32, t // 2), torch.int32
        else:
            shape, dtype = (out_features, in_features // 2), torch.uint8
        if in_features % 2:
            raise ValueError(f"int4 needs an even number of inputs, got a matrix with {in_features}")
        self.register_buffer("qweight", torch.empty(*S, *shape, dtype=dtype, device=device))
        self.register_buffer("scale_zeros", torch.empty(*S, G, out_features, 2, dtype=KERNEL_DTYPE, device=device))
        self.bias = None if not bias else nn.Parameter(torch.empty(out_features, device=device), requires_grad=False)

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None = None, **kwargs) -> "Int4Linear":
        """w [N, K], or [E, N, K] for a stack (quantized one matrix at a time: no fp32 copy of the stack)."""
        stack = w.shape[0] if w.dim() == 3 else None
        new = cls(w.shape[-1], w.shape[-2], bias is not None, stack=stack, device=w.device, **kwargs)
        for e, m in enumerate([w] if stack is None else w):
            q, sz = quantize_groups(m, new.group_size)
            new.qweight[... if stack is None else e] = pack(q, new.layout)
            new.scale_zeros[... if stack is None else e] = sz
        if bias is not None:
            new.bias.data = bias.detach().float()
        return new

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "Int4Linear":
        return cls.from_weight(linear.weight, linear.bias, **kwargs)

    def codes(self, e: int | None = None) -> torch.Tensor:
        """The codes uint8 [N, K] (of stack member e), whatever the layout."""
        return unpack(self.qweight if e is None else self.qweight[e], self.layout)

    def forward(self, x: torch.Tensor, e: int | None = None) -> torch.Tensor:
        qweight, sz = (self.qweight, self.scale_zeros) if e is None else (self.qweight[e], self.scale_zeros[e])
        return int4_linear(x, qweight, sz, self.layout, self.out_features, self.bias, self.kernel_rows)

    # state_dict() holds qweight in the portable layout whatever the layout in memory (but tinygemm's tiles, which
    # are not read back: a CUDA model's state_dict holds them as they are -- quantize on a CPU to write a file)
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout.kind == "cpu":
            members = [self.codes()] if self.stack is None else [self.codes(e) for e in range(self.stack)]
            destination[prefix + "qweight"] = torch.stack([pack_nibbles(q) for q in members]).view(
                *self.scale_zeros.shape[:-3], self.out_features, self.in_features // 2)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "qweight"
        if self.layout.kind != "plain" and key in state_dict and state_dict[key].dtype == torch.uint8:
            portable = state_dict[key]
            members = [portable] if self.stack is None else list(portable)
            state_dict = dict(state_dict)
            state_dict[key] = torch.stack([pack(unpack_nibbles(p.to(self.qweight.device)), self.layout)
                                           for p in members]).view(self.qweight.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        stack = "" if self.stack is None else f", stack={self.stack}"
        return (f"in_features={self.in_features}, out_features={self.out_features}{stack}, "
                f"group_size={self.group_size}, layout={self.layout.kind}")


class Int4MLP(nn.Module):
    """SwiGLU MLP (dense layers, shared experts) with gate and up fused into one int4 matrix."""

    def __init__(self, gate_up: Int4Linear, down: Int4Linear):
        super().__init__()
        self.gate_up, self.down = gate_up, down

    @classmethod
    def from_mlp(cls, mlp: MLP, **kwargs) -> "Int4MLP":
        return cls(Int4Linear.from_weight(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), **kwargs),
                   Int4Linear.from_weight(mlp.down_proj.weight, **kwargs))

    @classmethod
    def empty(cls, hidden_size: int, intermediate_size: int, **kwargs) -> "Int4MLP":
        return cls(Int4Linear(hidden_size, 2 * intermediate_size, **kwargs),
                   Int4Linear(intermediate_size, hidden_size, **kwargs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Int4Experts(ExpertGroup):
    """Routed experts as stacks of int4 matrices, quantized expert by expert (the token grouping is ExpertGroup's)."""

    def __init__(self, gate_up: Int4Linear, down: Int4Linear):
        super().__init__(gate_up.stack)
        self.gate_up, self.down = gate_up, down  # [E, 2I, H], [E, H, I]

    @classmethod
    def from_experts(cls, experts: Experts, **kwargs) -> "Int4Experts":
        return cls(Int4Linear.from_weight(experts.gate_up_proj, **kwargs),
                   Int4Linear.from_weight(experts.down_proj, **kwargs))

    @classmethod
    def empty(cls, n_experts: int, hidden_size: int, intermediate_size: int, **kwargs) -> "Int4Experts":
        return cls(Int4Linear(hidden_size, 2 * intermediate_size, stack=n_experts, **kwargs),
                   Int4Linear(intermediate_size, hidden_size, stack=n_experts, **kwargs))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x, e).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up, e)
