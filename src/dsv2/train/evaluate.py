"""Held-out evaluation: mean next-token loss and bits per UTF-8 byte over a prepared split.

bits per byte = total nats over every predicted token / ln 2 / UTF-8 bytes of the split's documents. Unlike
per-token loss it does not depend on the tokenizer, so models with different vocabularies compare fairly.
"""
from __future__ import annotations

import math

import torch

from .data import TokenShards, eval_windows


@torch.no_grad()
def evaluate(model, shards: TokenShards, seq_len: int, batch_size: int = 8, limit: int | None = None,
             bf16: bool = False, progress=None, world=None) -> dict:
    """Eval mode (no token dropping), windows of seq_len. limit=None covers the whole split and adds bits per
    byte; a limit evaluates that many windows spread over the split (the periodic validation loss).
    With a data-parallel `world` (collective): batch i is rank i mod N's, and the sums are added up over ranks."""
    was_training = model.training
    model.eval()
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    device = world.device if world is not None else next(model.parameters()).device
    nats, tokens, batches = 0.0, 0, 0
    pending: list = []

    def summed_loss(x, y):  # lm_head and the loss fused (the [B, T, V] logits are never held whole)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(x, targets=y, target_weights=torch.ones(y.shape, device=y.device))

    def run(batch):
        nonlocal nats, tokens, batches
        batches += 1
        if (batches - 1) % size != rank:
            return
        x = torch.stack([torch.from_numpy(w[0]) for w in batch]).to(device)  # [B, T]
        y = torch.stack([torch.from_numpy(w[1]) for w in batch]).to(device)
        nats += float(summed_loss(x, y))
        tokens += y.numel()
        if progress is not None:
            progress.update(y.numel() * size)

    for window in eval_windows(shards, seq_len, limit):
        if pending and len(window[0]) != len(pending[0][0]):  # a shard's short last window: its own batch
            run(pending)
            pending = []
        pending.append(window)
        if len(pending) == batch_size:
            run(pending)
            pending = []
    if pending:
        run(pending)
    if world is not None:
        # a sharded model's forward is collective: a rank with fewer batches runs empty ones as the others finish
        for _ in range(-(-batches // size) - len(range(rank, batches, size))):
            empty = torch.zeros(1, 1, dtype=torch.long, device=device)
            summed_loss(empty, empty)
        nats, tokens = world.all_reduce_sum(torch.tensor([nats, tokens], dtype=torch.float64)).tolist()
        tokens = int(tokens)
    model.train(was_training)
    out = {"loss": nats / max(tokens, 1), "tokens": tokens}
    if limit is None:
        out.update(nats=nats, bytes=shards.bytes, bits_per_byte=nats / math.log(2) / max(shards.bytes, 1))
    return out
