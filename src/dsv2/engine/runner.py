"""The model runner: a scheduled batch -> StepInputs (plain data) -> flat tensors + paged-attention metadata ->
model -> logits. The only engine file that touches the device. prepare and execute are apart so that rank 0 of a
tensor-parallel group can send each step's StepInputs to the other ranks, which run execute alongside it
(engine/workers.py).

Shape legend: N flat tokens of the step, S sequences, L_s context length of sequence s, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import PagedAttention, Transformer
from ..model.mla import DecodeGroup, Fp8Latent
from .kv_cache import allocate_kv_cache, cache_row
from .scheduler import ScheduledSeq


DECODE_BUCKET = 64  # decode contexts are padded to a multiple of this (see model.mla.DecodeGroup)


@dataclass
class StepInputs:
    """One step's model inputs as plain data (picklable, no tensors): N flat tokens, then per sequence s where its
    chunk starts, how many tokens it computes and the blocks holding its context."""
    token_ids: list[int]  # [N]
    starts: list[int]  # [S] first position computed this step
    num_new: list[int]  # [S] tokens computed this step
    block_tables: list[list[int]]  # [S] blocks of positions 0 .. start + num_new - 1
    num_decode: int  # the first num_decode sequences decode one token each (absorbed attention)
    logits_indices: list[int]  # flat rows whose logits are computed
    sample_rows: list[int]  # rows of those logits that sample a next token, in batch order
    prompt_rows: dict[int, tuple[int, int]]  # seq_id -> (first row, n): every position's logits (prompt_logprobs)


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
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, cache_dtype: torch.dtype,
                 kv_cache_dtype: str = "auto"):
        self.model = model
        self.config = model.config
        self.device = model.model.embed_tokens.weight.device
        self.block_size = block_size
        self.fp8 = Fp8Latent.for_config(self.config) if kv_cache_dtype == "fp8" else None
        width, dtype = cache_row(self.config, cache_dtype, kv_cache_dtype)
        self.kv_caches = allocate_kv_cache(self.config.num_hidden_layers, num_blocks, block_size, width, dtype,
                                           self.device)
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

    def prepare(self, batch: list[ScheduledSeq]) -> StepInputs:
        """The step's work as plain data (`batch` lists decode sequences, one new token each, first, then prefill
        chunks): what rank 0 of a tensor-parallel group sends every other rank."""
        tokens, starts, counts, tables = [], [], [], []
        want, sample_rows, prompt_rows = [], [], {}  # flat rows whose logits are needed, and who needs them
        num_decode, start = 0, 0
        for item in batch:
            seq, n, begin = item.seq, item.num_new_tokens, item.start
            tokens.extend(seq.token_range(begin, begin + n))
            starts.append(begin)
            counts.append(n)
            tables.append(seq.block_table[:-(-(begin + n) // self.block_size)])
            if n == 1 and num_decode == len(counts) - 1:
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
        return StepInputs(tokens, starts, counts, tables, num_decode, want, sample_rows, prompt_rows)

    @torch.inference_mode()
    def execute(self, step: StepInputs) -> StepLogits:
        """Run the model on one step's inputs: the latents go into the cache, the wanted rows' logits come out."""
        positions, slot_mapping, seq_slots, ranges = [], [], [], []
        first = 0
        for begin, n, table in zip(step.starts, step.num_new, step.block_tables):
            slots = self._context_slots(table, begin + n)  # [L_s]
            positions.append(torch.arange(begin, begin + n))
            slot_mapping.append(slots[begin:])
            seq_slots.append(slots)
            ranges.append((first, first + n))
            first += n
        dev = self.device
        attn = PagedAttention(
            kv_caches=self.kv_caches, slot_mapping=torch.cat(slot_mapping).to(dev),
            seq_slots=[s.to(dev) for s in seq_slots], query_ranges=ranges, num_decode=step.num_decode,
            decode_groups=self._decode_groups(seq_slots[:step.num_decode]), fp8=self.fp8)
        logits = self.model(torch.tensor(step.token_ids, device=dev), torch.cat(positions).to(dev), attn=attn,
                            logits_indices=torch.tensor(step.logits_indices, dtype=torch.long, device=dev))
        # logits: [len(logits_indices), V]
        prompt = {sid: logits[a:a + n] for sid, (a, n) in step.prompt_rows.items()}
        return StepLogits(sample=logits[step.sample_rows], prompt=prompt)

    def run(self, batch: list[ScheduledSeq]) -> StepLogits:
        return self.execute(self.prepare(batch))

    def forced_logits(self, prompts: list[list[int]], forced: list[list[int]]) -> list[torch.Tensor]:
        """Teacher forcing through the cache, for accuracy measurements (tests/test_fp8_cache.py,
        benchmarks/fp8_cache.py): each prompt is prefilled in one chunk, then the forced tokens (as many for every
        sequence) are decoded one per step, all sequences in one batch, as generation runs them. Returns per
        sequence the logits [1 + F, V] that follow the prompt and each forced token. Writes blocks 0.. of this
        runner's cache: not for a runner an engine is scheduling on."""
        bs, F = self.block_size, len(forced[0])
        if any(len(f) != F for f in forced):
            raise ValueError("forced_logits needs the same number of forced tokens for every sequence")
        tables, first = [], 0
        for p in prompts:
            n = -(-(len(p) + F) // bs)
            tables.append(list(range(first, first + n)))
            first += n
        if first > self.kv_caches[0].shape[0]:
            raise ValueError(f"forced_logits needs {first} cache blocks; this runner has {self.kv_caches[0].shape[0]}")
        out = [[self.execute(StepInputs(p, [0], [len(p)], [t], 0, [len(p) - 1], [0], {})).sample]
               for p, t in zip(prompts, tables)]
        S = len(prompts)
        for i in range(F):
            step = StepInputs([f[i] for f in forced], [len(p) + i for p in prompts], [1] * S, tables, S,
                              list(range(S)), list(range(S)), {})
            logits = self.execute(step).sample  # [S, V]
            for s in range(S):
                out[s].append(logits[s:s + 1])
        return [torch.cat(o) for o in out]
