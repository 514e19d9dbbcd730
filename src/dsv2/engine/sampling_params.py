"""Per-request sampling settings, with vLLM's names and defaults so client code ports unchanged."""
from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 20  # what the OpenAI API allows for top_logprobs
GENERATION_CONFIG_KNOBS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def with_generation_defaults(defaults: dict, **given) -> dict:
    """The sampling knobs of GENERATION_CONFIG_KNOBS for one request: what the user gave (not None), else the
    model's generation_config.json (`defaults`), else off -- as vLLM does. do_sample false there means greedy."""
    out = {}
    for knob, off in GENERATION_CONFIG_KNOBS.items():
        value = given.get(knob)
        if value is None:
            value = 0.0 if knob == "temperature" and defaults.get("do_sample") is False else defaults.get(knob, off)
        out[knob] = value
    return out


@dataclass
class SamplingParams:
    """How to sample one request. Names, defaults and meanings follow vLLM.

    top_k 0 or -1 means off; max_tokens None means until the context (max_model_len) is full; logprobs N returns
    the sampled token's logprob plus the N most likely alternatives (0 = only the sampled token), taken from the
    raw model logits before penalties and temperature. ignore_eos keeps EOS from being sampled at all.
    """
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else [int(t) for t in self.stop_token_ids]

        def check(ok: bool, field: str, allowed: str):
            if not ok:
                raise ValueError(f"SamplingParams.{field} must be {allowed}, got {getattr(self, field)!r}")

        check(isinstance(self.n, int) and self.n >= 1, "n", "an integer >= 1")
        check(self.temperature >= 0, "temperature", ">= 0 (0 = greedy)")
        check(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "an integer >= 1, or 0 / -1 to disable it")
        check(0 <= self.min_p <= 1, "min_p", "in [0, 1]")
        check(self.repetition_penalty > 0, "repetition_penalty", "> 0 (1 = off)")
        check(-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]")
        check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
              "max_tokens", "an integer >= 1, or None to generate until the context is full")
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "an integer >= 0")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
              f"<= max_tokens ({self.max_tokens})")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "a non-empty string or a list of them")
        check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "a list of token ids >= 0")
        check(self.seed is None or isinstance(self.seed, int), "seed", "an integer or None")
        check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
              "logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]")
        check(self.prompt_logprobs is None
              or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
              "prompt_logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5
