"""Pretraining losses: DeepSeek-V2's three MoE balance losses (paper section 2.2.3, MODEL_SPEC section 5), plus the
expert-load statistics the trainer logs. (The next-token cross-entropy is the model's own: Transformer.forward with
targets, lm_head and the loss fused in kernels/linear_ce.py.)

Each balance loss is computed per sequence (`seq_aux`), averaged over the batch's sequences and summed over the
MoE layers, as the released gate code does for the expert-level loss. Only P (mean affinities) carries gradient;
f counts discrete routing choices.

Shape legend: B sequences, S tokens per sequence, E routed experts, K experts per token, D device groups
(n_group), M groups a token may reach (topk_group).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.moe import RouterOutput


@dataclass(frozen=True)
class BalanceCoefficients:
    expert: float = 0.0  # alpha_1 (V2: 0.003, V2-Lite: 0.001)
    device: float = 0.0  # alpha_2 (V2: 0.05)
    comm: float = 0.0  # alpha_3 (V2: 0.02)

    @property
    def any(self) -> bool:
        return bool(self.expert or self.device or self.comm)


def balance_terms(scores: torch.Tensor, topk_idx: torch.Tensor, n_groups: int,
                  groups_per_token: int) -> dict[str, torch.Tensor]:
    """The three unweighted sums for each sequence -- sum f_i P_i, sum f'_d P'_d, sum f''_d P''_d -> [B] each.
    scores [B, S, E] (softmax affinities), topk_idx [B, S, K]. Each is 1.0 when load and affinities are perfectly
    uniform (the last also needs every token to reach exactly M devices)."""
    B, S, E = scores.shape
    K, D, M = topk_idx.shape[-1], n_groups, groups_per_token
    P = scores.float().mean(dim=1)  # [B, E]   P_i = mean_t s_{i,t}
    with torch.no_grad():
        chosen = torch.zeros(B, E, device=scores.device).scatter_add_(
            1, topk_idx.reshape(B, S * K), torch.ones(B, S * K, device=scores.device))  # [B, E] tokens per expert
        f = chosen * (E / (K * S))  # f_i = N_r / (K_r T) * #{t : t chose i}
        sent = torch.zeros(B, S, D, dtype=torch.bool, device=scores.device).scatter_(
            -1, topk_idx // (E // D), True)  # [B, S, D] token t reaches device d
        f_comm = sent.sum(dim=1).float() * (D / (M * S))  # [B, D]   f''_d
    f_dev = f.view(B, D, E // D).mean(dim=-1)  # [B, D]   f'_d = mean over the device's experts
    P_dev = P.view(B, D, E // D).sum(dim=-1)  # [B, D]   P'_d = P''_d = sum over the device's experts
    return {"expert": (f * P).sum(-1), "device": (f_dev * P_dev).sum(-1), "comm": (f_comm * P_dev).sum(-1)}


def balance_loss(router_out: dict[int, RouterOutput], batch_size: int, n_groups: int, groups_per_token: int,
                 coef: BalanceCoefficients) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha_1 L_ExpBal + alpha_2 L_DevBal + alpha_3 L_CommBal summed over layers (a scalar tensor), and each
    weighted loss as a float for logging."""
    total = torch.zeros((), device=next(iter(router_out.values())).scores.device)
    parts = {"expert": 0.0, "device": 0.0, "comm": 0.0}
    for r in router_out.values():
        E, K = r.scores.shape[-1], r.topk_idx.shape[-1]
        terms = balance_terms(r.scores.view(batch_size, -1, E), r.topk_idx.view(batch_size, -1, K),
                              n_groups, groups_per_token)
        for name, alpha in (("expert", coef.expert), ("device", coef.device), ("comm", coef.comm)):
            if alpha:
                loss = alpha * terms[name].mean()
                total = total + loss
                parts[name] += loss.item()
    return total, parts


class LoadStats:
    """Per-layer expert load accumulated over a logging interval: tokens routed to each expert and assignments
    dropped for capacity."""

    def __init__(self):
        self.counts: dict[int, torch.Tensor] = {}  # layer -> [E] float64
        self.dropped: dict[int, float] = {}
        self.assignments: dict[int, float] = {}

    def add(self, router_out: dict[int, RouterOutput]) -> None:
        for layer, r in router_out.items():
            E = r.scores.shape[-1]
            c = torch.bincount(r.topk_idx.flatten(), minlength=E).double().cpu()
            self.counts[layer] = self.counts.get(layer, torch.zeros(E, dtype=torch.float64)) + c
            self.assignments[layer] = self.assignments.get(layer, 0.0) + r.topk_idx.numel()
            if r.dropped is not None:
                self.dropped[layer] = self.dropped.get(layer, 0.0) + float(r.dropped.sum())

    def merge(self, other: "LoadStats") -> None:
        for layer, c in other.counts.items():
            self.counts[layer] = self.counts.get(layer, torch.zeros_like(c)) + c
            self.assignments[layer] = self.assignments.get(layer, 0.0) + other.assignments[layer]
        for layer, d in other.dropped.items():
            self.dropped[layer] = self.dropped.get(layer, 0.0) + d

    def summary(self) -> dict[str, dict]:
        """layer -> load (per expert, relative to the mean; 1.0 = balanced), max/mean, coefficient of variation,
        dropped fraction."""
        out = {}
        for layer in sorted(self.counts):
            c = self.counts[layer]
            rel = c / c.mean().clamp_min(1e-12)
            out[str(layer)] = {"max_over_mean": round(float(rel.max()), 4), "cv": round(float(rel.std(unbiased=False)), 4),
                               "dropped": round(self.dropped.get(layer, 0.0) / self.assignments[layer], 5),
                               "load": [round(float(v), 3) for v in rel]}
        return out

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "dropped": dict(self.dropped), "assignments": dict(self.assignments)}

    def load_state_dict(self, state: dict) -> None:
        self.counts, self.dropped, self.assignments = dict(state["counts"]), dict(state["dropped"]), dict(state["assignments"])
