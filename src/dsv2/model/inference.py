"""The inference form of a loaded model, made by module swaps over the unmodified model, as an InferencePlan
(dsv2.capability) says:

    prepare_for_inference(model, plan)   # fused MLA input projection + absorbed weights, then every matrix as the
                                         # plan's weight format: oneDNN-packed, upcast (bf16 kept, fp32 compute),
                                         # int8, or plain

Each swap builds the new module with its own constructor from the old one and drops the old one at once, so memory
peaks near one model plus one layer. The result runs but no longer trains or saves. The router (fp32) and the norms
are never touched.
"""
from __future__ import annotations

import torch
from torch import nn

from ..capability import INT4_AS_INT8, KEEP_PLAIN, InferencePlan
from .layers import MLP
from .mla import MLA
from .moe import Experts
from .packed import PackedExperts, PackedLinear, PackedMLP
from .int4 import Int4Experts, Int4Linear, Int4MLP
from .quant import Int8Experts, Int8Linear, Int8MLP
from .transformer import Transformer
from .upcast import UpcastEmbedding, UpcastExperts, UpcastLinear, UpcastMLP, Workspace



def fused_attention(mla: MLA, dtype: torch.dtype) -> MLA:
    """The inference layout of one MLA (MLA(fused_input=True)): [q_proj or q_a_proj | kv_a_proj_with_mqa] as one
    nn.Linear, and W_UK / W_UV^T as contiguous buffers in `dtype`; every other submodule is the old one's."""
    with torch.device("meta"):
        new = MLA(mla.config, mla.layer_idx, fused_input=True)
    first = mla.q_proj if mla.q_lora_rank is None else mla.q_a_proj
    second = mla.kv_a_proj_with_mqa
    bias = first.bias is not None or second.bias is not None  # q_proj never has one; kv_a may (attention_bias)
    with torch.device(first.weight.device):
        fused = nn.Linear(first.in_features, first.out_features + second.out_features, bias=bias,
                          dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([first.weight, second.weight]))
        if bias:
            fused.bias.copy_(torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                                        for m in (first, second)]))
    fused.requires_grad_(False)
    new.input_proj = fused
    w_uk, w_uv_t = mla.absorbed_weights()
    new.w_uk, new.w_uv_t = w_uk.to(dtype).contiguous(), w_uv_t.to(dtype).contiguous()
    for name in ("q_a_layernorm", "q_b_proj", "kv_a_layernorm", "kv_b_proj", "o_proj"):
        if hasattr(mla, name):
            setattr(new, name, getattr(mla, name))
    return new


def prepare_attention(model: nn.Module, dtype: torch.dtype) -> None:
    """Every MLA in `model` (wherever it sits: a block, a parallel wrapper) replaced by its fused inference layout
    (absorbed weights in `dtype`)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MLA) and not child.fused_input:
                setattr(parent, name, fused_attention(child, dtype))


def swap_matrices(module: nn.Module, mlp, linear, experts) -> None:
    """Replace, recursively, every MLP, nn.Linear and Experts child by mlp(child), linear(child, name) or
    experts(child); a factory that returns None keeps the child. Each plain child is dropped as soon as it is
    replaced, so memory peaks near one model plus one layer."""
    for name, child in list(module.named_children()):
        new = None
        if isinstance(child, MLP):
            new = mlp(child)
        elif isinstance(child, nn.Linear):
            new = linear(child, name)
        elif isinstance(child, Experts):
            new = experts(child)
        if new is not None:
            setattr(module, name, new)
        elif not isinstance(child, nn.Linear):
            swap_matrices(child, mlp, linear, experts)
        del child  # drop this frame's reference too, so the plain weights go now


def prepare_for_inference(model: Transformer, plan: InferencePlan) -> Transformer:
    """`model` (loaded in plan.weight_dtype) in the plan's inference form, in place; returns it."""
    prepare_part(model, plan, Workspace())
    model.requires_grad_(False)
    return prepare_embedding(model, plan).eval()


def prepare_part(module: nn.Module, plan: InferencePlan, workspace: Workspace) -> nn.Module:
    """One part of a model (a decoder block, a holder of lm_head, or the whole model) in the plan's inference form,
    in place: its MLAs fused, its matrices swapped for the plan's weight format. A streaming loader calls this on
    each part as soon as it is read, so only one part is ever held in the stored dtype."""
    compute, rows, ws = plan.compute_dtype, plan.gemv_rows, workspace
    prepare_attention(module, compute)
    upcast = compute != plan.weight_dtype  # weights stored narrower than the compute dtype
    kr = plan.upcast_kernel_rows
    keep = (lambda m: UpcastLinear(m, rows, ws, kr)) if upcast else (lambda m: None)
    if plan.weights == "packed":
        # routed experts stay stacked where the CPU expert kernel runs them (faster than oneDNN's per-expert calls)
        swap_matrices(module, PackedMLP, lambda m, name: keep(m) if name in KEEP_PLAIN else PackedLinear(m),
                      (lambda e: None) if plan.cpu_experts_kernel else PackedExperts)
    elif plan.weights == "int8":
        k = plan.int8_kernel
        swap_matrices(module, lambda m: Int8MLP(m, k),
                      lambda m, name: keep(m) if name in KEEP_PLAIN else Int8Linear(m, k), lambda e: Int8Experts(e, k))
    elif plan.weights == "int4":
        k = dict(group_size=plan.group_size, kernel=plan.int4_kernel, kernel_rows=plan.gemv_rows, target=plan.device)
        k8 = plan.int8_kernel

        def linear(m: nn.Linear, name: str) -> nn.Module | None:
            if name in KEEP_PLAIN:
                return keep(m)
            return Int8Linear(m, k8) if name in INT4_AS_INT8 else Int4Linear.from_linear(m, **k)
        swap_matrices(module, lambda m: Int4MLP.from_mlp(m, **k), linear, lambda e: Int4Experts.from_experts(e, **k))
    elif upcast:
        swap_matrices(module, lambda m: UpcastMLP(m, rows, ws, kr), lambda m, name: UpcastLinear(m, rows, ws, kr),
                      lambda e: UpcastExperts(e, rows, ws, kr))
    module.requires_grad_(False)
    return module


def prepare_embedding(model: Transformer, plan: InferencePlan) -> Transformer:
    """The token embedding handing on activations in the compute dtype (when weights are stored narrower)."""
    if plan.compute_dtype != plan.weight_dtype:
        model.model.embed_tokens = UpcastEmbedding(model.model.embed_tokens, plan.compute_dtype)
    return model


def quantize_int8(model: Transformer, kernel: bool = True) -> Transformer:
    """Weight-only int8 in the model's own dtype (see model/quant.py), in place; returns the model."""
    dtype = model.model.embed_tokens.weight.dtype
    plan = InferencePlan(device=str(model.model.embed_tokens.weight.device), weight_dtype=dtype, compute_dtype=dtype,
                         cache_dtype=dtype, weights="int8", quantization="int8", int8_kernel=kernel)
    return prepare_for_inference(model, plan)
