"""/v1/completions and /v1/chat/completions: requests -> engine requests -> OpenAI responses or SSE chunks.

Choice i*n + j is completion j of prompt i (OpenAI's order). `echo` with `max_tokens: 0` scores a prompt without
generating: the engine runs it with max_tokens=1 and prompt_logprobs, and the one sampled token is dropped.
"""
from __future__ import annotations

import json
import time
import uuid

from starlette.responses import JSONResponse, Response, StreamingResponse

from ..engine.llm import LLM
from ..engine.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from ..engine.sampling_params import SamplingParams
from .config import ServerConfig, ServerState
from .engine_loop import ClientDisconnected, EngineError, EngineLoop, RequestHandle
from .prompts import prompt_limit, tokenize_chat, tokenize_texts
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, conversation, value_error

MIN_LOGPROB = -9999.0  # JSON has no -Infinity


class SSEResponse(StreamingResponse):
    """Server-sent events that abort their engine requests (handle.close) however the response ends: a client
    gone before the generator even started included, and without waiting for the generator to be collected."""
    media_type = "text/event-stream"

    def __init__(self, content, handle: RequestHandle):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.handle = handle

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            self.handle.close()
            await self.body_iterator.aclose()


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class OpenAIServing:
    def __init__(self, llm: LLM, engine: EngineLoop, config: ServerConfig, state: ServerState):
        self.llm, self.engine, self.config, self.state = llm, engine, config, state
        self.model_name = config.model_name

    # ---- shared ------------------------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def check_size(self, num_prompts: int, n: int, stop: str | list[str] | None) -> None:
        """The per-request limits, before any work: sequences (prompts x n) and stop strings."""
        cfg = self.config
        limit, flag = min((cfg.max_seqs_per_request, "--max-seqs-per-request"), (cfg.max_waiting, "--max-waiting"),
                          key=lambda x: x[0])
        if num_prompts * n > limit:
            raise APIError(400, f"this request asks for {num_prompts * n} sequences ({num_prompts} prompt(s) x n={n}); "
                                f"one request may ask for at most {limit} ({flag} {limit}): send fewer prompts per "
                                f"request or a smaller n", param="n" if n > limit else "prompt")
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > cfg.max_stop_strings:
            raise APIError(400, f"stop has {len(stops)} strings; at most {cfg.max_stop_strings} are allowed "
                                f"(--max-stop-strings {cfg.max_stop_strings})", param="stop")
        longest = max(stops, key=len, default="")
        if len(longest) > cfg.max_stop_chars:
            raise APIError(400, f"a stop string is {len(longest)} characters long; at most {cfg.max_stop_chars} are "
                                f"allowed (--max-stop-chars {cfg.max_stop_chars})", param="stop")

    def check_queue(self, num_seqs: int) -> None:
        waiting, limit = self.llm.num_waiting, self.config.max_waiting
        if waiting + num_seqs > limit:
            raise APIError(429, f"the server is busy: {waiting} sequences are already waiting and this request adds "
                                f"{num_seqs} (--max-waiting {limit}); retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"})

    def check_token_ids(self, prompts: list[str | list[int]]) -> None:
        """Token-id prompts inside the vocabulary, before anything decodes them (echo, logprobs); one longer than the
        context is refused before its ids are even looked at."""
        vocab, max_model_len = self.llm.config.vocab_size, self.llm.max_model_len
        for p in prompts:
            if isinstance(p, str):
                continue
            if len(p) >= max_model_len:
                raise APIError(400, f"the prompt has {len(p)} tokens, but the maximum context length is "
                                    f"{max_model_len}", param="prompt", code="context_length_exceeded")
            bad = next((t for t in p if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")

    def submit(self, prompts: list[list[int]], params: SamplingParams, request_id: str, param: str) -> RequestHandle:
        self.check_queue(len(prompts) * params.n)
        try:
            return self.engine.submit([(ids, params) for ids in prompts], request_id)
        except ValueError as e:
            raise value_error(e, param) from None

    def cut_short(self) -> APIError:
        """The answer for work the engine aborted while its client still listened: the shutdown's, past
        --shutdown-grace (or a sequence the cache can never hold). No OpenAI client knows finish_reason "abort", so
        it is an error: a 503 the openai client retries (on another replica), or a stream's last event, on which it
        raises."""
        if self.state.draining:
            return APIError(503, "the server is shutting down and stopped this request before it finished; retry it "
                                 "on another replica", type="server_error", code="shutting_down",
                            headers={"Connection": "close"})
        return APIError(500, "the engine stopped this request before it finished", type="server_error")

    @staticmethod
    def _aborted(outputs) -> bool:
        return any(c.finish_reason == "abort" for out in outputs for c in out.outputs)

    def need_tokenizer(self, what: str):
        if self.llm.tokenizer is None:
            raise APIError(400, f"this model directory has no tokenizer.json, so {what} is not available; send "
                                "token ids")
        return self.llm.tokenizer

    def _token_str(self, token_id: int, lp=None) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.llm.tokenizer.decode([token_id]) if self.llm.tokenizer is not None else ""

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached}}

    @staticmethod
    async def _collect(handle: RequestHandle, request) -> dict[str, RequestOutput] | None:
        """Wait for every request of handle to finish; None if the client went away first (then aborted)."""
        final = {}
        try:
            while not handle.finished:
                out = await handle.next(request)
                if out.finished:
                    final[out.request_id] = out
        except ClientDisconnected:
            return None
        except EngineError as e:
            raise APIError(500, str(e), type="server_error") from None
        finally:
            handle.close()
        return final

    # ---- /v1/completions ---------------------------------------------------------------------------------------
    async def completions(self, request, req: CompletionRequest) -> Response:
        req.check()
        self.check_model(req.model)
        raw = req.prompts()
        self.check_size(len(raw), req.n, req.stop)
        self.check_queue(len(raw) * req.n)
        self.check_token_ids(raw)
        score_only = req.max_tokens == 0
        params = req.sampling_params(
            self.llm.generation_defaults, max_tokens=1 if score_only else req.max_tokens, logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None)
        if isinstance(raw[0], str):  # all text or all token ids
            max_model_len = self.llm.max_model_len
            prompts = await tokenize_texts(self.need_tokenizer("a text prompt"), raw,
                                           prompt_limit(max_model_len, params.max_tokens), max_model_len)
        else:
            prompts = [list(p) for p in raw]
        texts = [p if isinstance(p, str) else None for p in raw]
        fmt = _CompletionFormat(self, req, prompts, texts, score_only)
        rid = f"cmpl-{uuid.uuid4().hex}"
        handle = self.submit(prompts, params, rid, "prompt")
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        if req.stream:
            return SSEResponse(self._stream_completions(handle, fmt, head, req), handle)
        final = await self._collect(handle, request)
        if final is None:
            return Response(status_code=499)
        if self._aborted(final.values()):
            raise self.cut_short()
        choices, completion_tokens = [], 0
        for i, rid_i in enumerate(handle.request_ids):
            out = final[rid_i]
            for c in out.outputs:
                text, lps, finish = fmt.choice(i, out, c, c.text, c.token_ids, c.logprobs or [], first=True)
                choices.append({"index": i * req.n + c.index, "text": text, "logprobs": lps,
                                "finish_reason": finish})
                completion_tokens += 0 if score_only else len(c.token_ids)
        usage = self._usage(sum(map(len, prompts)), completion_tokens,
                            sum(final[r].num_cached_tokens for r in handle.request_ids))
        return JSONResponse({**head, "choices": choices, "usage": usage})

    async def _stream_completions(self, handle: RequestHandle, fmt: _CompletionFormat, head: dict,
                                  req: CompletionRequest):
        usage_null = {"usage": None} if req.include_usage else {}
        started, done, sent = set(), set(), {}  # choice indices; tokens streamed per choice
        cached, cut = {}, False
        try:
            while not handle.finished and not cut:
                out = await handle.next()
                i = handle.request_ids.index(out.request_id)
                cached[i] = out.num_cached_tokens
                cut = self._aborted([out])
                choices = []
                for c in out.outputs:
                    index = i * req.n + c.index
                    if index in done:
                        continue
                    start = sent.get(index, 0)
                    new = c.delta_token_ids
                    sent[index] = start + len(new)
                    text, lps, finish = fmt.choice(i, out, c, c.delta_text, new,
                                                   (c.logprobs or [])[start:start + len(new)],
                                                   first=index not in started)
                    finish = None if cut else finish
                    started.add(index)
                    if finish is not None:
                        done.add(index)
                    if text or (lps and lps["tokens"]) or finish is not None:
                        choices.append({"index": index, "text": text, "logprobs": lps, "finish_reason": finish})
                if choices:
                    yield sse({**head, "choices": choices, **usage_null})
            if cut:
                yield sse(self.cut_short().body())
            elif req.include_usage:
                completion_tokens = 0 if fmt.score_only else sum(sent.values())
                yield sse({**head, "choices": [], "usage": self._usage(sum(map(len, fmt.prompts)), completion_tokens,
                                                                        sum(cached.values()))})
        except EngineError as e:
            yield sse(APIError(500, str(e), type="server_error").body())
        finally:
            handle.close()
        yield sse("[DONE]")

    # ---- /v1/chat/completions ----------------------------------------------------------------------------------
    async def chat(self, request, req: ChatCompletionRequest) -> Response:
        req.check()
        self.check_model(req.model)
        self.check_size(1, req.n, req.stop)
        self.check_queue(req.n)
        tok = self.need_tokenizer("chat")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = req.sampling_params(self.llm.generation_defaults, max_tokens=max_tokens,
                                     logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        max_model_len = self.llm.max_model_len
        ids = await tokenize_chat(tok, conversation(req.messages), prompt_limit(max_model_len, max_tokens),
                                  max_model_len)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        handle = self.submit([ids], params, rid, "messages")
        head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.model_name}
        if req.stream:
            chunk_head = {**head, "object": "chat.completion.chunk"}
            return SSEResponse(self._stream_chat(handle, chunk_head, req, len(ids)), handle)
        final = await self._collect(handle, request)
        if final is None:
            return Response(status_code=499)
        if self._aborted(final.values()):
            raise self.cut_short()
        out = final[handle.request_ids[0]]
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._chat_logprobs(c.token_ids, c.logprobs, req),
                    "finish_reason": c.finish_reason} for c in out.outputs]
        usage = self._usage(len(ids), sum(len(c.token_ids) for c in out.outputs), out.num_cached_tokens)
        return JSONResponse({**head, "choices": choices, "usage": usage})

    async def _stream_chat(self, handle: RequestHandle, head: dict, req: ChatCompletionRequest, num_prompt: int):
        usage_null = {"usage": None} if req.include_usage else {}
        done, sent, cached, cut = set(), [0] * req.n, 0, False
        try:
            # the role first, at once: the client sees the stream open before the first token is computed
            yield sse({**head, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None} for j in range(req.n)],
                       **usage_null})
            while not handle.finished and not cut:
                out = await handle.next()
                cached = out.num_cached_tokens
                cut = self._aborted([out])
                choices = []
                for c in out.outputs:
                    if c.index in done:
                        continue
                    start, new = sent[c.index], c.delta_token_ids
                    sent[c.index] += len(new)
                    lps = self._chat_logprobs(new, (c.logprobs or [])[start:start + len(new)], req)
                    finish = None if cut else c.finish_reason
                    if finish is not None:
                        done.add(c.index)
                    if c.delta_text or lps or finish is not None:
                        delta = {"content": c.delta_text} if c.delta_text else {}
                        choices.append({"index": c.index, "delta": delta, "logprobs": lps, "finish_reason": finish})
                if choices:
                    yield sse({**head, "choices": choices, **usage_null})
            if cut:
                yield sse(self.cut_short().body())
            elif req.include_usage:
                yield sse({**head, "choices": [], "usage": self._usage(num_prompt, sum(sent), cached)})
        except EngineError as e:
            yield sse(APIError(500, str(e), type="server_error").body())
        finally:
            handle.close()
        yield sse("[DONE]")

    def _top_entry(self, token_id: int, lp) -> dict:
        token = self._token_str(token_id, lp)
        return {"token": token, "logprob": max(lp.logprob, MIN_LOGPROB), "bytes": list(token.encode())}

    def _chat_logprobs(self, token_ids: list[int], positions: list[PositionLogprobs] | None,
                       req: ChatCompletionRequest) -> dict | None:
        """The chat format: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""
        if not req.logprobs or positions is None or not token_ids:
            return None
        top_n = req.top_logprobs or 0
        content = []
        for tid, pos in zip(token_ids, positions):
            chosen = pos[tid]
            token = self._token_str(tid, chosen)
            top = sorted(((t, lp) for t, lp in pos.items() if lp.rank <= top_n), key=lambda x: x[1].rank)[:top_n]
            content.append({"token": token, "logprob": max(chosen.logprob, MIN_LOGPROB),
                            "bytes": list(token.encode()),
                            "top_logprobs": [self._top_entry(t, lp) for t, lp in top]})
        return {"content": content}


class _CompletionFormat:
    """Text and legacy logprobs ({tokens, token_logprobs, top_logprobs, text_offset}) of completion choices;
    the echoed prompt comes first in a choice's first chunk, its first token's logprob null."""

    def __init__(self, serving: OpenAIServing, req: CompletionRequest, prompts: list[list[int]],
                 texts: list[str | None], score_only: bool):
        self.serving, self.req, self.prompts, self.score_only = serving, req, prompts, score_only
        tok = serving.llm.tokenizer
        skip = req.skip_special_tokens
        self.echo_texts = [t if t is not None else (tok.decode(p, skip_special_tokens=skip) if tok else "")
                           for t, p in zip(texts, prompts)]
        # special tokens (the bos encode adds) are not in the text, so they take no room in text_offset
        self.zero_width = set(tok.all_special_ids) if tok is not None and skip else set()
        self.offsets: dict[int, int] = {}  # choice index -> text_offset of its next token

    def choice(self, i: int, out: RequestOutput, c: CompletionOutput, text: str, token_ids: list[int],
               positions: list[PositionLogprobs], first: bool) -> tuple[str, dict | None, str | None]:
        req = self.req
        finish = c.finish_reason
        if self.score_only:  # the one token the engine sampled is not part of the answer
            text, token_ids, positions = "", [], []
            finish = "length" if finish is not None else None
        ids, pos = list(token_ids), list(positions)
        if first and req.echo:
            text = self.echo_texts[i] + text
            ids = self.prompts[i] + ids
            pos = list(out.prompt_logprobs or [None] * len(self.prompts[i])) + pos
        if req.logprobs is None:
            return text, None, finish
        index = i * req.n + c.index
        offset = self.offsets.get(index, 0)
        lps = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, p in zip(ids, pos):
            token = self.serving._token_str(tid, p[tid] if p else None)
            lps["tokens"].append(token)
            lps["text_offset"].append(offset)
            offset += 0 if tid in self.zero_width else len(token)
            if p is None:  # the first prompt token: nothing before it to score it
                lps["token_logprobs"].append(None)
                lps["top_logprobs"].append(None)
                continue
            lps["token_logprobs"].append(max(p[tid].logprob, MIN_LOGPROB))
            lps["top_logprobs"].append({self.serving._token_str(t, lp): max(lp.logprob, MIN_LOGPROB)
                                        for t, lp in p.items() if lp.rank <= req.logprobs or t == tid})
        self.offsets[index] = offset
        return text, lps, finish
