"""The DeepSeek-V2 decoder (MODEL_SPEC section 1): embed -> blocks (MLA + dense MLP or MoE) -> norm -> lm_head.

Parameter names are the checkpoint's names (`model.layers.3.self_attn.kv_b_proj.weight`, ...), except the routed
experts, which are stacked per layer (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]);
checkpoint.py maps between the two.

Shape legend: B batch, T tokens, N flat tokens of an engine step, H hidden, V vocab.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..kernels.linear_ce import cross_entropy_of, linear_cross_entropy
from .layers import MLP, RMSNorm
from .mla import MLA, PackedSequences, PagedAttention
from .moe import Experts, Gate, MoE, TokenDropping
from .rope import rope_freqs


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(cfg, layer_idx)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg, layer_idx) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, freqs, attn: PagedAttention | PackedSequences | None = None, router_out: dict | None = None,
                drop: TokenDropping | None = None):
        x = x + self.self_attn(self.input_layernorm(x), freqs, attn)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, router_out, drop) if self.is_moe else self.mlp(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False  # recompute each block in backward (training memory option)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                attn: PagedAttention | PackedSequences | None = None, logits_indices: torch.Tensor | None = None,
                router_out: dict | None = None, drop: TokenDropping | None = None,
                targets: torch.Tensor | None = None, target_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Plain causal forward: input_ids [B, T] -> fp32 logits [B, T, V].
        Packed: input_ids [B, T], attn=PackedSequences(segment_ids [B, T]) -> logits [B, T, V], each packed sequence
        attending only to itself, its positions from 0 (positions [B, T] may be given instead).
        Engine step: input_ids [N], positions [N], attn -> logits [len(logits_indices), V] (rows of the flat batch
        that need a next-token distribution; all rows when logits_indices is None).
        Training: router_out collects each MoE layer's routing; drop switches on token dropping. With targets (the
        next tokens, aligned with the logits: [B, T], or [M] with logits_indices; IGNORE = -100 counts nothing) the
        forward returns the fp32 cross-entropy instead of logits -- the mean over the counted targets, or
        sum_i target_weights_i * CE_i -- with lm_head and the loss fused chunk by chunk (kernels/linear_ce.py: the
        [.., V] logits are never held whole)."""
        if positions is None:
            positions = (attn.positions if isinstance(attn, PackedSequences)
                         else torch.arange(input_ids.shape[-1], device=input_ids.device))
        lengths = None
        if attn is not None and self.config.rope_type == "dynamic":  # NTK base from each token's own sequence
            lengths = attn.token_context_lengths(positions.device)
        freqs = rope_freqs(self.config, positions, lengths)  # [T or N, Dr/2] complex64, shared by every layer
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, freqs, attn, router_out, drop, use_reentrant=False)
            else:
                x = layer(x, freqs, attn, router_out, drop)
        if logits_indices is not None:
            x = x.flatten(0, -2).index_select(0, logits_indices)  # only rows that are sampled or scored
        h = self.model.norm(x)
        if targets is None:
            return self.lm_head(h).float()
        h, targets = h.flatten(0, -2), targets.flatten()
        w = None if target_weights is None else target_weights.flatten()
        if type(self.lm_head) is nn.Linear:
            return linear_cross_entropy(h, self.lm_head.weight, targets, w)
        return cross_entropy_of(self.lm_head(h), targets, w)  # a wrapped head (LoRA, a TP shard) runs its own forward

    @torch.no_grad()
    def init_weights(self, std: float | None = None):
        """N(0, std) for every matrix (MODEL_SPEC section 6: std 0.006), ones for norms, zeros for biases."""
        std = self.config.initializer_range if std is None else std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, Gate):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, Experts):
                nn.init.normal_(m.gate_up_proj, 0.0, std)
                nn.init.normal_(m.down_proj, 0.0, std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                init: bool = True, seed: int | None = None) -> Transformer:
    """Build on the meta device, then allocate once on `device` in `dtype` (the router stays fp32).
    init=False leaves the memory uninitialised, for a checkpoint to fill."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()  # to_empty replaces parameters; re-share the tied matrix
    if init:
        if seed is not None:
            torch.manual_seed(seed)
        model.init_weights()
    return model
