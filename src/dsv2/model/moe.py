"""DeepSeekMoE (MODEL_SPEC section 4): an fp32 softmax router (greedy or group-limited), routed experts stored
stacked, and shared experts fused into one MLP.

Shape legend: T tokens, H hidden, E routed experts, K experts per token, G groups, I expert width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import MLP


@dataclass
class RouterOutput:
    """What training needs from one MoE layer's router (balance losses, load statistics)."""
    scores: torch.Tensor  # [T, E] fp32 softmax affinities s_{i,t}
    topk_idx: torch.Tensor  # [T, K]


class Gate(nn.Module):
    """The router. Its weight stays fp32 whatever dtype the model is cast to: routing is a discrete choice, and
    bf16 logits flip near-ties (the reference computes the gate in fp32 too)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_experts = cfg.num_experts_per_tok, cfg.n_routed_experts
        self.method, self.n_group, self.topk_group = cfg.topk_method, cfg.num_groups, cfg.groups_per_token
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.weight.dtype != torch.float32:
            self.weight.data = self.weight.data.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> weights [T, K] fp32, expert ids [T, K], scores [T, E] fp32."""
        with torch.autocast(x.device.type, enabled=False):
            scores = F.linear(x.float(), self.weight).softmax(dim=-1)  # [T, E]
        choose_from = scores
        if self.method == "group_limited_greedy":
            # device-limited routing: keep the topk_group groups holding the best single expert, zero the rest
            group_best = scores.unflatten(-1, (self.n_group, -1)).amax(dim=-1)  # [T, G]
            keep = group_best.topk(self.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_best, dtype=torch.bool).scatter_(1, keep, True)
            choose_from = scores.masked_fill(~group_mask.repeat_interleave(self.n_experts // self.n_group, -1), 0.0)
        weights, idx = choose_from.topk(self.top_k, dim=-1, sorted=False)  # [T, K]
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)  # no routed_scaling_factor here
        else:
            weights = weights * self.scaling
        return weights, idx, scores


class Experts(nn.Module):
    """E routed experts as stacked weights (gate and up fused: one matmul per expert instead of two)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))  # rows [gate I | up I] per expert
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights/idx [T, K] -> sum_k weights * expert_idx(x)  [T, H]. Tokens are grouped by expert,
        so the Python loop runs over the experts that received tokens, never over tokens."""
        T, K = idx.shape
        flat = idx.flatten()  # [T*K]
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        token = order // K  # which token each sorted slot came from
        xs = x.index_select(0, token)  # [T*K, H], grouped by expert
        ys, start = [], 0
        for e, c in enumerate(counts):
            if c:
                gate, up = F.linear(xs[start:start + c], self.gate_up_proj[e]).chunk(2, dim=-1)
                ys.append(F.linear(F.silu(gate) * up, self.down_proj[e]))
                start += c
        ys = torch.cat(ys).float() * weights.flatten()[order].unsqueeze(-1)  # combine in fp32
        return torch.zeros(T, x.shape[-1], dtype=torch.float32, device=x.device).index_add_(0, token, ys).to(x.dtype)

    def forward_reference(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The slow twin: every expert, every token, masks only. Tests compare forward() against it."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(self.gate_up_proj.shape[0]):
            gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e]).float()  # [T, H]
            w = (weights * (idx == e)).sum(dim=-1, keepdim=True)  # [T, 1], zero where e was not chosen
            out += w * y
        return out.to(x.dtype)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared) if n_shared else None

    def forward(self, x: torch.Tensor, router_out: dict | None = None) -> torch.Tensor:
        """x [..., H]. When `router_out` is a dict, the router's output is stored under this layer's index
        (a dict, not a list, so activation-checkpoint recomputation overwrites instead of appending)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, H]
        weights, idx, scores = self.gate(x)
        y = self.experts(x, weights, idx)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if router_out is not None:
            router_out[self.layer_idx] = RouterOutput(scores, idx)
        return y.view(shape)
