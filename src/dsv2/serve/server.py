"""uvicorn with a draining shutdown.

uvicorn's own SIGTERM handling closes the listening socket at once (new clients get "connection refused", not a
503), cancels what is still running after its timeout, and re-raises the signal at the end, so the process dies
with status 143. Here the first SIGTERM keeps listening but answers 503 to new requests, lets the requests in
flight finish for `grace` seconds, aborts the rest, and then exits normally (status 0). SIGINT (Ctrl-C) does the
same with no grace; a second signal of either kind stops waiting.
"""
from __future__ import annotations

import signal
import time

import uvicorn

from ..engine.llm import LLM
from .app import build_app
from .config import ServerConfig, ServerState

ABORT_WAIT_S = 5.0  # after aborting, how long aborted responses get to end before uvicorn takes over


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, engine, grace: float):
        super().__init__(config)
        self.state, self.engine, self.grace = state, engine, grace
        self.deadline: float | None = None
        self.aborted_at: float | None = None

    def handle_exit(self, sig, frame) -> None:
        # Runs in the main thread between bytecodes: only set flags; on_tick acts on them.
        now = time.monotonic()
        if self.deadline is None:
            self.state.draining = True
            self.deadline = now + (self.grace if sig == signal.SIGTERM else 0.0)
        else:
            self.deadline = min(self.deadline, now)

    async def on_tick(self, counter: int) -> bool:
        if self.deadline is not None and not self.should_exit:
            now = time.monotonic()
            if self.state.in_flight == 0:
                self.should_exit = True
            elif now >= self.deadline and self.aborted_at is None:
                self.engine.abort_all()  # their clients get 503 or a stream's error event (OpenAIServing.cut_short)
                self.aborted_at = now
            elif self.aborted_at is not None and now - self.aborted_at > ABORT_WAIT_S:
                self.should_exit = True
        return await super().on_tick(counter)


def run_server(llm: LLM, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, grace: float = 30.0,
               log_level: str = "info") -> None:
    """Serve `llm` until SIGTERM / SIGINT, then drain (see the module docstring) and return."""
    state = ServerState()
    app = build_app(llm, config, state)
    uv_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                               lifespan="on")
    DrainingServer(uv_config, state, app.state.engine, grace).run()
