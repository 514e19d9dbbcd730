"""One completion being generated: its tokens, its place in the latent cache and its timing."""
from __future__ import annotations

import enum
import itertools
import time

import torch

from .sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """One of the n completions of a request.

    seq_id comes from a global counter, so it orders sequences by arrival: the scheduler serves the smallest first
    and preempts the largest. num_computed_tokens counts the leading token_ids whose latents are in the cache; the
    last token of a running sequence is never computed yet (its latent is written by the step that samples the
    next token).
    """

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                 request_id: str | None = None, index: int = 0, generator: torch.Generator | None = None):
        if not prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.seq_id = next(_seq_ids)
        self.request_id = str(self.seq_id) if request_id is None else request_id
        self.index = index
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params if params is not None else SamplingParams()
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # hash chain over the full blocks of token_ids (kv_cache.py)
        self.num_committed_blocks = 0  # leading blocks of block_table the allocator has already registered
        self.num_cached_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.generator = generator

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def token_range(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole prompt + output list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    def append_token(self, token_id: int) -> None:
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        self.output_token_ids.append(int(token_id))

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, {self.status.name}, "
                f"tokens={self.num_prompt_tokens}+{self.num_output_tokens}, computed={self.num_computed_tokens})")
