"""AdamW parameter groups and learning-rate schedules (MODEL_SPEC section 6).

Weight decay goes on the projection matrices only -- attention, dense MLP, shared and routed experts and the
untied lm_head -- never on:
  - RMSNorm weights and biases: they set scales and offsets; shrinking them toward 0 only fights the optimiser.
  - the token embeddings: a row is updated only when its token occurs, but decayed at every step, so rare tokens
    would be pulled toward zero between their occurrences (decay_embeddings=True restores the plain rule).
  - the router (mlp.gate): decay shrinks its logits and so flattens every softmax toward uniform affinities,
    blurring specialisation; the balance losses are what regulates routing (decay_router=True to change).

Schedules give the learning rate for 0-based optimizer step `step` of `total`:
  step:     linear warm-up from 0, then x decay_factor (0.316) at each of decay_points (0.6, 0.9) x total
            -- the paper's warmup-and-step-decay, by steps (= tokens at a fixed batch size)
  cosine:   linear warm-up, then cosine from lr to lr * min_lr_ratio at the last step
  constant: linear warm-up, then flat
"""
from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("step", "cosine", "constant")


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False,
                 decay_router: bool = False) -> list[dict]:
    decay, no_decay = [], []
    embed = model.model.embed_tokens.weight
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = (p.ndim < 2 or name.endswith(".bias")
                or (p is embed and not decay_embeddings)
                or (name.endswith("mlp.gate.weight") and not decay_router))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8,
                    decay_embeddings: bool = False, decay_router: bool = False) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay, decay_embeddings, decay_router)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def lr_at(step: int, total: int, lr: float, warmup: int, schedule: str = "step",
          decay_points: tuple[float, ...] = (0.6, 0.9), decay_factor: float = 0.316,
          min_lr_ratio: float = 0.1) -> float:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "step":
        return lr * decay_factor ** sum(step >= round(p * total) for p in decay_points)
    if schedule == "cosine":
        progress = min((step - warmup) / max(total - 1 - warmup, 1), 1.0)
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return lr
