"""Model preparation for inference, apart from engine assembly: a checkpoint on disk -> the model an engine runs.

    plan = inference_plan(device, dtype, quantization)   # dsv2.capability: what this machine runs fast
    model = load_for_inference(path, plan)               # load in plan.weight_dtype -> fuse attention ->
                                                         # quantize / pack / upcast, by the plan
    model = load_for_inference(path, plan, ParallelContext(rank, world, group))   # one tensor-parallel rank:
                                                         # built on meta -> sharded -> only its slices read

One pipeline, each step a transform over the readable model chosen by capability; quantize-while-loading slots in
between reading a tensor and placing it.
"""
from __future__ import annotations

from ..capability import InferencePlan
from ..checkpoint import load_model, load_targets, resolve_model_path, validate
from ..config import ModelConfig
from ..model import Transformer, build_model
from ..model.inference import prepare_for_inference
from ..parallel.tensor_parallel import ParallelContext, shard_model, shard_targets


def load_for_inference(path: str, plan: InferencePlan, parallel: ParallelContext | None = None,
                       progress: bool = False) -> Transformer:
    if parallel is None or parallel.world_size == 1:
        model = load_model(path, dtype=plan.weight_dtype, device=plan.device, progress=progress)
    else:
        directory = resolve_model_path(path)
        cfg = ModelConfig.from_pretrained(directory)
        files = validate(cfg, directory)  # the whole checkpoint is checked, whichever slices this rank reads
        model = shard_model(build_model(cfg, dtype=plan.weight_dtype, device="meta", init=False), parallel)
        model.to_empty(device=plan.device)
        if cfg.tie_word_embeddings:
            model.lm_head.linear.weight = model.model.embed_tokens.weight
        load_targets(files, shard_targets(model, parallel), progress)
        model.eval()
    return prepare_for_inference(model, plan)
