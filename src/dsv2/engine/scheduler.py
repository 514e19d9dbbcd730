"""Continuous batching: which sequences run in the next step, and how many of their tokens. Pure Python.

Each step spends a token budget: running sequences first (decodes, then the next chunk of unfinished prefills),
then waiting ones in arrival order (the first chunk of their prompt). When the cache runs out of blocks the
latest-arrived running sequence is preempted by recompute: its blocks are freed and it waits at the front of the
queue to prefill prompt + outputs again -- cheap when its blocks are still in the prefix cache.

Call order per step (the LLM layer drives it):
    out = scheduler.schedule()
    runner computes latents for every ScheduledSeq, and logits where .sample is True; the sampler picks tokens
    seq.append_token(t) for each sampled row
    scheduler.postprocess(out)          # num_computed_tokens += num_new_tokens; full blocks enter the prefix cache
    scheduler.finish(seq, reason)       # for sequences that hit a stop / max_tokens / max_model_len
Appending may come before or after postprocess, but must come before the next schedule(). Finish after
postprocess, so the finished sequence's last full blocks still reach the prefix cache.
"""
from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass, field

from .kv_cache import BlockAllocator
from .sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256  # running sequences at most
    max_num_batched_tokens: int = 2048  # token budget per step: prefill chunks + decode tokens
    max_model_len: int = 163840  # the published V2 checkpoints' max_position_embeddings; the LLM layer sets it

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # compute token_ids[start : start + num_new_tokens]
    start: int = field(init=False)  # seq.num_computed_tokens when scheduled
    sample: bool = field(init=False)  # the chunk reaches the end of token_ids: sample the next token from its last row

    def __post_init__(self):
        # Frozen at scheduling time: the LLM layer appends the sampled token before postprocess().
        self.start = self.seq.num_computed_tokens
        self.sample = self.start + self.num_new_tokens == self.seq.num_tokens

    @property
    def is_decode(self) -> bool:
        return self.num_new_tokens == 1 and self.sample


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]  # decodes (is_decode) first, then prefill chunks
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)  # can never fit in the cache; finished with "abort"

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_decode(self) -> int:
        return sum(s.is_decode for s in self.scheduled)


class Scheduler:
    """FCFS continuous batching with chunked prefill and preemption by recompute."""

    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator):
        self.config = config
        self.allocator = allocator
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # sorted by seq_id (arrival)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def add(self, seq: Sequence) -> None:
        assert seq.num_tokens <= self.config.max_model_len, f"{seq} is longer than max_model_len"
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work. Every running or admitted sequence gets blocks for all the tokens it computes."""
        out = SchedulerOutput(scheduled=[])
        budget = self.config.max_num_batched_tokens
        assert all(s.num_computed_tokens < s.num_tokens for s in self.running), \
            "a running sequence has no token to compute: append the sampled token (or finish it) before schedule()"
        decodes = [s for s in self.running if s.num_computed_tokens == s.num_tokens - 1]
        prefills = [s for s in self.running if s.num_computed_tokens < s.num_tokens - 1]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.allocator.allocate(seq, seq.num_computed_tokens + num_new):
                victim = self.running[-1]  # latest arrival; may be seq itself
                budget += self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new

        # Admit in strict arrival order; none after a preemption, since memory just proved short.
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self.allocator.blocks_needed(seq.num_tokens) > self.allocator.num_blocks:
                self.finish(seq, "abort")
                out.failed.append(seq)
                continue
            start = len(self.allocator.match_prefix(seq)) * self.allocator.block_size
            num_new = min(seq.num_tokens - start, budget)
            if not self.allocator.allocate(seq, start + num_new):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.seq_id)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

        out.scheduled.sort(key=lambda s: not s.is_decode)  # stable: FCFS within each group
        return out

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> int:
        """Free seq for recompute; returns the budget it gave back if it was already scheduled this step."""
        self.allocator.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)  # victims are taken newest first, so the front stays in arrival order
        out.preempted.append(seq)
        for i, s in enumerate(out.scheduled):
            if s.seq is seq:
                del out.scheduled[i]
                return s.num_new_tokens
        return 0

    def postprocess(self, out: SchedulerOutput) -> None:
        """After the step ran (and sampled tokens were appended): advance the computed counts, cache full blocks."""
        for s in out.scheduled:
            if s.seq.status != SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            s.seq.num_computed_tokens = s.start + s.num_new_tokens
            self.allocator.commit(s.seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.is_finished:
            return
        self.allocator.free(seq)
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every sequence of the request, running or waiting; their blocks are free at once."""
        seqs = [s for s in (*self.running, *self.waiting) if s.request_id == request_id]
        for seq in seqs:
            self.finish(seq, "abort")
        return seqs
