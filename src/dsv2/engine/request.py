"""Per-request state inside the engine: the n completions of a request, their text (incremental detokenization,
stop strings, what was already streamed), logprobs and timing."""
from __future__ import annotations

import time

from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams
from .sequence import Sequence


class Completion:
    """Text state of one sequence: incremental detokenization, stop strings, what was already streamed."""

    def __init__(self, seq: Sequence, tokenizer: Tokenizer | None):
        self.seq = seq
        p = seq.params
        self.detok = (IncrementalDetokenizer(tokenizer, seq.prompt_token_ids, p.skip_special_tokens)
                      if tokenizer is not None else None)
        self.text = ""  # the output text so far (stop strings cut off)
        self.sent_text = 0  # chars of text already handed out as deltas
        self.sent_tokens = 0
        self.logprobs = [] if p.logprobs is not None else None
        self.cumulative_logprob = 0.0 if p.logprobs is not None else None
        self.max_stop = max((len(s) for s in p.stop), default=0)
        # every proper prefix of a stop string, for holdback(): one set lookup per candidate length
        self.stop_prefixes = {s[:k] for s in p.stop for k in range(1, len(s))}

    def add_text(self, token_id: int, match_stop: bool = True) -> str | None:
        """Detokenize one new token; returns the stop string if one now ends in the new text (then the text is cut
        there). match_stop=False (before min_tokens, as vLLM) only appends: a stop string that lies entirely in
        text produced before min_tokens never ends a sequence later; one that ends in later text does."""
        if self.detok is None:
            return None
        old = len(self.text)
        self.text += self.detok.add(token_id)
        if not match_stop or len(self.text) == old or not self.seq.params.stop:
            return None
        # occurrences that end in the new text: start at or after old - len(s) + 1
        hits = [(i, s) for s in self.seq.params.stop if (i := self.text.find(s, max(0, old - len(s) + 1))) >= 0]
        if not hits:
            return None
        i, s = min(hits)
        self.text = self.text[:i + (len(s) if self.seq.params.include_stop_str_in_output else 0)]
        return s

    def finish_text(self) -> None:
        """Flush bytes the detokenizer held back (a sequence that ended mid-character)."""
        if self.detok is not None:
            self.text += self.detok.flush()

    def holdback(self) -> int:
        """Chars at the end of the text that could be the start of a stop string: not streamed yet."""
        if self.seq.is_finished or not self.max_stop:
            return 0
        for k in range(min(self.max_stop - 1, len(self.text)), 0, -1):
            if self.text[-k:] in self.stop_prefixes:
                return k
        return 0

    def output(self) -> CompletionOutput:
        seq = self.seq
        visible = len(self.text) - self.holdback()
        delta_text = self.text[self.sent_text:visible] if visible > self.sent_text else ""
        self.sent_text = max(self.sent_text, visible)
        delta_tokens = seq.output_token_ids[self.sent_tokens:]
        self.sent_tokens = seq.num_output_tokens
        return CompletionOutput(index=seq.index, text=self.text[:self.sent_text], token_ids=list(seq.output_token_ids),
                                cumulative_logprob=self.cumulative_logprob, logprobs=self.logprobs,
                                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                                delta_text=delta_text, delta_token_ids=list(delta_tokens))


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 completions: list[Completion]):
        self.request_id, self.prompt, self.prompt_token_ids, self.params = request_id, prompt, prompt_token_ids, params
        self.completions = completions
        self.prompt_logprobs = [] if params.prompt_logprobs is not None else None
        self.arrival_time = time.monotonic()

    @property
    def finished(self) -> bool:
        return all(c.seq.is_finished for c in self.completions)

    def output(self) -> RequestOutput:
        seqs = [c.seq for c in self.completions]
        firsts = [s.first_token_time for s in seqs if s.first_token_time is not None]
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
            outputs=[c.output() for c in self.completions], finished=self.finished,
            prompt_logprobs=self.prompt_logprobs, num_cached_tokens=seqs[0].num_cached_tokens,
            metrics={"arrival_time": self.arrival_time, "first_token_time": min(firsts) if firsts else None,
                     "last_token_time": max((s.last_token_time or 0) for s in seqs) or None})
