"""Absorbed MLA decode over the paged latent cache, as a Triton kernel (flash-decoding: split-KV + a combine).

One new token per sequence attends to its whole context in the 576-wide latent space: scores = q_lat . c_kv +
q_pe . k_pe (times softmax_scale), o_lat = softmax . c_kv; W_UK and W_UV stay outside (MLA.absorb_query /
absorbed_output). Every head reads the same latent row, so a program takes a block of BLOCK_H heads (padded and
masked: 1, 2-8 tensor-parallel heads, 16, 128 all work) and one slice of the context; the slices' partial
(out, log-sum-exp) meet in a second kernel. Scores, softmax and accumulators are fp32; the products' inputs are
bf16 where the query and cache are (tensor cores), fp32 otherwise. The FP8 cache layout (model.mla.Fp8Latent) is
decoded in the kernel: e4m3 codes -> fp16 bits (the same exact trick as mla.e4m3_as_fp16) times the group scale.

The plain twin is mla.latent_attention over the context gathered with paged_slots (where Triton is not, the model
gathers the same way and attends through SDPA on the CPU); tests/test_triton_mla.py compares kernel and twin under
TRITON_INTERPRET=1.

Shape legend: B sequences, n heads, R kv_lora_rank, Dr qk_rope_head_dim, NB cache blocks, BS block size,
W blocks per block-table row, S context splits, G fp8 scale groups.
"""
from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR = None
except ImportError as e:  # the CPU install has no triton; the model falls back to the torch path
    triton, tl, _IMPORT_ERROR = None, None, f"triton is not installed ({e}); pip install triton"

BLOCK_H = 16  # heads per program: tl.dot needs >= 16 rows, fewer heads are padded
BLOCK_N = 32  # context tokens per inner step
MAX_SPLITS = 32


def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """None when mla_decode can run on `device`: CUDA with triton installed, or CPU under the Triton interpreter
    (TRITON_INTERPRET=1, for tests); else why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    kind = torch.device(device).type
    if kind == "cuda" or (kind == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    return f"the Triton MLA kernel runs on CUDA (or on CPU under TRITON_INTERPRET=1), not on {kind}"


def paged_slots(block_tables: torch.Tensor, context_lens: torch.Tensor,
                block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Static-shape context slots of each sequence: every position a block-table row can name, masked past its
    length. block_tables [B, W], context_lens [B] -> slots [B * W * BS] (gather these cache rows), pad [B, W * BS]
    (True past the context). No host sync, so a CUDA graph can hold it; it reads W * BS rows per sequence, which is
    why the kernel (reading only the context) is the fast path."""
    offsets = torch.arange(block_size, device=block_tables.device)
    slots = (block_tables.long()[:, :, None] * block_size + offsets).flatten(1)  # [B, W * BS]
    pad = torch.arange(slots.shape[1], device=slots.device) >= context_lens[:, None]
    return slots.flatten(), pad


def default_splits(batch: int, heads: int, device: torch.device) -> int:
    """Enough context splits that B x head-blocks x S programs fill the GPU about twice: batch-1 decode has one
    program per head block otherwise, leaving most multiprocessors idle. Depends on shapes only (graph-safe)."""
    programs = batch * -(-heads // BLOCK_H)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(MAX_SPLITS, -(-2 * sms // programs)))


def mla_decode(q_abs: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
               rank: int, softmax_scale: float, fp8=None, num_splits: int | None = None) -> torch.Tensor:
    """Latent attention of one query per sequence over its paged context -> o_lat [B, n, R] in q_abs's dtype.

    q_abs [B, n, R + Dr] (MLA.absorb_query), cache [NB, BS, R + Dr] bf16/fp16/fp32, or [NB, BS, W] uint8 in the
    layout of `fp8` (an mla.Fp8Latent); block_tables [B, W] int (entries past a context are never read);
    context_lens [B] int, each at most W * BS (not checked: that would sync; a 0 gives a zero output); rank R.
    num_splits: context slices per sequence (default: from the shapes, see default_splits)."""
    B, n, width = q_abs.shape
    R, Dr = rank, width - rank
    BS = cache.shape[1]
    if fp8 is None:
        if cache.shape[-1] != width:
            raise ValueError(f"mla_decode: cache rows are {cache.shape[-1]} wide, the query {width} (R + Dr)")
        c_kv, scales, k_pe = cache, cache, cache[..., R:]  # scales: unused placeholder
    else:
        if (fp8.rank, fp8.rope) != (R, Dr) or cache.dtype != torch.uint8:
            raise ValueError(f"mla_decode: an fp8 cache needs uint8 rows in the layout of {fp8}")
        codes, scales, k_pe = fp8.parts(cache)
        c_kv = codes.view(torch.uint8)
    reason = triton_unavailable_reason(q_abs.device)
    if reason is not None:
        raise RuntimeError(f"mla_decode: {reason}")
    q = q_abs if q_abs.stride(-1) == 1 else q_abs.contiguous()
    half = q.dtype in (torch.bfloat16, torch.float16) and (fp8 is not None or cache.dtype == q.dtype)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:  # the interpreter (triton 3.9) does bf16 arithmetic
        half = False  # on the raw bits: products in fp32 there; fp16 runs the 16-bit branch in the tests
    S = num_splits or default_splits(B, n, q.device)
    part = torch.empty(B, n, S, R, dtype=torch.float32, device=q.device)  # each split's normalized output
    lse = torch.empty(B, n, S, dtype=torch.float32, device=q.device)  # and its log2-sum-exp2 of scores
    tables, lens = block_tables.to(torch.int32), context_lens.to(torch.int32).contiguous()
    tables = tables if tables.stride(1) == 1 else tables.contiguous()  # rows may be strided (a static buffer)
    BLOCK_R, BLOCK_DR = max(16, triton.next_power_of_2(R)), max(16, triton.next_power_of_2(Dr))
    _split_kernel[(B, triton.cdiv(n, BLOCK_H), S)](
        q, q.stride(0), q.stride(1),
        c_kv, c_kv.stride(0), c_kv.stride(1),
        scales, scales.stride(0), scales.stride(1),
        k_pe, k_pe.stride(0), k_pe.stride(1),
        tables, tables.stride(0), lens,
        part, part.stride(0), part.stride(1), part.stride(2),
        lse, lse.stride(0), lse.stride(1),
        n, softmax_scale * math.log2(math.e),
        R=R, DR=Dr, BLOCK_R=BLOCK_R, BLOCK_DR=BLOCK_DR, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, PAGE=BS, SPLITS=S,
        FP8=fp8 is not None, GROUP=fp8.group_size if fp8 is not None else 1, HALF=half)
    out = torch.empty(B, n, R, dtype=q.dtype, device=q.device)
    _combine_kernel[(B, n)](part, part.stride(0), part.stride(1), part.stride(2), lse, lse.stride(0),
                            lse.stride(1), out, out.stride(0), out.stride(1),
                            R=R, BLOCK_R=BLOCK_R, SPLITS=S, BLOCK_S=triton.next_power_of_2(S))
    return out


if triton is not None:
    @triton.jit
    def _split_kernel(Q, stride_qb, stride_qh, C, stride_cb, stride_ct, SC, stride_sb, stride_st,
                      PE, stride_pb, stride_pt, TABLES, stride_tb, LENS,
                      PART, stride_ob, stride_oh, stride_os, LSE, stride_lb, stride_lh,
                      n_heads, scale_log2,
                      R: tl.constexpr, DR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SPLITS: tl.constexpr,
                      FP8: tl.constexpr, GROUP: tl.constexpr, HALF: tl.constexpr):
        """Program (b, head block, split): online softmax over the split's tokens; writes the split's normalized
        output [BLOCK_H, R] and log2-sum-exp2 [BLOCK_H] (-inf for an empty split)."""
        b, hb, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        r, d = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_DR)
        h_ok, r_ok, d_ok = heads < n_heads, r < R, d < DR
        q_row = Q + b * stride_qb + heads[:, None] * stride_qh
        q_lat = tl.load(q_row + r[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_R]
        q_pe = tl.load(q_row + R + d[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_DR]
        if HALF:  # the products' inputs in the query's 16-bit type, accumulated in fp32
            q_lat, q_pe = q_lat.to(Q.dtype.element_ty), q_pe.to(Q.dtype.element_ty)
        else:
            q_lat, q_pe = q_lat.to(tl.float32), q_pe.to(tl.float32)

        length = tl.load(LENS + b)
        per_split = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N  # whole inner steps per split
        start = split * per_split
        end = tl.minimum(start + per_split, length)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
        for first in range(start, end, BLOCK_N):
            pos = first + tl.arange(0, BLOCK_N)
            ok = pos < end
            block = tl.load(TABLES + b * stride_tb + pos // PAGE, mask=ok, other=0).to(tl.int64)
            c_row = block * stride_cb + (pos % PAGE) * stride_ct  # [BLOCK_N] element offsets of the rows
            c_mask = ok[:, None] & r_ok[None, :]
            if FP8:  # e4m3 bits -> fp16 bits (exactly 2^-8 times the value), times 256 * the group's scale
                u = tl.load(C + c_row[:, None] + r[None, :], mask=c_mask, other=0).to(tl.int32)
                bits = ((u & 0x7F) << 7) | ((u & 0x80) << 8)
                s_row = block * stride_sb + (pos % PAGE) * stride_st
                scale = tl.load(SC + s_row[:, None] + (r // GROUP)[None, :], mask=c_mask, other=0.0)
                c = bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * (scale * 256.0)
            else:
                c = tl.load(C + c_row[:, None] + r[None, :], mask=c_mask, other=0.0)  # [BLOCK_N, BLOCK_R]
            p_row = block * stride_pb + (pos % PAGE) * stride_pt
            k_pe = tl.load(PE + p_row[:, None] + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
            if HALF:
                c, k_pe = c.to(Q.dtype.element_ty), k_pe.to(Q.dtype.element_ty)
                s = tl.dot(q_lat, tl.trans(c)) + tl.dot(q_pe, tl.trans(k_pe))  # [BLOCK_H, BLOCK_N] fp32
            else:
                c, k_pe = c.to(tl.float32), k_pe.to(tl.float32)
                s = tl.dot(q_lat, tl.trans(c), input_precision="ieee") + \
                    tl.dot(q_pe, tl.trans(k_pe), input_precision="ieee")
            s = tl.where(ok[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if HALF:
                acc = acc * alpha[:, None] + tl.dot(p.to(Q.dtype.element_ty), c)
            else:
                acc = acc * alpha[:, None] + tl.dot(p, c, input_precision="ieee")
            m_i = m_new
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        o_ptr = PART + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + r[None, :]
        tl.store(o_ptr, out, mask=h_ok[:, None] & r_ok[None, :])
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(LSE + b * stride_lb + heads * stride_lh + split, lse, mask=h_ok)

    @triton.jit
    def _combine_kernel(PART, stride_ob, stride_oh, stride_os, LSE, stride_lb, stride_lh, OUT, stride_xb, stride_xh,
                        R: tl.constexpr, BLOCK_R: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
        """Program (b, head): the splits' outputs weighted by 2^(lse_s - max lse), normalized."""
        b, h = tl.program_id(0), tl.program_id(1)
        s, r = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_R)
        lse = tl.load(LSE + b * stride_lb + h * stride_lh + s, mask=s < SPLITS, other=float("-inf"))
        top = tl.max(lse, 0)
        w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # 0 for empty splits
        total = tl.sum(w, 0)
        part = tl.load(PART + b * stride_ob + h * stride_oh + s[:, None] * stride_os + r[None, :],
                       mask=(s < SPLITS)[:, None] & (r < R)[None, :], other=0.0)  # [BLOCK_S, BLOCK_R]
        out = tl.sum(part * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
        tl.store(OUT + b * stride_xb + h * stride_xh + r, out.to(OUT.dtype.element_ty), mask=r < R)
