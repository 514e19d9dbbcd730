"""The model runner: a scheduled batch -> flat tensors + paged-attention metadata -> model -> logits.
The only engine file that touches the device.

Shape legend: N flat tokens of the step, S sequences, L_s context length of sequence s, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import PagedAttention, Transformer
from ..model.mla import DecodeGroup
from .kv_cache import allocate_kv_cache
from .scheduler import ScheduledSeq


DECODE_BUCKET = 64  # decode contexts are padded to a multiple of this (see model.mla.DecodeGroup)


@dataclass
class StepLogits:
    sample: torch.Tensor  # [S', V] fp32: next-token logits of the sequences that sample this step, in batch order
    prompt: dict[int, torch.Tensor]  # seq_id -> [n, V] logits at every position of the chunk (prompt_logprobs)


def measure_activation_bytes(model: Transformer, num_tokens: int) -> int | None:
    """Peak memory one forward of num_tokens tokens takes beyond the weights, measured on CUDA by running it (the
    profile run that sizes the latent cache from what is left); None on devices that cannot measure it."""
    device = model.model.embed_tokens.weight.device
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        model(torch.zeros(1, num_tokens, dtype=torch.long, device=device))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return int(peak)


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, cache_dtype: torch.dtype):
        self.model = model
        self.config = model.config
        self.device = model.model.embed_tokens.weight.device
        self.block_size = block_size
        self.kv_caches = allocate_kv_cache(self.config.num_hidden_layers, num_blocks, block_size,
                                           self.config.latent_dim, cache_dtype, self.device)
        self._offsets = torch.arange(block_size)

    def _context_slots(self, block_table: list[int], length: int) -> torch.Tensor:
        """Cache slots of positions 0..length-1: block_table[p // bs] * bs + p % bs."""
        n_blocks = -(-length // self.block_size)
        blocks = torch.tensor(block_table[:n_blocks], dtype=torch.long)
        return (blocks[:, None] * self.block_size + self._offsets).flatten()[:length]

    def _decode_groups(self, contexts: list[torch.Tensor]) -> list[DecodeGroup]:
        """Batch decode sequences by their context length rounded up to DECODE_BUCKET."""
        by_length: dict[int, list[int]] = {}
        for i, slots in enumerate(contexts):
            by_length.setdefault(-(-slots.numel() // DECODE_BUCKET) * DECODE_BUCKET, []).append(i)
        groups = []
        for Lb, rows in sorted(by_length.items()):
            slots = torch.cat([F.pad(contexts[i], (0, Lb - contexts[i].numel()), value=int(contexts[i][0]))
                               for i in rows])  # pad with a real slot; its scores are masked out
            pad = torch.arange(Lb) >= torch.tensor([contexts[i].numel() for i in rows])[:, None]  # [G, Lb]
            groups.append(DecodeGroup(rows=torch.tensor(rows, device=self.device), slots=slots.to(self.device),
                                      pad=pad.to(self.device), length=Lb))
        return groups

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> StepLogits:
        """`batch` lists decode sequences (one new token each) first, then prefill chunks."""
        tokens, positions, slot_mapping, seq_slots, ranges = [], [], [], [], []
        want, sample_rows, prompt_rows = [], [], {}  # flat rows whose logits are needed, and who needs them
        num_decode, start = 0, 0
        for item in batch:
            seq, n = item.seq, item.num_new_tokens
            begin = item.start
            slots = self._context_slots(seq.block_table, begin + n)  # [L_s]
            tokens.extend(seq.token_range(begin, begin + n))
            positions.append(torch.arange(begin, begin + n))
            slot_mapping.append(slots[begin:])
            seq_slots.append(slots)
            ranges.append((start, start + n))
            if n == 1 and num_decode == len(ranges) - 1:
                num_decode += 1  # the leading single-token sequences attend in the absorbed form
            if seq.params.prompt_logprobs is not None and begin < seq.num_prompt_tokens:
                prompt_rows[seq.seq_id] = (len(want), n)
                want.extend(range(start, start + n))
                if item.sample:
                    sample_rows.append(len(want) - 1)
            elif item.sample:
                sample_rows.append(len(want))
                want.append(start + n - 1)
            start += n
        dev = self.device
        attn = PagedAttention(
            kv_caches=self.kv_caches, slot_mapping=torch.cat(slot_mapping).to(dev),
            seq_slots=[s.to(dev) for s in seq_slots], query_ranges=ranges, num_decode=num_decode,
            decode_groups=self._decode_groups(seq_slots[:num_decode]))
        logits = self.model(torch.tensor(tokens, device=dev), torch.cat(positions).to(dev), attn=attn,
                            logits_indices=torch.tensor(want, dtype=torch.long, device=dev))  # [len(want), V]
        prompt = {sid: logits[first:first + n] for sid, (first, n) in prompt_rows.items()}
        return StepLogits(sample=logits[sample_rows], prompt=prompt)
