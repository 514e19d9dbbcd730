"""Absorbed MLA decode on the CPU: over the paged cache by a small C++ kernel built at first use
(mla_decode_cpu.cpp), or through SDPA's fused CPU kernel where it cannot be built; as one opaque operator
(dsv2::paged_latent_attention) for compiled decode.

The C++ kernel (flash-decoding: each sequence's context in several ranges of blocks across the threads, an online
softmax per range, a combine) reads each cached row once, in place through the block table, converts it to fp32 and
serves every head from L1; on CPUs with AVX-512 BF16 a bf16 model's scores come straight from the stored rows by the
bf16 dot-product instruction. On CPUs with AMX tiles (Intel Sapphire Rapids and later) a bf16 model's scores and
weighted sums are tile products instead, the softmax weights split into two bf16 parts (~16 bits of each kept).
benchmarks/cpu_attention.py measures them (BENCHMARKS.md). It is built at first use for the vector ISA torch runs
with and cached (kernels/cpu_build.py). Apart from the tile path's weights, all of it is fp32 past the loads, like
the slow twin model.mla.latent_attention.

SDPA's form, where the kernel is not built or the cache is neither bf16 nor fp32:
One query per sequence attends in the latent space: the n heads of a sequence become n query positions of a single
head (multi-query attention with one shared key), and the latent row is both key and value (the value is its first
R columns), so SDPA's flash kernel reads the context in its stored dtype, block by block, with no fp32 copy. Its
scores and softmax are fp32 (bf16 products summed in fp32); the weights meet the values rounded to the input dtype,
as in flash attention, which keeps the error at the size of the output's own rounding to bf16. The slow twin is
model.mla.latent_attention (tests/test_model_internals.py, tests/test_compiled_decode.py).

Shape legend: B sequences, n heads, L context positions, R kv_lora_rank, Dr qk_rope_head_dim, NB cache blocks,
BS block size, W blocks per block-table row.
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch
import torch.nn.functional as F

from .cpu_build import arch_flags, build, cache_dir, compiler, load  # noqa: F401 (re-exported)
from .triton_mla import paged_slots

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mla_decode_cpu.cpp")

# AMX tiles for a bf16 query and cache where the build has them and Linux grants the tile state (Intel Sapphire
# Rapids and later; `amx()` says); DSV2_NO_AMX=1, or setting this False, keeps the vector path (the A/B switch).
USE_AMX = not os.environ.get("DSV2_NO_AMX")


def latent_attention_sdpa(q_abs: torch.Tensor, latent: torch.Tensor, pad: torch.Tensor | None, rank: int,
                          scale: float) -> torch.Tensor:
    """Queries [..., n, R + Dr] against latents [..., L, R + Dr], pad [..., L] (True: ignore) -> o_lat [..., n, R]
    in q_abs's dtype. A latent of another dtype than the query (FP8 caches dequantize to fp32) runs in fp32."""
    dtype = q_abs.dtype if latent.dtype == q_abs.dtype else torch.float32
    lead, n, L = q_abs.shape[:-2], q_abs.shape[-2], latent.shape[-2]
    q = q_abs.to(dtype).reshape(-1, 1, n, q_abs.shape[-1])  # [B, 1 head, n "positions", R + Dr]
    kv = latent.to(dtype).reshape(-1, 1, L, latent.shape[-1])  # [B, 1, L, R + Dr]
    mask = None if pad is None else ~pad.reshape(-1, 1, 1, L)  # True: attend
    out = F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, scale=scale)  # [B, 1, n, R + Dr]
    return out[:, 0, :, :rank].reshape(*lead, n, rank).to(q_abs.dtype)


def paged_latent_attention(q_abs: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, rank: int, scale: float) -> torch.Tensor:
    """Decode over block tables, q_abs [B, n, R + Dr], cache [NB, BS, R + Dr] (as stored, not FP8), block_tables
    [B, W], context_lens [B] -> o_lat [B, n, R] in q_abs's dtype, contiguous. The C++ kernel where it is built and
    the cache is bf16 or fp32; else every slot a table row can name is gathered (static shapes, masked past each
    context) and attended by latent_attention_sdpa. Compiled decode calls this as the opaque operator
    dsv2::paged_latent_attention: traced, the SDPA form copies the gathered context once for the key and once for
    the value and builds its mask in a separate pass."""
    kernel = kernel_for(cache)
    if kernel is not None:
        return mla_decode_cpu(kernel, q_abs, cache, block_tables, context_lens, rank, scale)
    slots, pad = paged_slots(block_tables, context_lens, cache.shape[1])
    latent = cache.view(-1, cache.shape[-1]).index_select(0, slots).view(*pad.shape, -1)  # [B, W * BS, R + Dr]
    return latent_attention_sdpa(q_abs, latent, pad, rank, scale).contiguous()  # the layout the fake promises


def splits_for(batch: int, blocks: int) -> int:
    """Ranges of blocks per sequence: enough work items for every thread about twice, each of a few blocks."""
    return max(1, min(-(-2 * torch.get_num_threads() // batch), blocks // 4 or 1))


def mla_decode_cpu(kernel, q_abs: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                   context_lens: torch.Tensor, rank: int, scale: float, splits: int | None = None) -> torch.Tensor:
    """The C++ kernel's call (see paged_latent_attention for the shapes); `splits` ranges per sequence. Little
    Python on purpose (it runs once per layer and step): block tables and lengths are read in place through their
    strides (compiled decode passes views of its input rows), bf16 queries and outputs need no conversion here."""
    B, n, D = q_abs.shape
    W, BS = block_tables.shape[1], cache.shape[1]
    if cache.shape[-1] != D or not cache.is_contiguous():
        raise ValueError(f"cache {tuple(cache.shape)} (contiguous: {cache.is_contiguous()}) does not hold {D}-wide rows")
    q = (q_abs if q_abs.dtype in (torch.bfloat16, torch.float32) else q_abs.float()).contiguous()
    tables = block_tables if block_tables.dtype == torch.int32 and block_tables.stride(1) == 1 \
        else block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32)
    out = torch.empty(B, n, rank, dtype=q.dtype)
    status = kernel(q.data_ptr(), q.dtype == torch.bfloat16, cache.data_ptr(), cache.dtype == torch.bfloat16,
                    tables.data_ptr(), tables.stride(0), lens.data_ptr(), lens.stride(0), out.data_ptr(),
                    q.dtype == torch.bfloat16, B, n, D, rank, BS, W, splits or splits_for(B, W), scale, USE_AMX)
    if status != 0:
        raise ValueError(f"dsv2_mla_decode rejected its shapes (B={B}, n={n}, D={D}, R={rank}, BS={BS}, W={W})")
    return out if out.dtype == q_abs.dtype else out.to(q_abs.dtype)


# ---- building the kernel (kernels/cpu_build.py) ------------------------------------------------------------
def decode_kernel():
    """The built kernel's function (ctypes), or None when it cannot be built here (`unavailable_reason()` says
    why). Built once per process and machine kind; a failed build is not retried in the process."""
    lib = _load()
    return None if isinstance(lib, str) else lib.dsv2_mla_decode


def kernel_for(cache: torch.Tensor):
    """decode_kernel() when it can read this cache (on the CPU, bf16 or fp32 rows), else None."""
    return decode_kernel() if cache.device.type == "cpu" and cache.dtype in (torch.bfloat16, torch.float32) else None


def unavailable_reason() -> str | None:
    """Why the CPU decode kernel is not used here; None when it is built (this builds it if need be)."""
    lib = _load()
    return lib if isinstance(lib, str) else None


def bf16_dot() -> bool:
    """Whether the built kernel computes bf16 scores with the CPU's dot-product instruction (AVX-512 BF16)."""
    lib = _load()
    return not isinstance(lib, str) and bool(lib.dsv2_mla_decode_bf16_dot())


def amx() -> bool:
    """Whether the built kernel multiplies bf16 queries and caches (latent and rope widths multiples of 32) with AMX
    tiles here: built for a CPU with AMX-BF16 and granted the tile state by Linux."""
    lib = _load()
    return not isinstance(lib, str) and bool(lib.dsv2_mla_decode_amx())


_ptr, _i32, _i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
SIGNATURES = {  # the library's functions: (argtypes, restype)
    "dsv2_mla_decode": ([_ptr, _i32, _ptr, _i32, _ptr, _i64, _ptr, _i64, _ptr, _i32] + [_i32] * 7
                        + [ctypes.c_float, _i32], _i32),
    "dsv2_mla_decode_bf16_dot": ([], _i32),
    "dsv2_mla_decode_amx": ([], _i32),
}


@functools.cache
def _load() -> ctypes.CDLL | str:
    """The kernel's library, or why it could not be built (said once on stderr; the SDPA form serves then)."""
    return load(SOURCE, SIGNATURES, "CPU decode attention runs through SDPA, ~2x slower at long contexts")


def _build() -> str:
    return build(SOURCE)


# Registered with torch.library.Library (not the custom_op decorator, whose wrapper costs ~2x per call).
_LIB = torch.library.Library("dsv2", "FRAGMENT")
_LIB.define("paged_latent_attention(Tensor q_abs, Tensor cache, Tensor block_tables, Tensor context_lens, int rank, "
            "float scale) -> Tensor")
_LIB.impl("paged_latent_attention", paged_latent_attention, "CompositeExplicitAutograd")


@torch.library.register_fake("dsv2::paged_latent_attention")
def _(q_abs, cache, block_tables, context_lens, rank, scale):
    return q_abs.new_empty(*q_abs.shape[:-1], rank)
