"""Chat data for supervised fine-tuning: JSONL conversations -> token ids + a loss mask -> packed batches.

Each line is {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} (multi-turn), or
{"prompt": ..., "completion": ...} -- strings (one user turn, one assistant reply) or message lists (the prompt's
turns are context only). Conversations are rendered with the model's own chat template, as `LLM.chat` renders a
prompt, and the loss covers the assistant replies only, each with its end-of-sentence token.

The replies are found by rendering prefixes: for assistant turn i, the template applied to messages[:i] with the
generation prompt ("...Assistant:") is the prompt the model will see, and messages[:i + 1] extends it by exactly
the reply (" Paris.<eos>" in DeepSeek's template). Prompt text and reply text are tokenized separately, so the reply
tokens are the ones the model generates after that prompt. A template whose prefixes are not prefixes of the whole
(one that rewrites earlier turns) is refused.

Bad lines -- not JSON, an unknown role, no assistant reply, more tokens than --seq-len -- are skipped and reported
by line number (or, with strict, refused): a label is never truncated.

Batches: with packing, each epoch's conversations (shuffled by (seed, epoch)) are packed best-fit decreasing into
rows of seq_len tokens, rows shuffled again; without, one conversation per row. Row k of the run is a function of
(seed, k), so a resumed run reads the same rows.
"""
from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..kernels.linear_ce import IGNORE  # positions without a target
from ..model.mla import PackedSequences
from ..tokenizer import ROLES, Tokenizer


@dataclass
class Conversation:
    ids: list[int]
    labels: list[bool]  # True at the tokens the loss covers (assistant replies, their eos included)
    line: int


class TemplateError(ValueError):
    """The chat template cannot be used for training (it rewrites earlier turns)."""


def encode_conversation(tok: Tokenizer, messages: list[dict], context_turns: int = 0) -> tuple[list[int], list[bool]]:
    """Token ids and loss mask of one conversation. Assistant turns among the first `context_turns` messages are
    context (no loss); messages after the last assistant reply carry no loss and are left out."""
    ids, labels, done = [], [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < context_turns:
            continue
        prompt = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise TemplateError(
                "the chat template does not render a conversation as its earlier turns plus the new ones "
                f"(messages[:{i}] with the generation prompt is not a prefix of messages[:{i + 1}]), so the assistant "
                "replies cannot be located for the loss mask; use a template that appends turns")
        context = tok.encode(prompt[len(done):], add_special_tokens=False)
        reply = tok.encode(full[len(prompt):], add_special_tokens=False)
        ids += context + reply
        labels += [False] * len(context) + [True] * len(reply)
        done = full
    return ids, labels


@dataclass
class ChatData:
    conversations: list[Conversation]
    problems: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # reason -> (line, detail)
    path: str = ""

    @property
    def skipped(self) -> int:
        return sum(len(v) for v in self.problems.values())

    def report(self, limit: int = 5) -> str:
        """'chats.jsonl: 3 bad lines (not JSON: lines 4, 9; longer than --seq-len 512: line 12 (731 tokens))'."""
        parts = []
        for reason, where in self.problems.items():
            shown = ", ".join(f"{n}" + (f" ({d})" if d else "") for n, d in where[:limit])
            more = f" and {len(where) - limit} more" if len(where) > limit else ""
            parts.append(f"{reason}: line{'s' if len(where) > 1 else ''} {shown}{more}")
        return f"{self.path}: {self.skipped} bad line{'s' if self.skipped != 1 else ''} ({'; '.join(parts)})"


class BadLine(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _messages(record) -> tuple[list[dict], int]:
    """A JSONL record -> (messages, context_turns); BadLine when it is neither accepted shape."""
    if not isinstance(record, dict):
        raise BadLine("not a JSON object")
    if "messages" in record:
        messages, context = record["messages"], 0
    elif "prompt" in record and "completion" in record:
        p, c = record["prompt"], record["completion"]
        if isinstance(p, str) and isinstance(c, str):
            p, c = [{"role": "user", "content": p}], [{"role": "assistant", "content": c}]
        if not isinstance(p, list) or not isinstance(c, list):
            raise BadLine("prompt and completion not both strings or both message lists")
        messages, context = p + c, len(p)
    else:
        raise BadLine('neither "messages" nor "prompt" + "completion"')
    if not isinstance(messages, list) or not messages:
        raise BadLine('"messages" not a non-empty list')
    for m in messages:
        if not isinstance(m, dict):
            raise BadLine("a message not an object")
        if m.get("role") not in ROLES:
            raise BadLine(f"unknown role (not {', '.join(ROLES)})", repr(m.get("role"))[:40])
        if not isinstance(m.get("content"), str):
            raise BadLine("content not a string")
    if not any(m["role"] == "assistant" for m in messages[context:]):
        raise BadLine("no assistant reply to learn")
    return messages, context


def load_chat_jsonl(path: str, tok: Tokenizer, seq_len: int, strict: bool = False) -> ChatData:
    """Read and tokenize every conversation of `path`. Lines that cannot be used are collected in `problems`
    (reason -> line numbers); strict=True raises ValueError listing them instead."""
    data = ChatData([], {}, path)

    def bad(reason: str, line: int, detail: str = "") -> None:
        data.problems.setdefault(reason, []).append((line, detail))

    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                bad("not JSON", n)
                continue
            try:
                messages, context = _messages(record)
            except BadLine as e:
                bad(e.reason, n, e.detail)
                continue
            ids, labels = encode_conversation(tok, messages, context)
            if len(ids) > seq_len:
                bad(f"longer than --seq-len {seq_len}", n, f"{len(ids)} tokens")
                continue
            data.conversations.append(Conversation(ids, labels, n))
    if strict and data.problems:
        raise ValueError(f"{data.report(limit=20)}. Fix or remove these lines (a longer --seq-len takes longer "
                         "conversations), or leave out --strict to skip them")
    if not data.conversations:
        raise ValueError(f"{path}: no usable conversation" + (f" ({data.report()})" if data.problems else
                                                                " (the file is empty)"))
    return data


# ---- rows and batches ----------------------------------------------------------------------------------------
def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of `lengths` grouped into rows whose lengths sum to at most `capacity`, longest
    first, each into the row it fills most tightly (ties keep the given order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - lengths[i], len(rows) - 1))
        else:
            room, r = free.pop(at)
            rows[r].append(i)
            bisect.insort(free, (room - lengths[i], r))
    return rows


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T] next token where the loss applies, else IGNORE
    packed: PackedSequences | None  # None: one conversation per row, right-padded (the plain causal forward)
    tokens: int  # real (non-padding) tokens
    n_targets: int

    def to(self, device) -> Batch:
        packed = None if self.packed is None else PackedSequences(self.packed.segment_ids.to(device))
        return Batch(self.ids.to(device), self.targets.to(device), packed, self.tokens, self.n_targets)


class SftBatches:
    """Rows of conversations, epoch after epoch, each epoch's order a function of (seed, epoch)."""

    def __init__(self, conversations: list[Conversation], seq_len: int, seed: int, packing: bool = True,
                 pad_id: int = 0, shuffle: bool = True):
        self.conversations, self.seq_len, self.seed = conversations, seq_len, seed
        self.packing, self.pad_id, self.shuffle = packing, pad_id, shuffle
        self._epoch: tuple[int, list[list[int]]] | None = None
        self.rows_per_epoch = len(self.rows(0))  # the same every epoch: packing sees the same lengths

    def rows(self, epoch: int) -> list[list[int]]:
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        n = len(self.conversations)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n).tolist() if self.shuffle else list(range(n))
        if self.packing:
            rows = [[order[i] for i in r] for r in pack_rows([len(self.conversations[i].ids) for i in order],
                                                              self.seq_len)]
            rows = [rows[i] for i in rng.permutation(len(rows))] if self.shuffle else rows
        else:
            rows = [[i] for i in order]
        self._epoch = (epoch, rows)
        return rows

    def epoch_of(self, rows_done: int) -> float:
        return rows_done / self.rows_per_epoch

    def row(self, k: int) -> list[int]:
        return self.rows(k // self.rows_per_epoch)[k % self.rows_per_epoch]

    def get(self, first: int, count: int) -> Batch:
        """Rows first .. first + count - 1 of the run as one batch, padded to its longest row."""
        rows = [[self.conversations[i] for i in self.row(k)] for k in range(first, first + count)]
        return make_batch(rows, self.packing, self.pad_id)

    def steps_for(self, epochs: float, rows_per_step: int) -> int:
        return max(1, math.ceil(epochs * self.rows_per_epoch / rows_per_step))


def make_batch(rows: list[list[Conversation]], packing: bool, pad_id: int) -> Batch:
    T = max(sum(len(c.ids) for c in row) for row in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    segments = torch.zeros(len(rows), T, dtype=torch.long)
    tokens = 0
    for b, row in enumerate(rows):
        t = 0
        for s, c in enumerate(row):
            n = len(c.ids)
            ids[b, t:t + n] = torch.tensor(c.ids)
            labels = torch.tensor(c.labels[1:])  # position p predicts token p + 1 of the same conversation
            targets[b, t:t + n - 1] = torch.where(labels, torch.tensor(c.ids[1:]), IGNORE)
            segments[b, t:t + n] = s
            t += n
        segments[b, t:] = len(row)  # padding: a sequence of its own
        tokens += t
    n_targets = int((targets != IGNORE).sum())
    return Batch(ids, targets, PackedSequences(segments) if packing else None, tokens, n_targets)
