"""The model runner: a scheduled batch -> flat tensors + paged-attention metadata -> model -> logits.
The only engine file that touches the device.

Shape legend: N flat tokens of the step, S sequences, L_s context length of sequence s, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import PagedAttention, Transformer
from .kv_cache import allocate_kv_cache
from .scheduler import ScheduledSeq


@dataclass
class StepLogits:
    sample: torch.Tensor  # [S', V] fp32: next-token logits of the sequences that sample this step, in batch order
    prompt: dict[int, torch.Tensor]  # seq_id -> [n, V] logits at every position of the chunk (prompt_logprobs)


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int):
        self.model = model
        self.config = model.config
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.block_size = block_size
        self.kv_caches = allocate_kv_cache(self.config.num_hidden_layers, num_blocks, block_size,
                                           self.config.latent_dim, self.dtype, self.device)
        self._offsets = torch.arange(block_size)

    def _context_slots(self, block_table: list[int], length: int) -> torch.Tensor:
        """Cache slots of positions 0..length-1: block_table[p // bs] * bs + p % bs."""
        n_blocks = -(-length // self.block_size)
        blocks = torch.tensor(block_table[:n_blocks], dtype=torch.long)
        return (blocks[:, None] * self.block_size + self._offsets).flatten()[:length]

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
            decode_slots=torch.cat(seq_slots[:num_decode]).to(dev) if num_decode else None)
        logits = self.model(torch.tensor(tokens, device=dev), torch.cat(positions).to(dev), attn=attn,
                            logits_indices=torch.tensor(want, dtype=torch.long, device=dev))  # [len(want), V]
        prompt = {sid: logits[first:first + n] for sid, (first, n) in prompt_rows.items()}
        return StepLogits(sample=logits[sample_rows], prompt=prompt)
