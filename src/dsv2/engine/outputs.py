"""What the engine hands back, shaped like vLLM's RequestOutput / CompletionOutput so client code ports as is."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None


# one position: token id -> Logprob, holding the chosen token and the top-N alternatives
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # what changed since the previous step (streaming)
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)  # arrival / first token / finish times (time.monotonic)

    # the single-completion shortcut: output.text, output.token_ids, output.finish_reason
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


def position_logprobs(token_id: int, logprob: float, rank: int, top: list[tuple[int, float]],
                      decode=None) -> PositionLogprobs:
    """One position -> {token_id: Logprob}: the chosen token first, then the top-N alternatives (rank 1, 2, ...).
    decode(token_id) -> str fills decoded_token when a tokenizer is at hand."""
    text = (lambda t: decode([t])) if decode is not None else (lambda t: None)
    out = {token_id: Logprob(logprob, rank, text(token_id))}
    for r, (tid, val) in enumerate(top, start=1):
        out.setdefault(tid, Logprob(val, r, text(tid)))
    return out
