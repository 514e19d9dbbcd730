"""Next-token sampling for a batch of sequences, each with its own SamplingParams. Device-agnostic torch.

Order (vLLM's): repetition penalty (HF: prompt + output tokens), presence / frequency penalties (OpenAI: output
tokens), min_tokens / ignore_eos masks, then greedy argmax or temperature -> top_k -> top_p -> min_p -> sample.
Sampling is an exponential race, argmax(p / E) with E ~ Exp(1) per token, which draws exactly from p; a row with
its own seeded generator draws its E from that generator, so its token does not depend on the rest of the batch.
Logprobs come from the raw logits, before any of this, which is what eval harnesses and the OpenAI API expect.

Shape legend: B rows (one per sequence), V vocab, R rows that need a given feature, L padded token-list length.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .sequence import Sequence


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int  # 1 = most likely under the raw logits
    top: list[tuple[int, float]]  # the top-N (token_id, logprob), most likely first; may include token_id


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # per row; None where params.logprobs is None


def make_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A reproducible random stream for completion `index` of a request seeded with `seed`."""
    mixed = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(mixed[:8], "little") >> 1)


class Sampler:
    """Picks one token per row. eos_token_ids are masked while min_tokens is not reached, and always for
    ignore_eos. seed makes the shared stream (rows without their own generator) reproducible."""

    def __init__(self, eos_token_ids: list[int] | int | None = None, seed: int | None = None):
        self.eos_token_ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids or [])
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None  # torch's global RNG
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """One token per row of logits [B, V] (any float dtype), for seqs[row]."""
        B, V = logits.shape
        assert B == len(seqs), f"{B} rows of logits for {len(seqs)} sequences"
        params = [s.params for s in seqs]
        x = self.apply_penalties(logits, seqs)
        tokens = x.argmax(-1)  # [B] the greedy choice; top-k/p and min-p never remove the argmax
        if not all(p.greedy for p in params):
            probs = self.filtered_probs(x, seqs)
            # Exp(1) noise as -log(U), U in [0, 1): ~3x faster than exponential_ on CPU. The clamp keeps a U of
            # exactly 1 (float rounding) from making 0 / 0 = NaN, which would win the argmax.
            noise = torch.empty_like(probs)  # [B, V]
            own = [i for i, s in enumerate(seqs) if s.generator is not None and not s.params.greedy]
            gen = self._shared_generator(x.device)
            if not own:
                noise.uniform_(generator=gen)
            elif len(own) < B:
                shared = [i for i in range(B) if i not in set(own)]
                noise[shared] = torch.rand(len(shared), V, device=x.device, generator=gen)
            for i in own:
                g = seqs[i].generator
                noise[i] = torch.rand(V, device=g.device, generator=g).to(noise.device)
            sampled = (probs / noise.log_().neg_().clamp_(min=torch.finfo(torch.float32).tiny)).argmax(-1)
            greedy = torch.tensor([p.greedy for p in params], device=x.device)
            tokens = torch.where(greedy, tokens, sampled)

        logprobs: list[TokenLogprobs | None] = [None] * B
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if rows:
            found = token_logprobs(logits[rows], tokens[rows], max(params[i].logprobs for i in rows))
            for i, lp in zip(rows, found):
                lp.top = lp.top[:params[i].logprobs]
                logprobs[i] = lp
        return SamplerOutput(tokens.tolist(), logprobs)

    def apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Penalties and min_tokens / ignore_eos masks on a float32 copy of logits [B, V]."""
        B, V = logits.shape
        params = [s.params for s in seqs]
        device = logits.device
        x = logits.to(torch.float32, copy=True)  # [B, V] changed in place from here on

        # Both penalties touch only the tokens a row has seen: gather them, change them, put them back. [R, L] work
        # instead of [R, V]. Padding repeats a real token of the row, so its (identical) write is harmless.
        rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if rows:
            ids = _padded([seqs[i].token_ids for i in rows], -1, device)  # [R, L]
            ids = torch.where(ids < 0, ids[:, :1], ids)  # a prompt is never empty
            r = torch.tensor(rows, device=device)[:, None]
            pen = torch.tensor([params[i].repetition_penalty for i in rows], device=device)[:, None]
            seen = x[r, ids]
            x[r, ids] = torch.where(seen > 0, seen / pen, seen * pen)

        rows = [i for i, p in enumerate(params) if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
        if rows:
            ids = _padded([seqs[i].output_token_ids for i in rows], V, device)  # [R, L], padded with V
            counts = torch.zeros(len(rows), V + 1, device=device)
            counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))  # [R, V + 1]
            ids = ids.clamp(max=V - 1)  # padding now names token V-1 with its true count: a no-op write if unseen
            count = counts.gather(1, ids)  # [R, L]
            r = torch.tensor(rows, device=device)[:, None]
            freq = torch.tensor([params[i].frequency_penalty for i in rows], device=device)[:, None]
            pres = torch.tensor([params[i].presence_penalty for i in rows], device=device)[:, None]
            x[r, ids] = x[r, ids] - freq * count - pres * (count > 0)

        banned = []  # (row, token)
        for i, (s, p) in enumerate(zip(seqs, params)):
            if s.num_output_tokens < p.min_tokens:
                banned += [(i, t) for t in (*self.eos_token_ids, *p.stop_token_ids) if t < V]
            elif p.ignore_eos:
                banned += [(i, t) for t in self.eos_token_ids if t < V]
        if banned:
            r, t = torch.tensor(banned, device=device).T
            x[r, t] = float("-inf")
        return x

    def filtered_probs(self, x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Temperature, top-k, top-p and min-p on penalised logits x [B, V] (changed in place): the distribution
        each row samples from [B, V]. Greedy rows come out untempered; the caller takes their argmax instead."""
        B, V = x.shape
        params = [s.params for s in seqs]
        device = x.device
        x /= torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device)[:, None]

        top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
        top_p = [p.top_p for p in params]
        if any(p < 1.0 for p in top_p):
            # top-p needs the sorted distribution, and top-k is then a cut by position. When every row has a top_k,
            # only the k_max best can survive, so a partial topk replaces sorting the whole vocabulary.
            k_max = max(top_k)
            sorted_x, order = x.topk(k_max, dim=-1) if k_max < V else x.sort(dim=-1, descending=True)  # [B, K]
            pos = torch.arange(sorted_x.shape[1], device=device)
            sorted_x.masked_fill_(pos >= torch.tensor(top_k, device=device)[:, None], float("-inf"))
            probs = sorted_x.softmax(-1)
            mass_before = probs.cumsum(-1) - probs  # keep the smallest prefix whose mass reaches top_p
            sorted_x.masked_fill_(mass_before > torch.tensor(top_p, device=device)[:, None], float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter_(1, order, sorted_x)
        elif any(k < V for k in top_k):
            # Without top-p a partial topk is enough: far cheaper than sorting the vocabulary.
            k_max = max(k for k in top_k if k < V)
            k = torch.tensor(top_k, device=device)[:, None]  # [B, 1]
            kth = x.topk(k_max, dim=-1).values.gather(1, k.clamp(max=k_max) - 1)  # [B, 1]
            kth[k >= V] = float("-inf")
            x.masked_fill_(x < kth, float("-inf"))  # ties with the k-th value stay, as in HF

        probs = x.softmax(-1)  # [B, V]
        min_p = torch.tensor([p.min_p for p in params], device=device)
        if bool((min_p > 0).any()):
            probs.masked_fill_(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, 0.0)
        return probs


def prompt_logprobs(logits: torch.Tensor, token_ids: list[int], top_n: int,
                    start: int = 0) -> list[TokenLogprobs | None]:
    """Logprobs of the prompt token_ids. logits [T, V] are the model's outputs at positions start .. start+T-1;
    row t scores token start+t+1. Returns one entry per scored prompt position, with a leading None for
    position 0 when start == 0, so the lists of consecutive prefill chunks concatenate into one per-position list.
    The last row of the last chunk scores the first generated token and is ignored here."""
    T = min(logits.shape[0], len(token_ids) - 1 - start)
    out: list[TokenLogprobs | None] = [None] if start == 0 else []
    if T > 0:
        out += token_logprobs(logits[:T], token_ids[start + 1:start + 1 + T], top_n)
    return out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor | list[int], top_n: int) -> list[TokenLogprobs]:
    """Logprob, rank and top-N alternatives of tokens[i] under the raw logits[i] [R, V], row by row."""
    tokens = torch.as_tensor(tokens, dtype=torch.long, device=logits.device)
    lp = logits.float().log_softmax(-1)  # [R, V]
    chosen = lp.gather(1, tokens[:, None])  # [R, 1]
    ranks = (lp > chosen).sum(-1) + 1
    top_lp, top_ids = lp.topk(top_n, dim=-1) if top_n > 0 else (lp[:, :0], tokens[:, None][:, :0])
    return [TokenLogprobs(t, c, r, list(zip(ids, vals)))
            for t, c, r, ids, vals in zip(tokens.tolist(), chosen[:, 0].tolist(), ranks.tolist(),
                                          top_ids.tolist(), top_lp.tolist())]


def _padded(lists: list[list[int]], pad: int, device) -> torch.Tensor:
    L = max(1, max(map(len, lists)))
    return torch.tensor([ids + [pad] * (L - len(ids)) for ids in lists], dtype=torch.long, device=device)  # [R, L]
