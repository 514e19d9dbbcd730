"""The engine thread and its bridge to asyncio: one thread calls `llm.step()` for every HTTP request at once
(continuous batching across requests) and hands each step's outputs to the asyncio queue of the request they
belong to. The event loop only queues, awaits and formats; it never runs the model.

    engine = EngineLoop(llm, metrics); engine.start()
    handle = engine.submit([(prompt_ids, params)], "cmpl-1")   # on the event loop
    while not handle.finished: out = await handle.next()          # RequestOutputs, as they are produced
    handle.close()                                                # aborts whatever did not finish
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

from ..engine.llm import LLM
from ..engine.outputs import RequestOutput
from ..engine.sampling_params import SamplingParams
from .metrics import Metrics

log = logging.getLogger("dsv2.serve")

DISCONNECT_POLL_S = 0.5


class EngineError(RuntimeError):
    """The engine failed while running a step (not the client's fault)."""


class ClientDisconnected(Exception):
    pass


class _Tracked:
    """Where one engine request's outputs go, and its timing for the latency histograms."""

    def __init__(self, queue: asyncio.Queue, loop: asyncio.AbstractEventLoop):
        self.queue, self.loop = queue, loop
        self.arrival = time.monotonic()
        self.last_token: float | None = None

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is going away
            pass


class RequestHandle:
    """The engine requests of one HTTP request (one per prompt) and the queue their outputs arrive on."""

    def __init__(self, engine: EngineLoop, request_ids: list[str], queue: asyncio.Queue):
        self.engine, self.request_ids, self.queue = engine, request_ids, queue
        self.unfinished = set(request_ids)
        self._last_poll = time.monotonic()

    @property
    def finished(self) -> bool:
        return not self.unfinished

    async def next(self, request=None) -> RequestOutput:
        """The next output of any of this handle's requests. With `request` (a Starlette Request), checks every
        DISCONNECT_POLL_S whether the client went away and raises ClientDisconnected if so."""
        item = await (self.queue.get() if request is None else self._get_watching(request))
        if isinstance(item, BaseException):
            self.unfinished.clear()
            raise item
        if item.finished:
            self.unfinished.discard(item.request_id)
        return item

    async def _get_watching(self, request):
        getter = asyncio.ensure_future(self.queue.get())
        try:
            while True:
                wait = self._last_poll + DISCONNECT_POLL_S - time.monotonic()
                done, _ = await asyncio.wait({getter}, timeout=max(0.0, wait))
                if time.monotonic() - self._last_poll >= DISCONNECT_POLL_S:  # outputs may never pause: poll by time
                    self._last_poll = time.monotonic()
                    if await request.is_disconnected():
                        raise ClientDisconnected()
                if done:
                    return getter.result()
        finally:
            getter.cancel()  # a no-op when done; a pending Queue.get leaves the queue as it was

    def close(self) -> None:
        """Abort what has not finished (client gone, error, shutdown); the blocks free at the next step."""
        for rid in self.unfinished:
            self.engine.abort(rid)
        self.unfinished.clear()


class EngineLoop:
    """Owns the thread that steps `llm`. submit/abort are called from the event loop; everything else in the
    engine happens on the engine thread."""

    def __init__(self, llm: LLM, metrics: Metrics):
        self.llm, self.metrics = llm, metrics
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dsv2-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.abort_all()
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_requests(self) -> int:
        return len(self._tracked)

    def submit(self, prompts: list[tuple[list[int], SamplingParams]], request_id: str) -> RequestHandle:
        """Queue one engine request per (prompt ids, params), named request_id-0, -1, ...; all or none: a
        ValueError from the engine (context length, vocabulary) aborts the ones already queued."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        ids = []
        try:
            for i, (prompt_ids, params) in enumerate(prompts):
                rid = f"{request_id}-{i}"
                with self._lock:  # registered before the engine can produce its first output
                    self._tracked[rid] = _Tracked(queue, loop)
                ids.append(rid)
                self.llm.add_request(prompt_ids, params, rid)
        except BaseException:
            for rid in ids:
                self.llm.abort(rid)
            with self._lock:
                for rid in ids:
                    self._tracked.pop(rid, None)
            raise
        finally:
            self._wake.set()
        self.metrics.prompt_tokens.inc(amount=sum(len(p) for p, _ in prompts))
        return RequestHandle(self, ids, queue)

    def abort(self, request_id: str) -> None:
        self.llm.abort(request_id)
        self._wake.set()

    def abort_all(self) -> None:
        with self._lock:
            ids = list(self._tracked)
        for rid in ids:
            self.abort(rid)

    # ---- the engine thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            if not self.llm.has_unfinished_requests():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.llm.step()
            except Exception as e:  # a bug or out of memory: fail the requests in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(EngineError(f"the engine failed: {type(e).__name__}: {e}"))
                continue
            self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        m = self.metrics
        for out in outputs:
            with self._lock:
                t = self._tracked.get(out.request_id)
                if t is not None and out.finished:
                    del self._tracked[out.request_id]
            if t is None:
                continue
            new = sum(len(c.delta_token_ids) for c in out.outputs)
            if new:
                m.generation_tokens.inc(amount=new)
                if t.last_token is None:
                    m.ttft.observe(now - t.arrival)
                else:
                    m.itl.observe(now - t.last_token)
                t.last_token = now
            if out.finished:
                m.e2e.observe(now - t.arrival)
                for c in out.outputs:
                    m.finished.inc(c.finish_reason or "abort")
            t.put(out)

    def _fail_all(self, error: EngineError) -> None:
        with self._lock:
            tracked, self._tracked = self._tracked, {}
        for rid, t in tracked.items():
            self.llm.abort(rid)
            t.put(error)
