"""Model preparation for inference, apart from engine assembly: a checkpoint on disk -> the model an engine runs.

    plan = inference_plan(device, dtype, quantization)   # dsv2.capability: what this machine runs fast
    model = load_for_inference(path, plan)               # load in plan.weight_dtype -> fuse attention ->
                                                         # quantize / pack / upcast, by the plan

One pipeline, each step a transform over the readable model chosen by capability; multi-device sharding and
quantize-while-loading slot in between loading and the per-matrix transforms.
"""
from __future__ import annotations

from ..capability import InferencePlan
from ..checkpoint import load_model
from ..model import Transformer
from ..model.inference import prepare_for_inference


def load_for_inference(path: str, plan: InferencePlan, progress: bool = False) -> Transformer:
    model = load_model(path, dtype=plan.weight_dtype, device=plan.device, progress=progress)
    return prepare_for_inference(model, plan)
