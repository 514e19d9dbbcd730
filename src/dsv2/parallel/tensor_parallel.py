"""Tensor + expert parallel inference on torch.distributed: the plan (which matrix splits how, as a dict) and the
transform that turns a full-shape model built on the meta device into one rank's shard, plus where each rank's
slice of every checkpoint tensor goes.

    ctx = ParallelContext(rank, world_size, group)
    model = shard_model(build_model(cfg, device="meta", init=False), ctx)   # local shapes, still on meta
    model.to_empty(device=...)
    load_targets(files, shard_targets(model, ctx))                         # each rank reads only its slices

The model files stay single-device code: a shard is the same modules with fewer heads / columns / experts, and
the only communication is the wrappers below -- one all-reduce after attention, one after each MLP or MoE layer
(routed and shared experts summed together), the embedding's all-reduce and lm_head's all-gather.

- MLA: q_proj / q_b_proj and kv_b_proj split by heads (column-parallel), o_proj by its input (row-parallel, partial
  sums); q_a_proj, kv_a_proj_with_mqa and their norms replicated. The latent cache cannot be split by heads (every
  head reads all 576 values), so every rank keeps the whole cache.
- Dense MLP and shared experts: gate / up column-parallel, down row-parallel.
- Routed experts: expert-parallel, rank r holds experts [r E/w, (r+1) E/w). Every rank routes every token (the
  router is replicated) and runs its own experts; tokens routed elsewhere contribute zero, the all-reduce sums.
  With n_group = w, group-limited routing is the paper's device-limited routing.
- Embedding split by vocabulary rows (each rank looks up its rows, the all-reduce fills the rest); lm_head split by
  vocabulary, the logits of the rows that are sampled gathered.

Shape legend: w world size, r rank, n heads, E routed experts, V vocabulary, H hidden.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..checkpoint import Target
from ..config import ModelConfig
from ..model import Transformer
from ..model.moe import ExpertGroup, Experts, MoE

# per decoder layer, relative to the block; everything not named is replicated
TP_PLAN = {
    "self_attn.q_proj": "colwise",  # split by heads
    "self_attn.q_b_proj": "colwise",  # split by heads
    "self_attn.kv_b_proj": "colwise",  # split by heads (k_nope and v of each head)
    "self_attn.o_proj": "rowwise",  # partial sums
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
    "mlp.shared_experts.gate_proj": "colwise",
    "mlp.shared_experts.up_proj": "colwise",
    "mlp.shared_experts.down_proj": "rowwise",
    "mlp.experts": "expert",  # E / w whole experts
}
REDUCED = ("self_attn", "mlp")  # blocks whose output is a partial sum: one all-reduce each


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in a tensor-parallel group (group None: the default process group)."""
    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None

    @classmethod
    def from_group(cls, group: dist.ProcessGroup | None = None) -> "ParallelContext":
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    def split(self, size: int) -> tuple[int, int]:
        """This rank's [start, end) of `size` items split evenly."""
        part = size // self.world_size
        return self.rank * part, (self.rank + 1) * part


# ---- the communicating wrappers ---------------------------------------------------------------------------------
class AllReduce(nn.Module):
    """Runs `module` and sums its output over the group: the module computes a partial sum on each rank."""

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None):
        super().__init__()
        self.module, self.group = module, group

    def forward(self, *args, **kwargs):
        y = self.module(*args, **kwargs)
        dist.all_reduce(y, group=self.group)
        return y


class ExpertShard(nn.Module):
    """This rank's experts [first, first + n) of a MoE layer, given the router's global choices: assignments to
    other ranks' experts are masked out (their contribution is zero here; AllReduce adds the other ranks')."""

    def __init__(self, local: ExpertGroup, first: int):
        super().__init__()
        self.local, self.first = local, first

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        n = self.local.n_experts
        mine = (idx >= self.first) & (idx < self.first + n)  # [T, K]
        keep = mine if keep is None else keep & mine
        return self.local(x, weights, (idx - self.first).clamp(0, n - 1), keep)


class VocabParallelEmbedding(nn.Module):
    """Rows [first, first + V/w) of the embedding; ids elsewhere give zeros here, the all-reduce fills them in."""

    def __init__(self, rows: int, dim: int, first: int, group: dist.ProcessGroup | None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))
        self.first, self.group = first, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first
        mine = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * mine.unsqueeze(-1)
        dist.all_reduce(x, group=self.group)
        return x


class ParallelLMHead(nn.Module):
    """lm_head split by vocabulary: each rank scores its V/w tokens, the rows are gathered into full logits."""

    def __init__(self, linear: nn.Linear, group: dist.ProcessGroup | None, world_size: int):
        super().__init__()
        self.linear, self.group, self.world_size = linear, group, world_size

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.linear(x).contiguous()  # [..., V/w]
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)  # [..., V]


# ---- the transform ------------------------------------------------------------------------------------------------
def check_sizes(cfg: ModelConfig, world_size: int) -> None:
    """Every split must be even: heads, experts, vocabulary, the MLP widths. One error lists the sizes that work."""
    sizes = {"num_attention_heads": cfg.num_attention_heads, "vocab_size": cfg.vocab_size,
             "intermediate_size": cfg.intermediate_size}
    if cfg.n_routed_experts:
        sizes["n_routed_experts"] = cfg.n_routed_experts
        if cfg.n_shared_experts:
            sizes["moe_intermediate_size x n_shared_experts"] = cfg.moe_intermediate_size * cfg.n_shared_experts
    bad = {k: v for k, v in sizes.items() if v % world_size}
    if bad:
        common = math.gcd(*sizes.values())
        valid = [d for d in range(1, common + 1) if common % d == 0]
        raise ValueError(f"tensor_parallel_size={world_size} does not divide "
                         + ", ".join(f"{k}={v}" for k, v in bad.items())
                         + f"; this model splits evenly over {valid} devices")


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _set(module: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(module, parent) if parent else module, name, new)


def _local_linear(old: nn.Linear, style: str, w: int) -> nn.Linear:
    out_f, in_f = (old.out_features // w, old.in_features) if style == "colwise" else \
        (old.out_features, old.in_features // w)
    return nn.Linear(in_f, out_f, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)


def shard_model(model: Transformer, ctx: ParallelContext) -> Transformer:
    """Rank ctx.rank's shard of `model` (built full-size, normally on the meta device), in place: split matrices
    replaced by local ones of the local shape, communicating wrappers added. Returns the model."""
    cfg, w = model.config, ctx.world_size
    check_sizes(cfg, w)
    for block in model.model.layers:
        for path, style in TP_PLAN.items():
            old = _get(block, path)
            if old is None:
                continue
            if style == "expert":
                with torch.device(old.down_proj.device):
                    local = Experts(cfg, n_experts=cfg.n_routed_experts // w).to(old.down_proj.dtype)
                _set(block, path, ExpertShard(local, ctx.split(cfg.n_routed_experts)[0]))
            else:
                _set(block, path, _local_linear(old, style, w))
        for name in REDUCED:
            setattr(block, name, AllReduce(getattr(block, name), ctx.group))
    emb = model.model.embed_tokens
    v0, v1 = ctx.split(cfg.vocab_size)
    model.model.embed_tokens = VocabParallelEmbedding(v1 - v0, cfg.hidden_size, v0, ctx.group).to(
        device=emb.weight.device, dtype=emb.weight.dtype)
    head = nn.Linear(cfg.hidden_size, v1 - v0, bias=False, device=emb.weight.device, dtype=model.lm_head.weight.dtype)
    if cfg.tie_word_embeddings:
        head.weight = model.model.embed_tokens.weight
    model.lm_head = ParallelLMHead(head, ctx.group, w)
    return model


def shard_targets(model: Transformer, ctx: ParallelContext, layers: list[int] | None = None,
                  top: bool = True) -> dict[str, Target]:
    """Published checkpoint key -> where this rank's slice of it goes in a sharded model (made by shard_model and
    materialized). Keys this rank holds nothing of are absent, so they are never read. layers: only these blocks
    (default all); top: the embedding, final norm and lm_head too -- a streaming loader asks part by part, while
    the other parts are still on meta or already converted."""
    cfg, w = model.config, ctx.world_size
    out: dict[str, Target] = {}
    for i in range(len(model.model.layers)) if layers is None else layers:
        block = model.model.layers[i]
        prefix = f"model.layers.{i}."
        for name, p in block.named_parameters():
            path = name.replace("self_attn.module.", "self_attn.").replace("mlp.module.", "mlp.")
            key = prefix + path
            module_path, _, kind = path.rpartition(".")
            style = TP_PLAN.get(module_path)
            if ".experts.local." in path:  # stacked local experts -> the published per-expert keys
                continue
            if style == "colwise":  # weight and bias alike: this rank's rows
                out[key] = Target(p.data, rows=ctx.split(p.shape[0] * w))
            elif style == "rowwise" and kind == "weight":
                out[key] = Target(p.data, cols=ctx.split(p.shape[1] * w))
            elif style == "rowwise":  # the bias of a partial sum is added once, on rank 0
                if ctx.rank == 0:
                    out[key] = Target(p.data)
                else:
                    p.data.zero_()
            else:
                out[key] = Target(p.data)
        mlp = block.mlp.module
        if isinstance(mlp, MoE):
            shard: ExpertShard = mlp.experts
            local = shard.local
            I = local.down_proj.shape[-1]
            for e in range(local.n_experts):
                g = f"{prefix}mlp.experts.{shard.first + e}."
                out[g + "gate_proj.weight"] = Target(local.gate_up_proj.data[e, :I])
                out[g + "up_proj.weight"] = Target(local.gate_up_proj.data[e, I:])
                out[g + "down_proj.weight"] = Target(local.down_proj.data[e])
    if not top:
        return out
    v = ctx.split(cfg.vocab_size)
    out["model.embed_tokens.weight"] = Target(model.model.embed_tokens.weight.data, rows=v)
    out["model.norm.weight"] = Target(model.model.norm.weight.data)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = Target(model.lm_head.weight.data, rows=v)
    return out


def is_sharded(model: nn.Module) -> bool:
    return isinstance(getattr(model, "lm_head", None), ParallelLMHead)


