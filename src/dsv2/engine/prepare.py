"""Model preparation for inference, apart from engine assembly: a checkpoint on disk -> the model an engine runs.

    plan = inference_plan(device, dtype, quantization)   # dsv2.capability: what this machine runs fast
    model = load_for_inference(path, plan)               # streamed part by part: read -> fuse attention ->
                                                         # quantize / pack / upcast, by the plan -> next part
    model = load_for_inference(path, plan, ParallelContext(rank, world, group))   # one tensor-parallel rank:
                                                         # sharded on meta, only its slices read

One pipeline, each step a transform over the readable model chosen by capability. The model is built on the meta
device (no memory), then materialized and read one part at a time -- lm_head, each decoder block, the embedding
and final norm -- and each part is put in its inference form (prepare_part) before the next is read. So the stored
form of the whole model (bf16 for the published checkpoints) never exists at once: peak memory is the prepared
model plus one part in the stored dtype, which is what lets int4 / int8 fit a checkpoint bigger than RAM. The
checkpoint is validated as a whole before a byte of weight is read; a tensor that cannot be read is named, with
its file, before anything is returned. stream_parts is that loop on its own, for a caller that writes each part out
(`dsv2 quantize`); a checkpoint it wrote (config.json's quantization_config) is read as stored by
engine/quantized_checkpoint.py instead.
"""
from __future__ import annotations

import ctypes
from collections.abc import Iterator

import torch
from torch import nn

from ..capability import InferencePlan
from ..checkpoint import checkpoint_tensors, load_targets, resolve_model_path, validate
from ..config import ModelConfig
from ..model import Transformer, build_model
from ..model.inference import prepare_embedding, prepare_part
from ..model.moe import Experts
from ..model.upcast import Workspace
from ..parallel.tensor_parallel import ParallelContext, shard_model, shard_targets
from ..progress import Progress

LAYERS = "model.layers."


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim), where there is one to ask: a part's
    stored form, freed once converted, otherwise stays resident in the allocator's arenas and adds up over the
    parts. Elsewhere a no-op."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def load_for_inference(path: str, plan: InferencePlan, parallel: ParallelContext | None = None,
                       progress: bool = False) -> Transformer:
    directory = resolve_model_path(path)
    from .quantized_checkpoint import load_quantized, quantization_config  # (it builds on this module)
    if quantization_config(directory) is not None:  # written by `dsv2 quantize`: read as stored, no re-quantizing
        return load_quantized(directory, plan, parallel, progress)
    model = None
    for model, _ in stream_parts(directory, plan, parallel, progress):
        pass
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None and t.is_meta]
    if left:
        raise RuntimeError(f"internal: {left[:3]} were never read (streaming loader)")
    model.requires_grad_(False)
    return prepare_embedding(model, plan).eval()


def stream_parts(directory: str, plan: InferencePlan, parallel: ParallelContext | None = None,
                 progress: bool = False, desc: str = "loading weights"
                 ) -> Iterator[tuple[Transformer, dict[str, nn.Module]]]:
    """Read a plain checkpoint part by part, each in its inference form: yields (model, part) as each part is done,
    part = {module path: module}: first the embedding, final norm and lm_head, then each decoder block. The parts
    not yet yielded are on the meta device; a caller that writes each part out may release it (to_empty on meta)
    before asking for the next, so that it never holds more than one part (engine/quantized_checkpoint.py)."""
    cfg = ModelConfig.from_pretrained(directory)
    files = validate(cfg, directory)  # the whole checkpoint is checked, whichever parts or slices are read
    model = build_model(cfg, dtype=plan.weight_dtype, device="meta", init=False)
    sharded = parallel is not None and parallel.world_size > 1
    if sharded:
        model = shard_model(model, parallel)
    model.eval()

    def targets(layer: int | None) -> dict:
        """Checkpoint key -> destination for one part: block `layer`'s keys, or (None) the ones outside the
        blocks. Only that part is looked at: the others are still on meta or already converted."""
        if sharded:
            return shard_targets(model, parallel, layers=[] if layer is None else [layer], top=layer is None)
        prefix = f"{LAYERS}{layer}."
        every = checkpoint_tensors(model.model.layers[layer]) if layer is not None else checkpoint_tensors(model)
        if layer is not None:
            return {prefix + k: t for k, t in every.items()}
        return {k: t for k, t in every.items() if not k.startswith(LAYERS)}

    top = [model.model.embed_tokens, model.model.norm, model.lm_head]
    bar = Progress(len(model.model.layers) + 1, desc, unit="parts", enabled=progress)
    for m in top:
        m.to_empty(device=plan.device)
    if cfg.tie_word_embeddings:
        head = model.lm_head.linear if sharded else model.lm_head
        head.weight = model.model.embed_tokens.weight
    load_targets(files, targets(None))
    workspace = Workspace()
    _convert_child(model, "lm_head", plan, workspace)
    bar.update(1)
    yield model, top_part(model)
    for i, block in enumerate(model.model.layers):
        experts = None if sharded else _converted_experts(block, plan, workspace)
        block.to_empty(device=plan.device)
        load_targets(files, targets(i))
        if experts is not None:  # the routed experts one at a time, straight into their converted form
            _fill_experts(experts, f"{LAYERS}{i}.mlp.experts.", files, cfg, plan, workspace)
        prepare_part(block, plan, workspace)
        release_freed_memory()
        bar.update(1)
        yield model, {f"{LAYERS}{i}": block}
    bar.close()


def top_part(model: Transformer) -> dict[str, nn.Module]:
    """The part outside the decoder blocks, by module path."""
    return {"model.embed_tokens": model.model.embed_tokens, "model.norm": model.model.norm, "lm_head": model.lm_head}


def _convert_child(parent: nn.Module, name: str, plan: InferencePlan, workspace: Workspace) -> nn.Module:
    """parent.<name> through the plan's swaps alone (given the whole parent, they would take every part), put back
    in its place and returned. A holder owns it meanwhile, so its stored form is freed as soon as it is replaced."""
    holder = nn.Module()
    setattr(holder, name, getattr(parent, name))
    setattr(parent, name, None)
    try:
        prepare_part(holder, plan, workspace)
    finally:
        setattr(parent, name, getattr(holder, name))
    return getattr(parent, name)


def _converted(module: nn.Module, plan: InferencePlan, workspace: Workspace) -> nn.Module:
    """What the plan's swaps make of a module that stays the caller's."""
    holder = nn.Module()
    holder.part = module
    return _convert_child(holder, "part", plan, workspace)


def _stacked(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t for n, t in [*module.named_parameters(), *module.named_buffers()] if t is not None}


def _converted_experts(block: nn.Module, plan: InferencePlan, workspace: Workspace) -> nn.Module | None:
    """For a MoE block still on the meta device: its routed experts' converted module, built on meta from the
    shapes alone and put in the block's place (to_empty then allocates it), when the plan converts experts into
    per-expert stacked tensors (int8, int4, upcast: every tensor [E, ...]), so that it can be filled one expert at
    a time; None when experts are kept as they are, or converted into something else (oneDNN-packed: opaque
    per-expert objects) -- those are read whole with their block."""
    mlp = getattr(block, "mlp", None)
    if not isinstance(getattr(mlp, "experts", None), Experts):
        return None
    plain = mlp.experts
    try:
        converted = _convert_child(mlp, "experts", plan, workspace)
    except (RuntimeError, NotImplementedError):  # a conversion that needs real data (mlp.experts is put back)
        return None
    tensors = _stacked(converted)
    if (converted is plain or not tensors
            or any(t.dim() == 0 or t.shape[0] != plain.n_experts or not t.is_meta for t in tensors.values())):
        mlp.experts = plain
        return None
    return converted


def _fill_experts(converted: nn.Module, prefix: str, files: dict, cfg: ModelConfig, plan: InferencePlan,
                  workspace: Workspace) -> None:
    """Read each routed expert of one layer into a one-expert plain module, convert it the plan's way, and copy
    the result into slot e of the converted stack: what is held beside the model is one expert. Bit for bit what
    converting the whole stack gives (every format converts experts independently)."""
    with torch.device("meta"):
        one = Experts(cfg, 1)
    one = one.to(plan.weight_dtype).to_empty(device=plan.device)
    I = one.down_proj.shape[-1]
    slots = _stacked(converted)
    for e in range(converted.n_experts):
        load_targets(files, {f"{prefix}{e}.gate_proj.weight": one.gate_up_proj.data[0, :I],
                             f"{prefix}{e}.up_proj.weight": one.gate_up_proj.data[0, I:],
                             f"{prefix}{e}.down_proj.weight": one.down_proj.data[0]})
        with torch.no_grad():
            for name, t in _stacked(_converted(one, plan, workspace)).items():
                slots[name][e].copy_(t[0])
        release_freed_memory()  # the expert's temporaries, before the next one's land elsewhere in the heap
