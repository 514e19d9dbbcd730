"""SwiGLU experts on the CPU in one C++ call (moe_cpu.cpp): a MoE layer's routed experts over all of their tokens,
one dense / shared-experts MLP, or a plain linear, for inference on few rows (decode).

Eager PyTorch multiplies routed experts one expert at a time: at 16 decode sequences ~28 of 32 experts a layer each
get ~2 rows, and every one of those products pays a library call and a pass over the weight at a matrix-vector
product's speed. The kernel groups the layer's assignments by expert in C++, reads each weight row once and dots it
with all of that expert's tokens from registers (gate and up rows, then down with the weighted combine), each thread
streaming one contiguous range of the weights (bf16 dot-product instructions on AVX-512 BF16 CPUs, widened fp32 FMAs
on AVX-512 / AVX2).

The slow twins are the torch paths it replaces (ExpertGroup.forward's grouping loop, Experts.forward_reference,
MLP's three linears, F.linear): tests/test_cpu_moe.py compares them. Used where `takes()` says so: frozen CPU
weights, bf16 or fp32, with activations in the same dtype or fp32 (the upcast plan), up to EXPERT_ROWS / MLP_ROWS
rows (larger products stay with torch's / oneDNN's GEMMs, which are faster there). bf16 intermediates are rounded
where torch's bf16 operators round them, so the kernel and its twins differ by the order of fp32 sums only.

Shape legend: T tokens, H hidden, K experts per token, E experts, I expert width.
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch

from .cpu_build import load

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe_cpu.cpp")

# Rows up to which the kernel takes a product (benchmarks/cpu_moe.py, mini model widths, 2 threads, AMD EPYC Zen 4,
# BENCHMARKS.md): a layer's routed experts 2.2-2.9x oneDNN's prepacked per-expert calls at 1-8 tokens, 1.9x at 16,
# ~1.0x from 64 on, and 1.2-1.6x torch's plain per-expert loop at 64-256 (0.96x at 256 in a noisier run); one MLP
# 1.5x torch's plain matmuls at 8 rows, 1.1x at 16, 0.7x from 64. The kernel's tiles are built for reading weights,
# not for arithmetic.
EXPERT_ROWS = 128
MLP_ROWS = 8


def takes(x: torch.Tensor, weight: torch.Tensor, max_rows: int) -> bool:
    """Whether the kernel computes a product of activations x [..., H] (at most max_rows rows) with this weight:
    frozen weights on the CPU (the inference form, model/inference.py, or a frozen base under adapters), no
    gradient to carry, not while torch.compile traces; bf16 or fp32 weights, x in their dtype or fp32. A trainable
    model keeps torch's path even under no_grad, so its outputs stay bit for bit those of training's forward."""
    return (not torch.compiler.is_compiling() and x.device.type == "cpu" and weight.device.type == "cpu"
            and not weight.requires_grad and not (torch.is_grad_enabled() and x.requires_grad)
            and weight.dtype in (torch.bfloat16, torch.float32)
            and (x.dtype == weight.dtype or x.dtype == torch.float32)
            and x.numel() <= max_rows * x.shape[-1] and kernel() is not None)


def stacked_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                    idx: torch.Tensor) -> torch.Tensor:
    """Routed experts stored stacked (model.moe.Experts): gate_up [E, 2I, H] (rows [gate I | up I]), down [E, H, I]."""
    I = down.shape[-1]
    return swiglu_experts(x, gate_up[:, :I], gate_up[:, I:], down, weights, idx)


def swiglu_experts(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   weights: torch.Tensor | None = None, idx: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k weights[t, k] * down[e] (silu(gate[e] x[t]) * up[e] x[t]) with e = idx[t, k], x [T, H] -> [T, H] in
    x's dtype. gate, up [E, I, H] and down [E, H, I] may be views with any expert stride (gate_up_proj[:, :I]) but
    contiguous rows. weights/idx [T, K] None: one MLP (E = 1) that every token goes through with weight 1."""
    lib = kernel()
    if lib is None:
        raise RuntimeError(f"the CPU expert kernel is not built here: {unavailable_reason()}")
    T, H = x.shape
    E, I, _ = gate.shape
    w_dtype = gate.dtype
    for name, t, shape in (("gate", gate, (E, I, H)), ("up", up, (E, I, H)), ("down", down, (E, H, I))):
        if t.shape != shape or t.dtype != w_dtype or t.stride(-1) != 1 or t.stride(-2) != shape[-1]:
            raise ValueError(f"{name} {tuple(t.shape)} {t.dtype} (strides {t.stride()}) is not {shape} {w_dtype} "
                             "with contiguous rows")
    if gate.stride(0) != up.stride(0):
        raise ValueError("gate and up must share their expert stride")
    x = x.contiguous()
    if x.dtype != w_dtype and x.dtype != torch.float32:
        x = x.float()
    out = torch.empty(T, H, dtype=x.dtype)
    if idx is not None:
        idx = idx.to(torch.int64).contiguous()
        weights = weights.to(torch.float32).contiguous()
    status = lib.dsv2_swiglu_experts(
        x.data_ptr(), x.dtype == torch.bfloat16, T, H, 0 if idx is None else idx.data_ptr(),
        0 if weights is None else weights.data_ptr(), 0 if idx is None else idx.shape[1], gate.data_ptr(),
        up.data_ptr(), gate.stride(0), down.data_ptr(), down.stride(0), w_dtype == torch.bfloat16, E, I,
        out.data_ptr(), out.dtype == torch.bfloat16)
    if status == -1:
        raise ValueError(f"expert ids out of range [0, {E}): {idx.min().item()}..{idx.max().item()}")
    if status != 0:
        raise ValueError(f"dsv2_swiglu_experts rejected x {x.dtype} over weights {w_dtype}")
    return out


def mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down (silu(gate x) * up x) for x [..., H], gate/up [I, H], down [H, I] (a dense or shared-experts MLP)."""
    y = swiglu_experts(x.reshape(-1, x.shape[-1]), gate[None], up[None], down[None])
    return y.view(x.shape)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T -> [..., N] in x's dtype, for a few rows (one weight stream per thread)."""
    lib = kernel()
    if lib is None:
        raise RuntimeError(f"the CPU expert kernel is not built here: {unavailable_reason()}")
    N, K = weight.shape
    if weight.stride() != (K, 1) or x.shape[-1] != K:
        raise ValueError(f"weight {tuple(weight.shape)} (strides {weight.stride()}) does not take x {tuple(x.shape)}")
    rows = x.reshape(-1, K)
    if rows.dtype != weight.dtype and rows.dtype != torch.float32:
        rows = rows.float()
    rows = rows.contiguous()
    out = torch.empty(*x.shape[:-1], N, dtype=rows.dtype)
    status = lib.dsv2_linear(rows.data_ptr(), rows.dtype == torch.bfloat16, rows.shape[0], K, weight.data_ptr(),
                             weight.dtype == torch.bfloat16, N, out.data_ptr(), out.dtype == torch.bfloat16)
    if status != 0:
        raise ValueError(f"dsv2_linear rejected x {rows.dtype} over weights {weight.dtype}")
    return out if out.dtype == x.dtype else out.to(x.dtype)


def kernel() -> ctypes.CDLL | None:
    """The built library, or None when it cannot be built here (`unavailable_reason()` says why). Built once per
    process and machine kind; a failed build is not retried in the process."""
    lib = _load()
    return None if isinstance(lib, str) else lib


def unavailable_reason() -> str | None:
    lib = _load()
    return lib if isinstance(lib, str) else None


def bf16_dot() -> bool:
    """Whether bf16 x bf16 products use the CPU's bf16 dot-product instruction (AVX-512 BF16)."""
    lib = _load()
    return not isinstance(lib, str) and bool(lib.dsv2_swiglu_experts_bf16_dot())


@functools.cache
def _load() -> ctypes.CDLL | str:
    ptr, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    return load(SOURCE, {"dsv2_swiglu_experts": ([ptr, i32, i32, i32, ptr, ptr, i32, ptr, ptr, i64, ptr, i64, i32,
                                                  i32, i32, ptr, i32], i32),
                         "dsv2_linear": ([ptr, i32, i32, i32, ptr, i32, i32, ptr, i32], i32),
                         "dsv2_swiglu_experts_bf16_dot": ([], i32)},
                "CPU experts run through torch's matmuls, slower at decode")


# Opaque operators for compiled decode (engine/compiled.py): the kernel's products as single graph nodes.
_LIB = torch.library.Library("dsv2", "FRAGMENT")
_LIB.define("cpu_linear(Tensor x, Tensor weight) -> Tensor")
_LIB.define("cpu_mlp(Tensor x, Tensor gate, Tensor up, Tensor down) -> Tensor")
_LIB.define("cpu_experts(Tensor x, Tensor gate_up, Tensor down, Tensor weights, Tensor idx) -> Tensor")
_LIB.impl("cpu_linear", linear, "CompositeExplicitAutograd")
_LIB.impl("cpu_mlp", mlp, "CompositeExplicitAutograd")
_LIB.impl("cpu_experts", stacked_experts, "CompositeExplicitAutograd")


@torch.library.register_fake("dsv2::cpu_linear")
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.register_fake("dsv2::cpu_mlp")
def _(x, gate, up, down):
    return torch.empty_like(x)


@torch.library.register_fake("dsv2::cpu_experts")
def _(x, gate_up, down, weights, idx):
    return torch.empty_like(x)
