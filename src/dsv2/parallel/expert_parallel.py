"""Expert-parallel training: each MoE layer's routed experts split over K ranks -- the paper's devices -- with the
tokens sent to them and back by all-to-all (`--expert-parallel K` under torchrun).

    torchrun --nproc-per-node 4 $(which dsv2) train ... --expert-parallel 2

The N processes are data parallel as always (rank r computes on part r of every global batch; attention, dense and
shared-expert weights are FSDP-sharded over all N). For the routed experts they form N/K groups of K consecutive
ranks: rank r holds experts [j E/K, (j+1) E/K) with j = r mod K, and the ranks of one group serve each other's
tokens. Per MoE layer and micro-batch (`DispatchedExperts.forward`):

  1. each token goes once to every rank holding one of its (kept) experts -- its hidden state, with the routing
     weight and local expert id of each of its K slots that rank serves; the row counts are exchanged first, then
     one `all_to_all_single` with those split sizes (autograd through it: backward is the reverse all-to-all);
  2. each rank runs its experts on what it received, grouped by expert, and sums each row's weighted outputs;
  3. a second all-to-all brings each row's partial sum back to its token's rank, where the partial sums add up.

A token whose experts are all on its own rank never leaves it. With `n_group` = K, group-limited routing is the
paper's device-limited routing (each token reaches at most `topk_group` ranks), and the device- and communication-
level balance losses count real ranks: D = K, and M = the most ranks a token can reach. Token dropping is per rank:
each rank keeps the capacity_factor x (average) best assignments among all those its EP group routes to it.
With N = K and n_group = K the run is the one-process run with the same global batch, dropping included.

Gradients: attention and the other FSDP units are reduce-scattered by FSDP as the mean over N ranks; an expert's
gradient arrives through the all-to-all's backward summed over its group's tokens, so it is divided by N and summed
over the N/K ranks that hold the same experts (`reduce_expert_grads`). Expert weights and their AdamW moments live
as plain tensors, E/K experts per rank, outside FSDP; checkpoints see them as DTensors of the whole [E, ...] tensors
(`global_expert_state`), so torch.distributed.checkpoint reshards them to any layout and `dsv2 export` reads them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..config import ModelConfig
from ..model.moe import Experts, MoE, TokenDropping, within_capacity

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertParallel:
    """This process's place in the expert-parallel layout."""
    size: int  # K: the ranks one copy of each layer's experts is split over
    rank: int  # j: this rank holds experts [j E/K, (j+1) E/K)
    world_size: int  # N
    group: dist.ProcessGroup  # the K ranks serving each other's tokens
    replicas: dist.ProcessGroup | None  # the N/K ranks holding the same experts (None when N = K)
    mesh: DeviceMesh  # ("replica", "ep"), N/K x K: where checkpoints place the expert shards
    reach: int  # M: the most ranks one token's experts can be on (the communication balance loss's M)


def ranks_reached(cfg: ModelConfig, k: int) -> int:
    """The most of K ranks one token's experts can span: top_k, at most K, and with group-limited routing
    topk_group groups' worth of ranks (a group spans max(1, K / n_group) ranks)."""
    groups = cfg.num_groups if cfg.topk_method == "group_limited_greedy" else 1
    limit = cfg.groups_per_token * max(1, k // groups) if groups > 1 else k
    return min(cfg.num_experts_per_tok, k, limit)


def check_expert_parallel(cfg: ModelConfig, k: int, world_size: int) -> None:
    """One clear error for an expert-parallel size that cannot work, listing the ones that would."""
    if k == 1:
        return
    if not any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
        raise ValueError(f"--expert-parallel {k}: this model has no MoE layers")
    fits = [n for n in range(1, world_size + 1) if world_size % n == 0 and cfg.n_routed_experts % n == 0]
    if world_size % k or cfg.n_routed_experts % k:
        raise ValueError(f"--expert-parallel {k} must divide both the {world_size} processes and the "
                         f"{cfg.n_routed_experts} routed experts; valid sizes here: {fits}")


def expert_parallel_group(world, k: int, cfg: ModelConfig) -> ExpertParallel:
    """Collective: split the data-parallel `world` (data_parallel.World) into groups of K consecutive ranks."""
    check_expert_parallel(cfg, k, world.size)
    mesh = init_device_mesh(world.device.type, (world.size // k, k), mesh_dim_names=("replica", "ep"))
    return ExpertParallel(k, world.rank % k, world.size, mesh.get_group("ep"),
                          mesh.get_group("replica") if world.size > k else None, mesh, ranks_reached(cfg, k))


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: forward sends rows by `send` sizes and receives `recv` sizes; backward sends
    the gradients back the reverse way. Plain torch.distributed underneath (torch.distributed.nn's version of this
    is deprecated; the functional collectives keep process groups in a registry of their own until exit)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return back, None, None, None


@dataclass
class Traffic:
    """What one MoE layer's dispatch moved for this rank in one forward (and its backward)."""
    tokens: int  # tokens this rank routed
    crossed: int  # of them, sent to at least one other rank
    rows: int  # hidden-state rows sent to other ranks (a token once per rank it reaches)
    bytes: int  # bytes this rank sent to other ranks: dispatch and combine, forward and backward


class DispatchedExperts(Experts):
    """This rank's E/K experts of one layer, serving the whole EP group's tokens by all-to-all (module docstring).
    Same parameter names as Experts, holding the slice [first, first + E/K)."""

    def __init__(self, experts: Experts, ep: ExpertParallel):
        nn.Module.__init__(self)
        n = experts.n_experts // ep.size
        self.n_experts, self.first, self.ep = n, ep.rank * n, ep
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[self.first:self.first + n].clone())
        self.down_proj = nn.Parameter(experts.down_proj.detach()[self.first:self.first + n].clone())
        self.traffic: Traffic | None = None  # the last forward's

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H], weights/idx [T, K] (global expert ids), keep [T, K] -> sum_k weights * expert_idx(x) [T, H],
        computed wherever the experts are. Collective over the EP group."""
        T, K = idx.shape
        H, n, P, group = x.shape[-1], self.n_experts, self.ep.size, self.ep.group
        dest = idx // n  # [T, K] the rank serving each slot
        live = torch.ones_like(idx, dtype=torch.bool) if keep is None else keep
        reach = torch.zeros(T, P, dtype=torch.int32, device=x.device).scatter_add_(1, dest, live.int()) > 0
        pair_rank, pair_token = reach.T.nonzero(as_tuple=True)  # a row per (rank, token): by rank, then token
        send = torch.bincount(pair_rank, minlength=P)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        send_sizes, recv_sizes = send.tolist(), recv.tolist()
        on_rank = (dest[pair_token] == pair_rank[:, None]) & live[pair_token]  # [rows, K] slots that rank serves
        local = torch.where(on_rank, idx[pair_token] - pair_rank[:, None] * n, -1)
        payload = torch.cat([x[pair_token].float(), weights[pair_token].float() * on_rank], dim=1)  # [rows, H+K]
        got = _AllToAll.apply(payload, send_sizes, recv_sizes, group)
        got_local = local.new_empty(sum(recv_sizes), K)
        dist.all_to_all_single(got_local, local, recv_sizes, send_sizes, group=group)
        xr, wr = got.split([H, K], dim=1)
        if got.shape[0]:
            yr = super().forward(xr.to(x.dtype), wr, got_local.clamp_min(0), got_local >= 0).float()
        else:  # nothing to serve; still in the graph, so that the combine's backward runs here as on the others
            yr = xr
        back = _AllToAll.apply(yr, recv_sizes, send_sizes, group)
        y = torch.zeros(T, H, dtype=torch.float32, device=x.device).index_add_(0, pair_token, back)

        me = self.ep.rank
        out_rows, in_rows = sum(send_sizes) - send_sizes[me], sum(recv_sizes) - recv_sizes[me]
        row_bytes = (H + K) * 4 + K * local.element_size()  # payload + local ids, then H * 4 back
        crossed = int((reach & (torch.arange(P, device=x.device) != me)).any(dim=1).sum())
        self.traffic = Traffic(T, crossed, out_rows,
                               out_rows * row_bytes + in_rows * H * 4  # forward: dispatch, combine
                               + in_rows * (H + K) * 4 + out_rows * H * 4)  # backward: their gradients
        return y.to(x.dtype)


class ExpertParallelMoE(MoE):
    """A MoE layer whose routed experts are DispatchedExperts: the same router and shared experts, capacity units
    that are the EP ranks, and each forward's Traffic in its RouterOutput."""

    def __init__(self, moe: MoE, ep: ExpertParallel):
        nn.Module.__init__(self)
        # MoE's order of registration, so that parameters enumerate as in the one-process model (optimizer
        # checkpoints number them)
        self.layer_idx, self.gate = moe.layer_idx, moe.gate
        self.experts = DispatchedExperts(moe.experts, ep)
        self.shared_experts = moe.shared_experts
        self.n_units, self.ep = ep.size, ep

    def capacity_keep(self, scores: torch.Tensor, idx: torch.Tensor, n_seq: int, drop: TokenDropping) -> torch.Tensor:
        """Per-rank capacity over everything the EP group routes: the ranks' assignments are gathered (in rank
        order, which is the global batch's token order), ranked as in one process, and each keeps its own part.
        Every rank of a training step holds the same number of tokens."""
        unit, priority = self.assignments(scores, idx, n_seq, drop)
        units = [torch.empty_like(unit) for _ in range(self.ep.size)]
        priorities = [torch.empty_like(priority) for _ in range(self.ep.size)]
        dist.all_gather(units, unit, group=self.ep.group)
        dist.all_gather(priorities, priority, group=self.ep.group)
        keep = within_capacity(torch.cat(units), torch.cat(priorities), self.n_units, drop.capacity_factor)
        return keep.view(self.ep.size, -1)[self.ep.rank].view(idx.shape)

    def forward(self, x: torch.Tensor, router_out: dict | None = None,
                drop: TokenDropping | None = None) -> torch.Tensor:
        y = super().forward(x, router_out, drop)
        if router_out is not None:
            router_out[self.layer_idx].traffic = self.experts.traffic
        return y


def apply_expert_parallel(model: nn.Module, ep: ExpertParallel) -> nn.Module:
    """Swap every MoE layer of `model` (whole and initialised, the same on every rank) for its expert-parallel
    form, keeping this rank's experts. Before FSDP, which then leaves the expert weights alone."""
    for block in model.model.layers:
        if block.is_moe:
            block.mlp = ExpertParallelMoE(block.mlp, ep)
    return model


def expert_modules(model: nn.Module) -> dict[str, DispatchedExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, DispatchedExperts)}


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [getattr(m, p) for m in expert_modules(model).values() for p in EXPERT_PARAMS]


def reduce_expert_grads(model: nn.Module, ep: ExpertParallel) -> None:
    """After a step's last backward: each expert gradient becomes the global batch's mean-loss gradient, as FSDP
    makes the others (divided by N, summed over the ranks holding the same experts)."""
    for p in expert_parameters(model):
        if p.grad is None:  # no token reached this rank's experts in the whole step
            p.grad = torch.zeros_like(p)
        p.grad.div_(ep.world_size)
        if ep.replicas is not None:
            dist.all_reduce(p.grad, group=ep.replicas)


def clip_grad_norm_(model: nn.Module, max_norm: float, ep: ExpertParallel) -> float:
    """The global gradient norm of an FSDP + expert-parallel model (one all-reduce), and every gradient scaled by
    min(1, max_norm / (norm + 1e-6)) as torch's clip_grad_norm_ does. FSDP shards hold each element once over the
    N ranks; the expert slices are held N/K times, so they count K/N each."""
    experts = {id(p) for p in expert_parameters(model)}
    grads = [(p.grad, id(p) in experts) for p in model.parameters() if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float64)
    for g, expert in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        s = local.detach().double().square().sum().cpu()
        sq += s * (ep.size / ep.world_size) if expert else s
    t = sq.to(grads[0][0].device if grads else "cpu")
    dist.all_reduce(t)
    norm = math.sqrt(float(t))
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for g, _ in grads:
            g.mul_(scale)
    return norm


def global_expert_state(model: nn.Module, msd: dict, osd: dict | None = None, local: bool = False) -> None:
    """In place on get_state_dict's dicts: each expert slice (weights, and AdamW moments with `osd`) as the
    DTensor of the whole [E, ...] tensor it is part of -- Shard(0) over "ep", Replicate over "replica" -- which is
    what torch.distributed.checkpoint saves and reshards. local=True turns them back into the plain slices."""
    for name, m in expert_modules(model).items():
        for p in EXPERT_PARAMS:
            key = f"{name}.{p}"
            entries = [(msd, key)]
            if osd is not None and key in osd.get("state", {}):
                st = osd["state"][key] = dict(osd["state"][key])  # get_state_dict's may be the optimizer's own
                entries += [(st, k) for k, v in st.items() if torch.is_tensor(v) and v.ndim > 0]
            for d, k in entries:
                if local:
                    d[k] = d[k].to_local()
                else:
                    d[k] = DTensor.from_local(d[k], m.ep.mesh, [Replicate(), Shard(0)], run_check=False)


def local_expert_slices(model: nn.Module, model_state: dict, optim_state: dict | None = None) -> None:
    """In place on whole-tensor state dicts keyed by name (a one-process checkpoint's): the expert entries cut to
    this rank's slice, as the model holds them."""
    for name, m in expert_modules(model).items():
        for p in EXPERT_PARAMS:
            key = f"{name}.{p}"
            cut = slice(m.first, m.first + m.n_experts)
            model_state[key] = model_state[key][cut]
            if optim_state is not None and key in optim_state["state"]:
                st = optim_state["state"][key]
                for k, v in st.items():
                    if torch.is_tensor(v) and v.ndim > 0:
                        st[k] = v[cut]
