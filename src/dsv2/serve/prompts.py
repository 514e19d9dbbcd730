"""Prompt text to token ids, off the event loop. A worker thread renders the chat template and tokenizes (the Rust
tokenizer releases the GIL there, so /health and every stream go on meanwhile); text that cannot fit the context is
refused before all of it is tokenized (Tokenizer.encode_within); and the heap a large text took goes back to the OS.

    ids = await tokenize_texts(tok, ["def f():"], prompt_limit(llm.max_model_len, max_tokens=16), param="prompt")
"""
from __future__ import annotations

import asyncio
import ctypes

import jinja2

from ..tokenizer import Tokenizer
from .protocol import APIError

LARGE_TEXT = 1 << 20  # characters; tokenizing this much leaves enough freed heap to hand back


def prompt_limit(max_model_len: int, max_tokens: int | None) -> int:
    """Tokens a prompt may have: the context less max_tokens (at least one token, when max_tokens is None)."""
    if max_tokens is not None and max_tokens >= max_model_len:
        raise APIError(400, f"max_tokens is {max_tokens}, but the maximum context length is {max_model_len} and it "
                            "must hold the prompt too; lower max_tokens", param="max_tokens",
                       code="context_length_exceeded")
    return max_model_len - (max_tokens or 1)


def too_long(what: str, limit: int, max_model_len: int, param: str) -> APIError:
    if limit >= max_model_len - 1:
        room = f"the maximum context length is {max_model_len}; shorten it"
    else:
        room = (f"the maximum context length is {max_model_len} and max_tokens is {max_model_len - limit}; shorten "
                f"it or lower max_tokens")
    return APIError(400, f"{what} has more than {limit} tokens: {room}", param=param, code="context_length_exceeded")


async def tokenize_texts(tok: Tokenizer, texts: list[str], limit: int, max_model_len: int, param: str = "prompt",
                         add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each text; a 400 (context_length_exceeded) if one has more than `limit` tokens."""
    def work():
        out = []
        for i, text in enumerate(texts):
            ids = tok.encode_within(text, limit, add_special_tokens=add_special_tokens)
            if ids is None:
                what = "the prompt" if len(texts) == 1 else f"prompt {i}"
                raise too_long(what, limit, max_model_len, param)
            out.append(ids)
        return out

    return await _off_the_loop(work, sum(map(len, texts)))


async def tokenize_chat(tok: Tokenizer, conversation: list[dict], limit: int, max_model_len: int,
                        add_generation_prompt: bool = True) -> list[int]:
    """The chat template's rendering of `conversation`, tokenized; a 400 if the template refuses it or it has more
    than `limit` tokens."""
    def work():
        try:
            text = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
        except (ValueError, jinja2.TemplateError) as e:
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        ids = tok.encode_within(text, limit, add_special_tokens=False)
        if ids is None:
            raise too_long("the conversation (rendered with the chat template)", limit, max_model_len, "messages")
        return ids

    return await _off_the_loop(work, sum(len(m["content"]) for m in conversation))


async def _off_the_loop(work, num_chars: int):
    try:
        return await asyncio.to_thread(work)
    finally:
        if num_chars >= LARGE_TEXT:
            await asyncio.to_thread(_release_heap)


def _release_heap() -> None:
    # glibc keeps freed heap for reuse; after a large tokenization that is hundreds of MB the process would hold on
    # to for good. malloc_trim hands it back (elsewhere than glibc there is nothing to do).
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
