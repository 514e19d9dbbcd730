"""DeepSeekMoE (MODEL_SPEC section 4): an fp32 softmax router (greedy or group-limited), routed experts stored
stacked, and shared experts fused into one MLP.

Shape legend: T tokens, H hidden, E routed experts, K experts per token, G groups, I expert width,
B sequences (T = B * S tokens, flattened row-major), D capacity units ("devices": the G groups, or the E experts
when there is one group).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kernels import cpu_moe, grouped_experts
from .layers import MLP


@dataclass
class RouterOutput:
    """What training needs from one MoE layer's router (balance losses, load statistics)."""
    scores: torch.Tensor  # [T, E] fp32 softmax affinities s_{i,t}
    topk_idx: torch.Tensor  # [T, K]
    dropped: torch.Tensor | None = None  # [T, K] bool: assignments dropped for capacity (training only)
    traffic: "Traffic | None" = None  # expert parallel: what the dispatch moved (parallel/expert_parallel.py)


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
        # model.to(bf16) must not round the router: a cast is undone from the untouched fp32 data (moved to the new
        # device, if the same call moved it), so the weight comes out bit for bit what it was
        fp32 = self.weight.data
        super()._apply(fn, recurse)
        if self.weight.dtype != torch.float32:
            self.weight.data = fp32.to(self.weight.device)
        return self

    def forward(self, x: torch.Tensor, replay: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> weights [T, K] fp32, expert ids [T, K], scores [T, E] fp32.
        replay [T, K]: take these expert ids instead of choosing (routing replay, see RoutingReplay); their weights
        are still the current scores at them, so the router keeps its gradient."""
        with torch.autocast(x.device.type, enabled=False):
            scores = F.linear(x.float(), self.weight).softmax(dim=-1)  # [T, E]
        if replay is not None:
            if replay.shape != (x.shape[0], self.top_k):
                raise ValueError(f"routing replay holds {tuple(replay.shape)} expert ids for {x.shape[0]} tokens "
                                 f"x top-{self.top_k}: it was recorded on another batch")
            return self._weights(scores.gather(1, replay)), replay, scores
        choose_from = scores
        if self.method == "group_limited_greedy":
            # device-limited routing: keep the topk_group groups holding the best single expert, zero the rest
            group_best = scores.unflatten(-1, (self.n_group, -1)).amax(dim=-1)  # [T, G]
            keep = group_best.topk(self.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_best, dtype=torch.bool).scatter_(1, keep, True)
            choose_from = scores.masked_fill(~group_mask.repeat_interleave(self.n_experts // self.n_group, -1), 0.0)
        weights, idx = choose_from.topk(self.top_k, dim=-1, sorted=False)  # [T, K]
        return self._weights(weights), idx, scores

    def _weights(self, chosen: torch.Tensor) -> torch.Tensor:
        """The chosen experts' scores [T, K] -> their combination weights."""
        if self.top_k > 1 and self.norm_topk_prob:
            return chosen / (chosen.sum(dim=-1, keepdim=True) + 1e-20)  # no routed_scaling_factor here
        return chosen * self.scaling


# Trainable experts on the CPU pad each expert's rows to a multiple of this with zero rows. oneDNN JIT-compiles a bf16
# matmul for every new shape, and the experts' row counts change every step (six shapes an expert: gate_up, down and
# their two gradients each), more shapes than its primitive cache of 1,024 holds, so the JIT never stops; padded,
# a few dozen shapes recur. Zero rows give zero outputs and add exact zeros to the weight gradients. train-small,
# bf16 autocast: 1.14 -> 1.01 s a step (median of 20, interleaved), fp32 (no JIT) unchanged.
ROW_MULTIPLE = 16


class ExpertGroup(nn.Module):
    """E routed experts run grouped by expert: the Python loop runs over the experts that received tokens, never
    over tokens. Subclasses hold the weights (stacked, prepacked, int8, ...) and say how one expert computes."""

    def __init__(self, n_experts: int):
        super().__init__()
        self.n_experts = n_experts

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU MLP on its tokens x [c, H]."""
        raise NotImplementedError

    def run_experts(self, parts: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Every expert on its tokens, parts[e] [c_e, H] -> the outputs of the experts with c_e > 0, in order."""
        return [self.expert(e, x) for e, x in enumerate(parts) if x.shape[0]]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H], weights/idx [T, K] -> sum_k weights * expert_idx(x)  [T, H]. keep [T, K] bool (training-time
        token dropping) skips the False assignments entirely: their compute is what dropping saves."""
        T, K = idx.shape
        if T == 1 and keep is None:  # one token (single-sequence decode): nothing to group or scatter
            y = torch.zeros(1, x.shape[-1], dtype=torch.float32, device=x.device)
            for e, w in zip(idx[0].tolist(), weights[0].tolist()):
                y.add_(self.expert(e, x), alpha=w)  # accumulate in fp32, as the grouped path combines
            return y.to(x.dtype)
        flat = idx.flatten()  # [T*K]
        if keep is None:
            order = flat.argsort(stable=True)
            counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        else:
            kept = keep.flatten().nonzero().squeeze(-1)  # surviving slots of the [T*K] assignments
            if not kept.numel():
                return torch.zeros_like(x)
            order = kept[flat[kept].argsort(stable=True)]
            counts = torch.bincount(flat[kept], minlength=self.n_experts).tolist()
        token = order // K  # which token each sorted slot came from
        # trainable weights, also under no_grad (so that forward stays bit for bit training's)
        rows = ROW_MULTIPLE if x.device.type == "cpu" and any(p.requires_grad for p in self.parameters()) else 1
        if rows > 1:  # each expert's rows padded with zero rows to a multiple of ROW_MULTIPLE
            padded = [-(-c // rows) * rows for c in counts]
            before = [0, *itertools.accumulate(p - c for p, c in zip(padded[:-1], counts[:-1]))]  # padding rows
            shift = torch.tensor(before, device=x.device).repeat_interleave(torch.tensor(counts, device=x.device))
            dest = torch.arange(token.numel(), device=x.device) + shift  # each sorted slot's row, padded layout
            src = torch.full((sum(padded),), T, dtype=token.dtype, device=x.device).index_put_((dest,), token)
            xs = torch.cat([x, x.new_zeros(1, x.shape[-1])]).index_select(0, src)  # row T: the zero row
            ys = torch.cat(self.run_experts(xs.split(padded))).index_select(0, dest)
        else:
            xs = x.index_select(0, token)  # [T*K, H], grouped by expert
            # split, not sliced per expert: a slice's backward zero-fills a whole [T*K, H] gradient for each expert,
            # split's backward is one concatenation
            ys = torch.cat(self.run_experts(xs.split(counts)))
        ys = ys.float() * weights.flatten()[order].unsqueeze(-1)
        return torch.zeros(T, x.shape[-1], dtype=torch.float32, device=x.device).index_add_(0, token, ys).to(x.dtype)


class Experts(ExpertGroup):
    """The trainable form: stacked weights, gate and up fused (one matmul per expert instead of two)."""

    def __init__(self, cfg: ModelConfig, n_experts: int | None = None):
        """n_experts: how many of the config's experts this module holds (an expert-parallel shard; default all)."""
        super().__init__(n_experts or cfg.n_routed_experts)
        E, H, I = self.n_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))  # rows [gate I | up I] per expert
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_up_proj[e], self.down_proj[e])

    def run_experts(self, parts: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        # the stacks unbound once: indexing gate_up_proj[e] per expert would make backward zero-fill a whole
        # [E, 2I, H] gradient for every expert and add them up; unbind's backward stacks the E gradients once
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        return [swiglu(x, gate_up[e], down[e]) for e, x in enumerate(parts) if x.shape[0]]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        if x.is_cuda and keep is None and not torch.is_grad_enabled():  # inference on CUDA: one grouped GEMM per
            return grouped_experts(x, self.gate_up_proj, self.down_proj, weights, idx)  # projection, no host sync
        if keep is None and cpu_moe.takes(x, self.gate_up_proj, cpu_moe.EXPERT_ROWS):  # CPU inference, up to ~1k
            return cpu_moe.stacked_experts(x, self.gate_up_proj, self.down_proj, weights, idx)  # tokens: one C++ call
        return super().forward(x, weights, idx, keep)

    def forward_reference(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The slow twin: every expert, every token, masks only. Tests compare forward() against it."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(self.n_experts):
            gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e]).float()  # [T, H]
            w = (weights * (idx == e)).sum(dim=-1, keepdim=True)  # [T, 1], zero where e was not chosen
            out += w * y
        return out.to(x.dtype)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert: x [c, H], gate_up [2I, H] (rows [gate | up]), down [H, I] -> [c, H]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


class RoutingReplay(dict):
    """A `router_out` dict (layer -> RouterOutput, filled by the forward as usual) that also makes every MoE layer
    take recorded expert choices instead of choosing: recorded[layer] = topk_idx [T, K] of an earlier forward over
    the same batch. GRPO (train/grpo.py) records them in the old policy's forward and replays them in each update,
    so a policy that moves between updates still runs the experts its samples were scored with; the combination
    weights come from the current router (Gate.forward), so it is still trained."""

    def __init__(self, recorded: dict[int, torch.Tensor]):
        super().__init__()
        self.recorded = recorded

    @classmethod
    def of(cls, router_out: dict) -> "RoutingReplay":
        """Replay what a forward wrote into `router_out`."""
        return cls({layer: r.topk_idx for layer, r in router_out.items()})


@dataclass
class TokenDropping:
    """Device-level token dropping for one training batch (paper section 2.2.4), passed down by the trainer.
    Never used in eval mode, so inference is untouched."""
    capacity_factor: float  # each unit processes at most ceil(factor * T*K / D) assignments (1.0 = the average)
    no_drop: torch.Tensor | None = None  # [B] bool: sequences whose assignments are never dropped


def within_capacity(unit: torch.Tensor, priority: torch.Tensor, n_units: int, capacity_factor: float) -> torch.Tensor:
    """Which of n assignments survive when each of the n_units units takes at most ceil(capacity_factor * n /
    n_units) of them, best priority first (ties keep their order; priority above 1.0 -- the exempt sequences'
    2.0 -- is never dropped). unit, priority [n] -> keep [n] bool."""
    order = priority.argsort(descending=True, stable=True)
    order = order[unit[order].argsort(stable=True)]  # grouped by unit, best first within each
    counts = torch.bincount(unit, minlength=n_units)
    first = counts.cumsum(0) - counts  # where each unit's run starts in `order`
    rank = torch.empty_like(unit)
    rank[order] = torch.arange(unit.numel(), device=unit.device) - first[unit[order]]
    capacity = math.ceil(capacity_factor * unit.numel() / n_units)
    return (rank < capacity) | (priority > 1.0)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared) if n_shared else None
        self.n_units = cfg.num_groups if cfg.num_groups > 1 else cfg.n_routed_experts  # capacity units ("devices")

    def capacity_keep(self, scores: torch.Tensor, idx: torch.Tensor, n_seq: int, drop: TokenDropping) -> torch.Tensor:
        """Device-level capacity (paper 2.2.4): each of the D units processes at most
        ceil(capacity_factor * T*K / D) token-expert assignments -- factor 1.0 is the average load. Above that,
        the lowest-affinity assignments are dropped, except those of the sequences marked in `drop.no_drop`, which
        rank first and are always kept. scores [T, E], idx [T, K] -> keep [T, K] bool."""
        unit, priority = self.assignments(scores, idx, n_seq, drop)
        return within_capacity(unit, priority, self.n_units, drop.capacity_factor).view(idx.shape)

    def assignments(self, scores: torch.Tensor, idx: torch.Tensor, n_seq: int,
                    drop: TokenDropping) -> tuple[torch.Tensor, torch.Tensor]:
        """Each of the T*K assignments' unit (the device serving it) and priority: its affinity s_{i,t} in [0, 1],
        or 2.0 for the sequences exempt from dropping. -> unit [T*K], priority [T*K], token-major."""
        T, K = idx.shape
        E, D = scores.shape[-1], self.n_units
        unit = (idx // (E // D)).flatten()  # [T*K]
        priority = scores.gather(1, idx).flatten()  # [T*K]
        if drop.no_drop is not None:
            if drop.no_drop.numel() != n_seq:
                raise ValueError(f"TokenDropping.no_drop marks {drop.no_drop.numel()} sequences but the batch has "
                                 f"{n_seq}")
            protected = drop.no_drop.to(unit.device).repeat_interleave(T // n_seq * K)  # tokens are row-major
            priority = priority.masked_fill(protected, 2.0)  # above any softmax score
        return unit, priority

    def forward(self, x: torch.Tensor, router_out: dict | None = None,
                drop: TokenDropping | None = None) -> torch.Tensor:
        """x [..., H]. When `router_out` is a dict, the router's output is stored under this layer's index
        (a dict, not a list, so activation-checkpoint recomputation overwrites instead of appending); a
        RoutingReplay also fixes the expert choices. `drop` switches on token dropping, in training mode only."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, H]
        replay = router_out.recorded.get(self.layer_idx) if isinstance(router_out, RoutingReplay) else None
        weights, idx, scores = self.gate(x, replay)
        keep = None
        if self.training and drop is not None:
            keep = self.capacity_keep(scores, idx, shape[0] if len(shape) == 3 else 1, drop)
        y = self.experts(x, weights, idx, keep)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if router_out is not None:
            router_out[self.layer_idx] = RouterOutput(scores, idx, None if keep is None else ~keep)
        return y.view(shape)
