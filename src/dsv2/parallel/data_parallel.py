"""Data-parallel training: one process per device, launched by torchrun; each holds 1/N of the weights, gradients
and AdamW moments (FSDP2, `torch.distributed.fsdp.fully_shard`) and computes on its own part of every batch.

    torchrun --nproc-per-node 2 $(which dsv2) train --data data --out runs/r1 --batch-size 16      # 8 per process
    python -m torch.distributed.run --nproc-per-node 2 -m dsv2.cli train --data data --out runs/r1

`--batch-size` stays the global batch: rank r reads sequences [r B/N, (r+1) B/N) of each global micro-batch, so
the run sees exactly the batches of the one-process run. Every rank builds and initialises the whole model from
the seed (the one-process model, bit for bit), then `apply_fsdp` shards it in place. Gradients are
reduce-scattered as the mean over ranks: the mean of the ranks' mean losses over their equal parts is the global
batch's mean loss, so the gradient is the one-process gradient, up to the order of the sums.

The process grid is a DeviceMesh with one dimension, "dp". With `--expert-parallel K` (parallel/expert_parallel.py)
the routed experts are split over groups of K ranks instead, outside FSDP, and served by all-to-all.
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..model import Transformer
from ..model.moe import Gate
from .launch import leave_group, torchrun_env


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run."""
    rank: int
    size: int
    device: torch.device
    mesh: DeviceMesh  # dims ("dp",)

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, prints and renames checkpoints into place."""
        return self.rank == 0

    def part(self, batch_size: int) -> tuple[int, int]:
        """(first, count): this rank's contiguous part of a global batch of `batch_size` sequences."""
        check_batch(batch_size, self.size)
        n = batch_size // self.size
        return self.rank * n, n

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks of a small CPU tensor (metrics, counts), returned on the CPU."""
        t = values.to(self.device)
        dist.all_reduce(t)
        return t.cpu()

    def all_gather_object(self, obj) -> list:
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()


class RouterLog(MutableMapping):
    """The mapping a training forward collects each MoE layer's routing in (`model(x, router_out=RouterLog())`),
    layer index -> RouterOutput. Not a dict: FSDP rebuilds the dicts, lists and dataclasses among a sharded
    module's arguments that hold tensors needing gradients (to hook its backward), so from the second MoE layer on
    the layers would write into copies; an object of its own type reaches every block as itself."""

    def __init__(self):
        self._layers: dict = {}

    def __getitem__(self, layer):
        return self._layers[layer]

    def __setitem__(self, layer, routing) -> None:
        self._layers[layer] = routing

    def __delitem__(self, layer) -> None:
        del self._layers[layer]

    def __iter__(self):
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


def check_batch(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        fits = [n for n in range(1, batch_size + 1) if batch_size % n == 0]
        raise ValueError(f"--batch-size {batch_size} is the global batch and must split evenly over the "
                         f"{world_size} processes: use a multiple of {world_size} (e.g. "
                         f"{-(-batch_size // world_size) * world_size}), or launch {fits} processes")


def world_from_env(device: str = "cpu") -> World | None:
    """The process group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK, initialised (gloo on CPU, nccl on
    CUDA with this process on cuda:LOCAL_RANK); None when not launched that way, or alone (WORLD_SIZE=1)."""
    env = torchrun_env()
    if env is None or env.world_size == 1:
        return None
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} not: launch several processes with "
                         "`torchrun --nproc-per-node N $(which dsv2) train ...`, or unset RANK and WORLD_SIZE to "
                         "train in one process")
    kind = torch.device(device).type
    if kind == "cuda":
        if torch.device(device).index is not None:
            raise ValueError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; pass --device "
                             "cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA device here; use --device cpu")
        dev = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    elif kind == "cpu":
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        raise ValueError(f"--device {device}: data-parallel training runs on cpu (gloo) or cuda (nccl)")
    mesh = init_device_mesh(kind, (dist.get_world_size(),), mesh_dim_names=("dp",))
    return World(dist.get_rank(), dist.get_world_size(), dev, mesh)


def close(world: World | None) -> None:
    """Leave the run together: every rank past its last collective, then every group (the default one and the
    meshes' subgroups) destroyed while the ranks are alive, not at interpreter exit."""
    if world is not None and dist.is_initialized():
        dist.barrier()
        leave_group()


def apply_fsdp(model: Transformer, mesh: DeviceMesh, bf16: bool = False) -> Transformer:
    """Shard `model` in place over the mesh's "dp" dimension: each Block, the embeddings and the final norm are one
    FSDP unit each (all-gathered just before their forward and backward, freed after), each router its own.
    lm_head stays with the root unit: the training loss multiplies its weight inside the model's forward, fused with
    the cross-entropy (kernels/linear_ce.py), not through lm_head's own forward, so the weight must be gathered for
    the whole forward (its gradient is made there too, so backward needs no second gather).

    bf16: blocks all-gather their weights in bf16 (half the traffic; the matmuls run in bf16 under autocast anyway)
    and reduce gradients in fp32. The routers stay fp32 (routing is a discrete choice; bf16 logits flip near-ties),
    and so do the embeddings and the final norm: as under autocast in one process, the residual stream stays fp32
    (cast_forward_inputs=False). lm_head is gathered with the root in fp32; the loss casts it per chunk. The one
    numerical difference from one-process bf16 autocast is that the blocks' RMSNorm weights are rounded to bf16.

    Expert-parallel experts (already split by apply_expert_parallel) are left out: each rank keeps its slice whole
    (fp32; autocast casts them per matmul as in one process)."""
    from .expert_parallel import expert_parameters
    ignored = set(expert_parameters(model)) or None
    fp32 = MixedPrecisionPolicy()
    low = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                               cast_forward_inputs=False) if bf16 else fp32
    for block in model.model.layers:
        for m in block.modules():
            if isinstance(m, Gate):
                fully_shard(m, mesh=mesh, mp_policy=fp32)
        fully_shard(block, mesh=mesh, mp_policy=low, ignored_params=ignored)
    fully_shard(model.model.norm, mesh=mesh, mp_policy=fp32)
    if not model.config.tie_word_embeddings:  # a tied matrix stays with the root unit, shared by both uses
        fully_shard(model.model.embed_tokens, mesh=mesh, mp_policy=fp32)
    fully_shard(model, mesh=mesh, mp_policy=fp32, ignored_params=ignored)
    return model


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> float:
    """torch's clip_grad_norm_ on sharded (DTensor) gradients: each rank's norms of its shards are combined into
    the global norm (a Replicate DTensor), and every shard is scaled by the same factor."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
