"""The model runner: a scheduled batch -> StepInputs (plain data) -> flat tensors + paged-attention metadata ->
model -> logits. The only engine file that touches the device. prepare and execute are apart so that rank 0 of a
tensor-parallel group can send each step's StepInputs to the other ranks, which run execute alongside it
(engine/workers.py).

On CUDA the step's index tensors are computed on the host with numpy and sent in one pinned copy, and decode
sequences carry block tables (the Triton MLA kernel reads them) instead of gathered slots. With
enforce_eager=False, decode-only steps run through DecodeGraphs: static buffers per batch-size bucket, each
bucket's forward captured once as a CUDA graph and replayed.

Shape legend: N flat tokens of the step, S sequences, L_s context length of sequence s, V vocab, W block-table
width (blocks of the longest context), Bb a batch bucket.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..kernels import cpu_mla
from ..model import PagedAttention, Transformer
from ..model.mla import DecodeGroup, Fp8Latent
from ..model.moe import ExpertGroup, Experts
from .compiled import CompiledDecode, notice, static_decode, unsupported_reason, write_decode_rows
from .kv_cache import allocate_kv_cache, cache_row
from .scheduler import ScheduledSeq


DECODE_BUCKET = 64  # decode contexts are padded to a multiple of this (see model.mla.DecodeGroup)
GRAPH_BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)  # decode batch buckets


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


def graph_unsupported_reason(model: Transformer) -> str | None:
    """Why a decode step of this model cannot run from static buffers (and so not as a CUDA graph); None if it can."""
    if model.config.rope_type == "dynamic":
        return "dynamic NTK rope reads each step's context lengths on the host"
    for m in model.modules():
        if isinstance(m, ExpertGroup) and type(m) is not Experts:
            return f"{type(m).__name__} runs its experts in a host loop; only stacked bf16/fp32 Experts are grouped"
    return None


def context_slots(table: list[int], length: int, block_size: int) -> np.ndarray:
    """Cache slots of positions 0..length-1 (numpy twin of ModelRunner._context_slots)."""
    blocks = np.asarray(table[:-(-length // block_size)], dtype=np.int64)
    return (blocks[:, None] * block_size + np.arange(block_size)).ravel()[:length]


class Staging:
    """Host -> device copies of index arrays through reused pinned buffers (on CUDA): the copy runs asynchronously,
    and a buffer is not refilled before the previous copy has read it. On CPU, a plain view of the array."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pinned: dict[torch.dtype, torch.Tensor] = {}
        self.done = torch.cuda.Event() if device.type == "cuda" else None

    def send(self, values: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """values [n] (int32 or int64) -> a device tensor of their dtype, or copied into `out` (n values, same
        dtype)."""
        host = torch.from_numpy(values)
        if self.done is None:
            return host if out is None else out.copy_(host.view(out.shape))
        self.done.synchronize()
        buf = self.pinned.get(host.dtype)
        if buf is None or buf.numel() < host.numel():
            buf = self.pinned[host.dtype] = torch.empty(max(host.numel(), 2 * (0 if buf is None else buf.numel())),
                                                        dtype=host.dtype, pin_memory=True)
        buf = buf[:host.numel()].copy_(host)
        out = torch.empty_like(buf, device=self.device) if out is None else out
        out.copy_(buf.view(out.shape), non_blocking=True)
        self.done.record()
        return out


class ModelRunner:
    """enforce_eager=False: decode-only steps go through DecodeGraphs (captured as CUDA graphs on CUDA; on CPU the
    same static buffers run eagerly, the twin the tests compare with). It is the engine's (LLM's) call, since every
    rank of a tensor-parallel group would have to capture alike; the runner's default is eager. max_model_len
    bounds the block tables' width (default: the whole cache). compile_decode=True (CPU): decode-only steps run
    the torch.compile'd static decode (engine/compiled.py), or eagerly with a notice where it cannot compile."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, cache_dtype: torch.dtype,
                 kv_cache_dtype: str = "auto", *, enforce_eager: bool = True, max_model_len: int | None = None,
                 max_num_seqs: int = GRAPH_BATCHES[-1], compile_decode: bool = False):
        self.model = model
        self.config = model.config
        self.device = model.model.embed_tokens.weight.device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.fp8 = Fp8Latent.for_config(self.config) if kv_cache_dtype == "fp8" else None
        width, dtype = cache_row(self.config, cache_dtype, kv_cache_dtype)
        reason = None if enforce_eager else graph_unsupported_reason(model)
        if reason is not None:
            print(f"dsv2: decode runs eagerly ({reason})", file=sys.stderr)
        static = not enforce_eager and reason is None
        # a static batch's padding rows write their (unused) latents into one spare block past the allocator's
        self.kv_caches = allocate_kv_cache(self.config.num_hidden_layers, num_blocks + static, block_size, width,
                                           dtype, self.device)
        self._offsets = torch.arange(block_size)
        self.staging = Staging(self.device)
        self.table_width = -(-(max_model_len or num_blocks * block_size) // block_size)  # W
        self.graphs = DecodeGraphs(self, min(max_num_seqs, GRAPH_BATCHES[-1]), capture=self.device.type == "cuda") \
            if static else None
        self._use_decode_kernel: bool | None = None  # see _decode_kernel
        self.compiled = None
        if compile_decode:
            reason = unsupported_reason(model, self.device)
            if reason is None:
                self.compiled = CompiledDecode(self)
            else:
                notice(reason)

    def _decode_kernel(self) -> bool:
        """Whether eager CPU decode attends through kernels/cpu_mla.py's C++ kernel (built at first use; without
        it, or with an FP8 cache, decode sequences are gathered into padded groups and attended by SDPA)."""
        if self._use_decode_kernel is None:
            self._use_decode_kernel = self.fp8 is None and cpu_mla.kernel_for(self.kv_caches[0]) is not None
        return self._use_decode_kernel

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
        if self.compiled is not None and self.compiled.takes(step):
            out = self.compiled.run(step)
            if out is not None:
                return out
            notice(self.compiled.failed)
            self.compiled = None
        if self.graphs is not None and self.graphs.takes(step):
            try:
                return self.graphs.run(step)
            except GraphCaptureError as e:
                print(f"dsv2: CUDA graph capture failed, decode runs eagerly from here on ({e.__cause__})",
                      file=sys.stderr)
                self.graphs = None
        if self.device.type == "cuda":
            return self._execute_staged(step)
        positions, slot_mapping, seq_slots, ranges = [], [], [], []
        first = 0
        for begin, n, table in zip(step.starts, step.num_new, step.block_tables):
            slots = self._context_slots(table, begin + n)  # [L_s]
            positions.append(torch.arange(begin, begin + n))
            slot_mapping.append(slots[begin:])
            seq_slots.append(slots)
            ranges.append((first, first + n))
            first += n
        dev, D = self.device, step.num_decode
        tables = lens = None
        if D and self._decode_kernel():  # the CPU kernel reads each decode context through its block table
            rows = np.zeros((D, max(len(t) for t in step.block_tables[:D])), dtype=np.int32)
            for i, t in enumerate(step.block_tables[:D]):
                rows[i, :len(t)] = t
            tables, lens = torch.from_numpy(rows), torch.from_numpy(np.add(step.starts[:D], 1, dtype=np.int32))
        attn = PagedAttention(
            kv_caches=self.kv_caches, slot_mapping=torch.cat(slot_mapping).to(dev),
            seq_slots=[s.to(dev) for s in seq_slots], query_ranges=ranges, num_decode=D,
            decode_groups=self._decode_groups(seq_slots[:D]) if tables is None else [], fp8=self.fp8,
            block_tables=tables, context_lens=lens)
        logits = self.model(torch.tensor(step.token_ids, device=dev), torch.cat(positions).to(dev), attn=attn,
                            logits_indices=torch.tensor(step.logits_indices, dtype=torch.long, device=dev))
        # logits: [len(logits_indices), V]
        prompt = {sid: logits[a:a + n] for sid, (a, n) in step.prompt_rows.items()}
        return StepLogits(sample=logits[step.sample_rows], prompt=prompt)

    def _execute_staged(self, step: StepInputs) -> StepLogits:
        """execute() with the index tensors built on the host by numpy and sent in one copy (pinned on CUDA), and
        the decode sequences' contexts as block tables for the MLA kernel: no per-sequence tensors or transfers."""
        bs, D = self.block_size, step.num_decode
        lengths = np.add(step.starts, step.num_new)  # [S] context lengths after this step
        ranges = np.cumsum([0] + step.num_new)
        positions = np.concatenate([np.arange(a, b) for a, b in zip(step.starts, lengths)])  # [N]
        contexts = [context_slots(t, n, bs) for t, n in zip(step.block_tables, lengths)]  # [L_s] each
        slot_mapping = np.concatenate([c[a:] for c, a in zip(contexts, step.starts)])  # [N]
        tables = np.zeros((D, max((len(t) for t in step.block_tables[:D]), default=0)), dtype=np.int64)
        for i, t in enumerate(step.block_tables[:D]):
            tables[i, :len(t)] = t
        # decode contexts stay on the host (the block tables stand for them), except for dynamic NTK, which
        # reads each sequence's length off its slots (PagedAttention.token_context_lengths)
        dynamic = self.config.rope_type == "dynamic"
        parts = [step.token_ids, positions, slot_mapping, step.logits_indices, lengths[:D], tables.ravel(),
                 *contexts[0 if dynamic else D:]]
        sizes = [len(p) for p in parts]
        flat = self.staging.send(np.concatenate(parts).astype(np.int64)).split(sizes)
        tokens, positions, slot_mapping, logits_indices, lens, tables_flat, *prefill_slots = flat  # views
        attn = PagedAttention(
            kv_caches=self.kv_caches, slot_mapping=slot_mapping,
            seq_slots=prefill_slots if dynamic else [None] * D + prefill_slots,
            query_ranges=list(zip(ranges[:-1].tolist(), ranges[1:].tolist())), num_decode=D, fp8=self.fp8,
            block_tables=tables_flat.view(D, -1).int() if D else None, context_lens=lens.int() if D else None)
        logits = self.model(tokens, positions, attn=attn, logits_indices=logits_indices)
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


class GraphCaptureError(RuntimeError):
    pass


class DecodeGraphs:
    """Decode-only steps of up to max_batch sequences through static device buffers, the batch padded up to a
    bucket of GRAPH_BATCHES. One int32 buffer holds each row's [token | position | context length | block table];
    the forward derives slots and attention metadata from it on the device, so nothing in it depends on host
    values and each bucket's forward is captured once as a CUDA graph (capture=True) and replayed. Padding rows
    decode token 0 at position 0 into the runner's spare block. capture=False runs the same forward eagerly: the
    CPU twin tests compare with the plain step."""

    def __init__(self, runner: ModelRunner, max_batch: int, capture: bool):
        self.runner, self.capture = runner, capture
        self.buckets = [b for b in GRAPH_BATCHES if b < max_batch] + [max_batch]
        self.spare = runner.num_blocks  # the block past the allocator's
        self.inputs = torch.zeros(max_batch, 3 + runner.table_width, dtype=torch.int32, device=runner.device)
        self.rows = np.zeros(self.inputs.shape, dtype=np.int32)  # host image, copied in one staged transfer
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def takes(self, step: StepInputs) -> bool:
        return (step.num_decode == len(step.starts) <= self.buckets[-1] and not step.prompt_rows
                and all(len(t) <= self.runner.table_width for t in step.block_tables))

    def forward(self, batch: int) -> torch.Tensor:
        """The model on the first `batch` rows of the static inputs -> logits [batch, V]."""
        return static_decode(self.runner, self.inputs[:batch])

    def run(self, step: StepInputs) -> StepLogits:
        S = len(step.starts)
        batch = next(b for b in self.buckets if b >= S)
        self.rows[:batch, :3] = (0, 0, 1)  # padding rows: token 0 at position 0 in the spare block
        self.rows[S:batch, 3] = self.spare
        write_decode_rows(self.rows, step)  # table entries past a context are never read by the kernel
        self.runner.staging.send(self.rows[:batch].ravel(), self.inputs[:batch])
        if not self.capture:
            logits = self.forward(batch)
        else:
            if batch not in self.graphs:
                try:
                    self.graphs[batch] = self._capture(batch)
                except RuntimeError as e:  # an op that syncs or allocates on the host inside the capture
                    raise GraphCaptureError from e
            graph, logits = self.graphs[batch]
            graph.replay()
        logits = logits[step.logits_indices]  # a copy: the graph's output buffer is overwritten next replay
        return StepLogits(sample=logits[step.sample_rows], prompt={})

    def _capture(self, batch: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up (Triton compiles, the grouped-GEMM trial, cuBLAS workspaces) on a side stream, then capture.
        Warm-up and capture rerun this step's forward: the latents they write are the ones it writes."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(batch)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.forward(batch)
        self.pool = graph.pool()  # every bucket's graph shares one memory pool (they never run at once)
        return graph, logits
