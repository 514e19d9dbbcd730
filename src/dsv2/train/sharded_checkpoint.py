"""Sharded training checkpoints of data-parallel runs (torch.distributed.checkpoint, DCP): every rank writes its own
shards of the weights and AdamW moments, all at once.

    checkpoints/step-00001000/
      __0_0.distcp __1_0.distcp ...   model + optimizer shards: rank r's file holds what rank r owns
      .metadata                       DCP's index: each tensor's name, global shape and where its pieces are
      trainer.pt                      step, times, data position, the logging interval's sums, world size
      rng-00000.pt rng-00001.pt ...   each rank's RNG states
      MANIFEST.sha256                 every other file's sha256, in sha256sum's format (`sha256sum -c` checks it)

Written with fileio.atomic_directory: everything goes into step-00001000.dsv2-tmp/, the manifest last, and after
a barrier (every rank done) rank 0 fsyncs it and renames it into place -- a crash mid-write leaves the previous
checkpoints as they were, and every step-N/ directory is complete. Loading checks the manifest first (each rank
hashing its share of the files), so a damaged checkpoint is refused before anything is loaded.

DCP keeps each tensor under its parameter name with its global shape, so a checkpoint written by N ranks loads into
M ranks (each reads the pieces that overlap its shards) and into one plain model (`load_sharded` without a process
group, as `dsv2 export` does); `load_full` puts a one-process .pt checkpoint into a sharded model.
"""
from __future__ import annotations

import os
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict, set_state_dict)

from ..fileio import STAGING, atomic_directory, file_sha256
from ..parallel.data_parallel import World
from ..parallel.expert_parallel import global_expert_state, local_expert_slices

MANIFEST = "MANIFEST.sha256"
TRAINER = "trainer.pt"


def _rng_file(rank: int) -> str:
    return f"rng-{rank:05d}.pt"


def save_sharded(path: str, model: nn.Module, opt: torch.optim.Optimizer, trainer: dict, rng: dict,
                 world: World) -> None:
    """Collective: every rank calls it. `trainer` (rank 0's is written) holds the run's non-tensor state, `rng`
    this rank's RNG states."""
    staging = os.path.realpath(path) + STAGING  # the directory atomic_directory stages into
    with (atomic_directory(path) if world.main else nullcontext(staging)) as tmp:
        world.barrier()  # rank 0 has created it
        msd, osd = get_state_dict(model, opt)
        global_expert_state(model, msd, osd)  # expert-parallel slices as parts of the whole tensors
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=tmp)
        torch.save(rng, os.path.join(tmp, _rng_file(world.rank)))
        if world.main:
            torch.save(trainer, os.path.join(tmp, TRAINER))
        world.barrier()  # every file is written: hash them, a share per rank
        names = sorted(os.listdir(tmp))
        hashes = {n: file_sha256(os.path.join(tmp, n)) for n in names[world.rank::world.size]}
        hashes = {n: h for part in world.all_gather_object(hashes) for n, h in part.items()}
        if world.main:
            with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:  # fsynced by atomic_directory
                f.writelines(f"{hashes[n]}  {n}\n" for n in names)
    world.barrier()  # in place before anyone goes on


def verify_sharded(path: str, world: World | None = None) -> str | None:
    """What is wrong with the checkpoint directory `path` (missing or changed files), or None when every file
    matches its manifest. Collective with `world`: the ranks hash a share each and all get the same answer."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            recorded = {name: digest for digest, name in (line.split() for line in f if line.strip())}
    except FileNotFoundError:
        recorded, problems = {}, [f"no {MANIFEST} (a copy that lost it?)"]
    except (OSError, ValueError, UnicodeDecodeError) as e:
        recorded, problems = {}, [f"unreadable {MANIFEST} ({e})"]
    else:
        problems = [f"{n} is not in {MANIFEST}" for n in (".metadata", TRAINER) if n not in recorded]
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    for name in sorted(recorded)[rank::size]:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            problems.append(f"{name} is missing")
        elif (actual := file_sha256(file)) != recorded[name]:
            problems.append(f"{name}: checksum mismatch -- its sha256 is {actual[:16]}... but {recorded[name][:16]}... "
                            "was recorded when it was written: its bytes changed since (a disk or copy error)")
    if world is not None:
        problems = list(dict.fromkeys(p for part in world.all_gather_object(problems) for p in part))
    return f"{path}: " + "; ".join(problems) if problems else None


def read_sharded(path: str, rank: int = 0) -> dict:
    """The run state of a (verified) checkpoint directory without the tensors: the trainer state plus this rank's
    RNG states -- rank 0's when the checkpoint was written by fewer ranks."""
    state = torch.load(os.path.join(path, TRAINER), map_location="cpu", weights_only=True)
    rng = os.path.join(path, _rng_file(rank))
    state["rng"] = torch.load(rng if os.path.isfile(rng) else os.path.join(path, _rng_file(0)), weights_only=True)
    return state


def load_sharded(path: str, model: nn.Module, opt: torch.optim.Optimizer | None = None) -> None:
    """Load the weights (and with `opt`, the optimizer state) of checkpoint directory `path` into `model`, sharded
    over any number of ranks (collective) or a plain model in one process."""
    if opt is None:
        state = {"model": get_model_state_dict(model)}
        global_expert_state(model, state["model"])
        _dcp_load(state, path)
        global_expert_state(model, state["model"], local=True)
        set_model_state_dict(model, state["model"])
        return
    msd, osd = get_state_dict(model, opt)  # templates: each rank's shards, which DCP fills in place
    global_expert_state(model, msd, osd)
    state = {"model": msd, "optimizer": osd}
    _dcp_load(state, path)
    global_expert_state(model, msd, osd, local=True)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _dcp_load(state: dict, path: str) -> None:
    if dist.is_initialized():
        dcp.load(state, checkpoint_id=path)
        return
    with warnings.catch_warnings():  # DCP warns that it assumes one process: that is the intent here
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=True)


def load_full(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """A one-process checkpoint's whole tensors (state["model"], state["optimizer"]) into a sharded model: every
    rank keeps its shards. The optimizer state is keyed by parameter index there; DCP keys it by name."""
    full = StateDictOptions(full_state_dict=True)
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in opt.param_groups for p in g["params"]]  # the optimizer's numbering
    saved = state["optimizer"]
    by_name = {"state": {names[i]: dict(s) for i, s in saved["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
    weights = dict(state["model"])
    local_expert_slices(model, weights, by_name)  # an expert-parallel rank keeps its experts
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}  # whole tensors' (a DTensor's is global)
    for name, s in by_name["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v) and v.ndim and tuple(v.shape) != shapes[name]:
                raise ValueError(f"the checkpoint's optimizer state {k} of {name} has shape {tuple(v.shape)}, the "
                                 f"parameter {shapes[name]}: it was written for another model")
    set_model_state_dict(model, weights, options=full)
    set_optimizer_state_dict(model, opt, by_name, options=full)
