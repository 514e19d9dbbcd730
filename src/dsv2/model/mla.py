"""Multi-head Latent Attention (MODEL_SPEC section 2), in its two forms:

- decompressed: kv_b_proj expands the latent into per-head keys and values, then SDPA. Used for training, the
  plain forward and prefill chunks.
- absorbed: W_UK is folded into the query and W_UV applied after attention, so decode reads only the cached
  576-wide latent [c_kv | k_pe] -- multi-query attention with one key head. Used for decode over the paged cache.

The paged cache holds each latent as it is (bf16 or fp32) or in DeepSeek's FP8 layout (Fp8Latent): written
quantized, read back dequantized once per layer and step, before any head touches it.

Shape legend: B batch, T tokens of a sequence, N flat tokens of an engine step, L context length,
n heads, Dn qk_nope_head_dim, Dr qk_rope_head_dim, Dq = Dn + Dr, Dv v_head_dim, R kv_lora_rank,
G fp8 scale groups of R, W bytes of one fp8 latent.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kernels import mla_decode, paged_slots, triton_unavailable_reason
from ..kernels.cpu_mla import latent_attention_sdpa
from .layers import RMSNorm
from .rope import apply_rope


E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
FP8_GROUP = 128  # DeepSeek's: one scale per 128 latent values


@dataclass(frozen=True)
class Fp8Latent:
    """One cached latent in DeepSeek's FP8 layout (as FlashMLA stores it), W bytes per token and layer:

        [ R float8_e4m3fn codes of c_kv | G fp32 scales | Dr bf16 values of k_pe ]    V2: 512 + 16 + 128 = 656 B

    c_kv is cut into G groups; a group x is stored as x / s with s = amax|x| / 448, so its largest value lands on
    e4m3's largest and every value keeps 3 mantissa bits (error <= 1/16 of the value, or 2^-10 s for the tiniest).
    k_pe stays bf16: it carries the position, and rope's rotation spreads it over a wide range. Groups are 128
    values when R is a multiple of 128 (every published model), else the largest divisor of R up to 128 (R itself,
    one group, when R <= 128: the tiny test models). The scales start 4-byte aligned and W is a multiple of 4, so
    every part is a plain dtype view of a uint8 row."""
    rank: int  # R
    rope: int  # Dr

    @classmethod
    def for_config(cls, cfg: ModelConfig) -> Fp8Latent:
        return cls(cfg.kv_lora_rank, cfg.qk_rope_head_dim)

    @property
    def group_size(self) -> int:
        return max(g for g in range(1, min(FP8_GROUP, self.rank) + 1) if self.rank % g == 0)

    @property
    def num_groups(self) -> int:
        return self.rank // self.group_size

    @property
    def _scales_at(self) -> int:
        return -(-self.rank // 4) * 4

    @property
    def _rope_at(self) -> int:
        return self._scales_at + 4 * self.num_groups

    @property
    def bytes(self) -> int:
        return -(-(self._rope_at + 2 * self.rope) // 4) * 4

    def parts(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 rows [..., W] -> views [..., R] e4m3 codes, [..., G] fp32 scales, [..., Dr] bf16 k_pe."""
        s, p = self._scales_at, self._rope_at
        return (raw[..., :self.rank].view(torch.float8_e4m3fn), raw[..., s:p].view(torch.float32),
                raw[..., p:p + 2 * self.rope].view(torch.bfloat16))

    def quantize(self, latent: torch.Tensor) -> torch.Tensor:
        """[N, R + Dr] -> [N, W] uint8."""
        c_kv = latent[:, :self.rank].float().unflatten(-1, (self.num_groups, -1))  # [N, G, R/G]
        scale = c_kv.abs().amax(-1, keepdim=True).clamp(min=1e-30) / E4M3_MAX  # [N, G, 1]; an all-zero group -> 0
        raw = torch.zeros(latent.shape[0], self.bytes, dtype=torch.uint8, device=latent.device)
        codes, scales, pe = self.parts(raw)
        codes.copy_((c_kv / scale).clamp(-E4M3_MAX, E4M3_MAX).flatten(1))  # rounds to nearest
        scales.copy_(scale.flatten(1))
        pe.copy_(latent[:, self.rank:])
        return raw

    def dequantize(self, raw: torch.Tensor) -> torch.Tensor:
        """[..., W] uint8 -> [..., R + Dr] fp32."""
        codes, scales, pe = self.parts(raw)
        G = self.num_groups
        if torch.compiler.is_compiling():  # the same product, without out= (which compiled code cannot take)
            c_kv = e4m3_as_fp16(codes).float().unflatten(-1, (G, -1)) * (scales * 256.0).unsqueeze(-1)
            return torch.cat([c_kv.flatten(-2), pe.float()], dim=-1)
        out = torch.empty(*raw.shape[:-1], self.rank + self.rope, device=raw.device)
        torch.mul(e4m3_as_fp16(codes).float().unflatten(-1, (G, -1)), (scales * 256.0).unsqueeze(-1),
                  out=out[..., :self.rank].unflatten(-1, (G, -1)))  # [..., G, R/G]
        out[..., self.rank:] = pe
        return out


def e4m3_as_fp16(codes: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes -> fp16 numbers 2^-8 times theirs, exactly (except the NaN codes, which quantize never
    writes). An e4m3 code's sign | exponent | mantissa bits moved into an fp16's sign | low exponent | high
    mantissa bits make the same number times 2^-8 (subnormals too: both formats scale alike), and fp16 -> fp32 is
    a vector instruction where torch's float8 -> fp32 is a scalar loop on CPU, ~5x slower. The slow twin is
    codes.float() (tests/test_fp8_cache.py)."""
    h = codes.view(torch.int8).to(torch.int16)  # sign-extended: bits 8..15 copy the sign
    h.bitwise_left_shift_(7).bitwise_and_(~0x4000)  # sign at bit 15, exponent | mantissa at bits 7..13
    return h.view(torch.float16)


@dataclass
class DecodeGroup:
    """Decode sequences whose contexts are padded to one length Lb, attended with one batched matmul.
    Padding to a few bucket lengths (instead of each exact length) also keeps oneDNN from compiling a new bf16
    kernel for every context length, which costs ~1 ms a call on CPU."""
    rows: torch.Tensor  # [G] which decode sequences (0 .. num_decode-1)
    slots: torch.Tensor  # [G * Lb] cache slots, padded with a valid slot
    pad: torch.Tensor  # [G, Lb] bool, True past each sequence's context
    length: int  # Lb


@dataclass
class PagedAttention:
    """One engine step's attention metadata, built by the engine's runner and shared by every layer.

    The step's tokens are flat [N]; sequences are listed decode-first. Sequence s owns the flat tokens
    query_ranges[s] = (start, end) and its whole context (cached prefix + this step's tokens) lives in the cache
    slots seq_slots[s] [L_s] (slot = block * block_size + offset). The first num_decode sequences have exactly
    one token each and attend in the absorbed form, batched by decode_groups; the others are prefill chunks
    (decompressed form).
    """
    kv_caches: list[torch.Tensor]  # per layer [num_blocks, block_size, R + Dr], or [.., W] uint8 with fp8
    slot_mapping: torch.Tensor  # [N] where each new token's latent is written
    seq_slots: list[torch.Tensor]  # per sequence [L_s]
    query_ranges: list[tuple[int, int]]
    num_decode: int
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    fp8: Fp8Latent | None = None  # the caches hold latents in this FP8 layout; None: as they are
    # The decode sequences' contexts as tensors (the runner sets them on CUDA, instead of decode_groups): no host
    # values, so a CUDA graph can hold the step; attended by the Triton kernel, or a static-shape gather without it
    block_tables: torch.Tensor | None = None  # [num_decode, W] int32 blocks of each context
    context_lens: torch.Tensor | None = None  # [num_decode] int32

    def token_context_lengths(self, device=None) -> torch.Tensor:
        """[N]: the context length of the sequence each flat token belongs to (cached prefix + this step)."""
        lengths = torch.tensor([len(s) for s in self.seq_slots])
        counts = torch.tensor([b - a for a, b in self.query_ranges])
        return lengths.repeat_interleave(counts).to(device)


@dataclass
class PackedSequences:
    """Several sequences packed into each row of a plain forward (SFT packing), passed as the forward's `attn`.
    segment_ids [B, T] numbers the sequences along each row (a new id starts a new sequence; padding is a sequence
    of its own). A token attends only to earlier tokens of its own sequence and positions restart at 0 with each, so
    every packed sequence gets the logits it gets run alone."""
    segment_ids: torch.Tensor  # [B, T]

    @functools.cached_property
    def _index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's segment as 0, 1, .. along its row, and the position where that segment starts; [B, T] each."""
        seg = self.segment_ids
        t = torch.arange(seg.shape[-1], device=seg.device).expand_as(seg)
        new = torch.ones_like(seg, dtype=torch.bool)
        new[:, 1:] = seg[:, 1:] != seg[:, :-1]
        start = torch.where(new, t, torch.zeros_like(t)).cummax(dim=-1).values
        return new.cumsum(-1) - 1, start

    @functools.cached_property
    def positions(self) -> torch.Tensor:
        """[B, T]: each token's position in its own sequence."""
        _, start = self._index
        return torch.arange(start.shape[-1], device=start.device) - start

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """[B, 1, T, T] bool, True where query t may attend key s: same sequence and s <= t (block-diagonal causal)."""
        seg, T = self.segment_ids, self.segment_ids.shape[-1]
        causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
        return ((seg.unsqueeze(-1) == seg.unsqueeze(-2)) & causal).unsqueeze(1)

    def token_context_lengths(self, device=None) -> torch.Tensor:
        """[B, T]: the length of each token's sequence (dynamic NTK rope sees each sequence's own length)."""
        index, _ = self._index
        counts = torch.zeros_like(index).scatter_add_(1, index, torch.ones_like(index))
        return counts.gather(1, index).to(device)


class MLA(nn.Module):
    """fused_input=True builds the inference layout (see model/inference.py): one `input_proj` holding
    [q_proj or q_a_proj | kv_a_proj_with_mqa] (one matmul instead of two), and W_UK / W_UV^T as contiguous buffers
    for absorbed decode. The default is the checkpoint's layout, which training and loading use."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, fused_input: bool = False):
        super().__init__()
        self.config, self.layer_idx = cfg, layer_idx
        n = cfg.num_attention_heads  # the forward reads the head count off the weights' shapes, so a
        # tensor-parallel shard holding n / w heads (dsv2/parallel) runs this same code
        self.nope, self.rope, self.v_dim, self.rank = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        self.softmax_scale = cfg.softmax_scale  # d_q^-0.5 * mscale^2, never latent_dim^-0.5
        H, Dq, bias = cfg.hidden_size, cfg.qk_head_dim, cfg.attention_bias
        q_out = n * Dq if cfg.q_lora_rank is None else cfg.q_lora_rank
        latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.fused_input = fused_input
        if fused_input:
            self.input_proj = nn.Linear(H, q_out + latent, bias=bias)
            self.register_buffer("w_uk", torch.empty(n, cfg.qk_nope_head_dim, cfg.kv_lora_rank))  # [n, Dn, R]
            self.register_buffer("w_uv_t", torch.empty(n, cfg.kv_lora_rank, cfg.v_head_dim))  # [n, R, Dv]
        elif cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(H, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, q_out, bias=bias)
        if cfg.q_lora_rank is not None:
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, n * Dq, bias=False)
        if not fused_input:
            self.kv_a_proj_with_mqa = nn.Linear(H, latent, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, n * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(n * cfg.v_head_dim, H, bias=bias)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor,
                attn: PagedAttention | PackedSequences | None = None) -> torch.Tensor:
        """x [B, T, H] (plain causal forward; with PackedSequences, causal within each packed sequence) or [N, H]
        with PagedAttention (engine step); freqs [T or B x T, Dr/2] or [N, Dr/2]."""
        if self.fused_input:  # [q | c_kv, k_pe]: the latent part is the last R + Dr columns
            qkv = self.input_proj(x)
            q, ckv = qkv[..., :-(self.rank + self.rope)], qkv[..., -(self.rank + self.rope):]
        else:
            q = self.q_proj(x) if self.q_lora_rank is None else self.q_a_proj(x)
            ckv = self.kv_a_proj_with_mqa(x)
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.unflatten(-1, (-1, self.nope + self.rope))  # [..., n, Dq]
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        c_kv, k_pe = ckv.split([self.rank, self.rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [..., R]: the latent that is cached
        q_pe = apply_rope(q_pe, freqs.unsqueeze(-2))  # k_pe: ONE rope key shared by all heads
        k_pe = apply_rope(k_pe, freqs)  # [..., Dr]
        if attn is None:
            out = self.attend_decompressed(q_nope, q_pe, c_kv, k_pe)  # [B, T, n, Dv]
        elif isinstance(attn, PackedSequences):
            out = self.attend_decompressed(q_nope, q_pe, c_kv, k_pe, mask=attn.mask)  # [B, T, n, Dv]
        else:
            out = self._attend_paged(q_nope, q_pe, c_kv, k_pe, attn)  # [N, n, Dv]
        return self.o_proj(out.flatten(-2))

    # ---- the two forms --------------------------------------------------------------------------------------
    def attend_decompressed(self, q_nope, q_pe, c_kv, k_pe, q_offset: int = 0,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
        """Queries [B, T, n, *] against latents [B, L, *] (L >= T); query t sits at position q_offset + t.
        mask [B, 1, T, L] bool (True: attend) replaces the causal mask (packed sequences)."""
        T, L = q_nope.shape[-3], c_kv.shape[-2]
        kv = self.kv_b_proj(c_kv).unflatten(-1, (-1, self.nope + self.v_dim))  # [B, L, n, Dn + Dv]
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(-3, -2)  # [B, n, T, Dq]
        k = torch.cat([k_nope, k_pe.unsqueeze(-2).expand(*k_nope.shape[:-1], self.rope)], dim=-1).transpose(-3, -2)
        Dq = q.shape[-1]
        if self.v_dim < Dq:  # SDPA's fused (flash) kernels want one head dim for q, k and v; with Dv < Dq it falls
            v = F.pad(v, (0, Dq - self.v_dim))  # back to the math path, 3-5x slower on CPU: pad v with zeros
        v = v.transpose(-3, -2)  # [B, n, L, max(Dv, Dq)]
        if mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        elif q_offset == 0 and T == L:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:  # a chunk after a cached prefix: query t sees keys 0 .. q_offset + t
            mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(diagonal=q_offset)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        return out[..., :self.v_dim].transpose(-3, -2)  # [B, T, n, Dv]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [n, Dn, R] and W_UV^T [n, R, Dv], the per-head slices of kv_b_proj (contiguous buffers in the
        inference layout, see model/inference.py)."""
        if self.fused_input:
            return self.w_uk, self.w_uv_t
        w = self.kv_b_proj.weight.unflatten(0, (-1, self.nope + self.v_dim))  # [n, Dn + Dv, R]
        return w[:, :self.nope], w[:, self.nope:].transpose(1, 2)

    def absorb_query(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """[D, n, Dn], [D, n, Dr] -> the 576-wide latent-space query [D, n, R + Dr] (q_lat = W_UK^T q_nope)."""
        w_uk, _ = self.absorbed_weights()
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [n, D, Dn] @ [n, Dn, R] -> [D, n, R]
        return torch.cat([q_lat, q_pe], dim=-1)

    def absorbed_output(self, o_lat: torch.Tensor) -> torch.Tensor:
        """Latent attention output [D, n, R] -> per-head values [D, n, Dv] (o = W_UV o_lat)."""
        _, w_uv_t = self.absorbed_weights()
        return torch.bmm(o_lat.transpose(0, 1), w_uv_t).transpose(0, 1)  # [n, D, R] @ [n, R, Dv]

    def attend_latent(self, q_abs: torch.Tensor, latent: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """Single-position queries [..., n, R + Dr] against their contexts' latents [..., L, R + Dr] -> [..., n, R]
        in q_abs's dtype. pad [..., L] marks context positions to ignore. On the CPU through SDPA's fused kernel
        (kernels/cpu_mla.py), elsewhere -- and as its slow twin -- in plain fp32 operations (latent_attention)."""
        if q_abs.device.type == "cpu":
            return latent_attention_sdpa(q_abs, latent, pad, self.rank, self.softmax_scale)
        return latent_attention(q_abs, latent, pad, self.rank, self.softmax_scale)

    # ---- engine step over the paged latent cache ---------------------------------------------------------
    def _attend_paged(self, q_nope, q_pe, c_kv, k_pe, attn: PagedAttention) -> torch.Tensor:
        cache, fp8 = attn.kv_caches[self.layer_idx], attn.fp8
        flat = cache.view(-1, cache.shape[-1])  # [num_blocks * block_size, R + Dr] (or W bytes)
        latent_new = torch.cat([c_kv, k_pe], dim=-1)  # [N, R + Dr]
        flat.index_copy_(0, attn.slot_mapping, fp8.quantize(latent_new) if fp8 else latent_new.to(flat.dtype))

        def gather(slots):  # [L] -> [L, R + Dr]: one dequantize of the whole gathered context, shared by all heads
            rows = flat.index_select(0, slots)
            return fp8.dequantize(rows) if fp8 else rows
        out = q_nope.new_empty(*q_nope.shape[:-1], self.v_dim)  # [N, n, Dv]

        D = attn.num_decode
        if D:
            q_abs = self.absorb_query(q_nope[:D], q_pe[:D])  # [D, n, R + Dr]
            if attn.block_tables is not None:
                o_lat = self._attend_tables(q_abs, cache, gather, attn)
            elif len(attn.decode_groups) == 1:  # the common case: no gather/scatter of rows
                g = attn.decode_groups[0]
                ctx = gather(g.slots).view(D, g.length, -1)  # [D, Lb, R + Dr]
                o_lat = self.attend_latent(q_abs, ctx, g.pad)
            else:
                o_lat = q_abs.new_empty(D, q_abs.shape[1], self.rank)
                for g in attn.decode_groups:
                    ctx = gather(g.slots).view(-1, g.length, self.rank + self.rope)  # [G, Lb, R + Dr]
                    o_lat[g.rows] = self.attend_latent(q_abs[g.rows], ctx, g.pad)
            if D == len(attn.slot_mapping):
                return self.absorbed_output(o_lat)  # a decode-only step
            out[:D] = self.absorbed_output(o_lat)

        for s in range(D, len(attn.query_ranges)):
            a, b = attn.query_ranges[s]
            slots = attn.seq_slots[s]
            L = slots.numel()
            if L == b - a:  # no cached prefix: this chunk's own latents are the whole context
                ctx_c, ctx_pe = c_kv[a:b], k_pe[a:b]
            else:
                ctx_c, ctx_pe = gather(slots).split([self.rank, self.rope], dim=-1)
                ctx_c, ctx_pe = ctx_c.to(c_kv.dtype), ctx_pe.to(k_pe.dtype)
            out[a:b] = self.attend_decompressed(q_nope[None, a:b], q_pe[None, a:b], ctx_c[None], ctx_pe[None],
                                                q_offset=L - (b - a))[0]
        return out

    def _attend_tables(self, q_abs, cache, gather, attn: PagedAttention) -> torch.Tensor:
        """Decode over block tables: the Triton kernel reads each context once (dsv2/kernels/triton_mla.py); its
        twin, and the path without Triton, gathers every slot a table row can name and masks (static shapes) -- on
        the CPU as one opaque operator (kernels/cpu_mla.py), which compiled decode cannot take apart."""
        if triton_unavailable_reason(q_abs.device) is None:
            return mla_decode(q_abs, cache, attn.block_tables, attn.context_lens, self.rank, self.softmax_scale,
                              attn.fp8)
        if q_abs.device.type == "cpu" and attn.fp8 is None:
            return torch.ops.dsv2.paged_latent_attention(q_abs, cache, attn.block_tables, attn.context_lens,
                                                         self.rank, self.softmax_scale)
        slots, pad = paged_slots(attn.block_tables, attn.context_lens, cache.shape[1])
        return self.attend_latent(q_abs, gather(slots).view(*pad.shape, -1), pad)  # [D, n, R]


def latent_attention(q_abs: torch.Tensor, latent: torch.Tensor, pad: torch.Tensor | None, rank: int,
                     scale: float) -> torch.Tensor:
    """Absorbed attention written out: queries [..., n, R + Dr], latents [..., L, R + Dr], pad [..., L] (True:
    ignore) -> o_lat [..., n, R] in q_abs's dtype. The value of a position is the first R columns of its key.

    Scores, softmax and the weighted sum run in fp32 whatever the cache dtype: rounding 576-wide dot products to
    bf16 before the softmax costs ~3 significant bits per score, which prefill's SDPA (fp32 scores) never loses, so
    decode and prefill would disagree more and more with context length."""
    latent = latent.float()  # one conversion pass over the gathered context; both products read it
    # latent @ q^T keeps the big operand in its stored layout (q_abs @ latent^T makes a copy of the latent)
    scores = (latent @ q_abs.float().transpose(-1, -2)).transpose(-1, -2).mul_(scale)  # [..., n, L]
    if pad is not None:
        scores.masked_fill_(pad.unsqueeze(-2), float("-inf"))
    p = scores.softmax(dim=-1)
    return (p @ latent)[..., :rank].to(q_abs.dtype)  # slicing after, not before, avoids copying the latent
