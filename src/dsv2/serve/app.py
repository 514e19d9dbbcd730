"""The FastAPI application: routes, OpenAI-shaped errors, API-key auth, body-size and queue limits, draining.

    app = build_app(llm, ServerConfig(model_name="DeepSeek-V2-Lite-Chat", api_key="sk-..."))

Every client mistake is a 4xx in OpenAI's error shape: bad JSON or field 400, wrong key 401, unknown model 404,
a body that stalls 408, body too large 413, queue full 429 (with Retry-After); a client gone mid-body counts as
499; while draining for shutdown, 503. A bug is a 500 that closes its connection (Connection: close).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse

from ..engine.llm import LLM
from .completions import OpenAIServing
from .config import ServerConfig, ServerState
from .engine_loop import EngineLoop
from .metrics import Metrics
from .prompts import tokenize_chat, tokenize_texts
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .protocol import conversation, lone_surrogate, parse

log = logging.getLogger("dsv2.serve")

# endpoints counted by name in the request metrics; anything else is "other" (bounded label values)
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/health",
             "/metrics")
PUBLIC = ("/health", "/metrics")  # answered without the API key: probes and scrapers carry none


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _Admission:
    """Pure ASGI middleware (BaseHTTPMiddleware would buffer streams and hide disconnects): counts requests by
    endpoint and status, refuses them while draining, checks the API key."""

    def __init__(self, app, state: ServerState, metrics: Metrics, api_key: str | None):
        self.app, self.state, self.metrics = app, state, metrics
        self.api_key = api_key.encode() if api_key else None

    def _refusal(self, scope) -> APIError | None:
        path = scope["path"]
        if self.state.draining and path != "/metrics":
            return APIError(503, "the server is shutting down; retry on another replica", type="server_error",
                            code="shutting_down", headers={"Connection": "close"})
        if self.api_key is not None and path not in PUBLIC:
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, key = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.api_key):
                return APIError(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
        status = None

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.state.in_flight += 1
        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await error_response(refusal)(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        except Exception as e:
            if status is not None:  # mid-stream: uvicorn cuts the connection, the client sees a broken response
                raise
            # Answered here, not by an exception handler: Starlette re-raises after those, and uvicorn then drops
            # the keep-alive connection under the client's next request. Connection: close says so up front.
            log.exception("unhandled error on %s", path)
            await error_response(APIError(500, f"internal error ({type(e).__name__}); the server log has the "
                                               "details, please report it", type="server_error",
                                          headers={"Connection": "close"}))(scope, receive, send_status)
        finally:
            self.state.in_flight -= 1
            self.metrics.http_requests.inc(endpoint, str(status or 500))


async def read_json(request: Request, config: ServerConfig):
    """The body as JSON, refusing more than --max-body-bytes whether announced (Content-Length) or streamed, and a
    body that stalls for --body-timeout seconds between two reads (408; the connection closes, since the rest of
    the body may still come). A client that hangs up before the end of it is a 499 (nginx's "client closed
    request"), not a server error."""
    limit, timeout = config.max_body_bytes, config.body_timeout
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is {int(length)} bytes; the limit is {limit} (--max-body-bytes)",
                       code="request_too_large")
    body = bytearray()
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), timeout)
        except TimeoutError:
            raise APIError(408, f"the request body stalled: nothing arrived for {timeout:g} s after {len(body)} "
                                f"bytes (--body-timeout); send the body without pausing", code="request_timeout",
                           headers={"Connection": "close"}) from None
        if message["type"] == "http.disconnect":
            raise APIError(499, f"the client closed the connection after {len(body)} bytes of the body",
                           code="client_closed")
        body += message.get("body", b"")
        if len(body) > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes (--max-body-bytes)",
                           code="request_too_large")
        if not message.get("more_body", False):
            break
    if not body:
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    field = lone_surrogate(body, data)
    if field is not None:
        raise APIError(400, f"{field} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is "
                            "not text; send valid Unicode", param=field)
    return data


def build_app(llm: LLM, config: ServerConfig, state: ServerState | None = None) -> FastAPI:
    """The OpenAI-compatible app on `llm`; its lifespan starts and stops the engine thread."""
    metrics = Metrics()
    engine = EngineLoop(llm, metrics)
    state = state or ServerState()
    serving = OpenAIServing(llm, engine, config, state)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="dsv2", summary="OpenAI-compatible DeepSeek-V2 server", lifespan=lifespan)
    app.state.engine, app.state.server = engine, state
    app.add_middleware(_Admission, state=state, metrics=metrics, api_key=config.api_key)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        detail = e.detail if e.status_code != 404 else f"no route {request.method} {request.url.path}"
        return error_response(APIError(e.status_code, str(detail), headers=getattr(e, "headers", None)))

    @app.get("/health")
    async def health():
        if not engine.alive:
            raise APIError(503, "the engine thread has stopped", type="server_error")
        if llm.failure is not None:  # e.g. a tensor-parallel worker died: every request would fail; restart
            raise APIError(503, f"the engine cannot run: {llm.failure}", type="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(llm), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": created, "owned_by": "dsv2",
                "max_model_len": llm.max_model_len}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        serving.check_model(model)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await read_json(request, config))
        return await serving.completions(request, req)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatCompletionRequest, await read_json(request, config))
        return await serving.chat(request, req)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = parse(TokenizeRequest, await read_json(request, config))
        serving.check_model(req.model)
        tok = serving.need_tokenizer("tokenize")
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send either prompt (text) or messages (a chat), not both or neither",
                           param="prompt")
        # as vLLM does, /tokenize takes what could be a prompt: at most max_model_len tokens
        n = llm.max_model_len
        if req.prompt is not None:
            [ids] = await tokenize_texts(tok, [req.prompt], limit=n, max_model_len=n,
                                         add_special_tokens=req.add_special_tokens)
        else:
            ids = await tokenize_chat(tok, conversation(req.messages), limit=n, max_model_len=n,
                                      add_generation_prompt=req.add_generation_prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": n}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = parse(DetokenizeRequest, await read_json(request, config))
        serving.check_model(req.model)
        tok = serving.need_tokenizer("detokenize")
        bad = [t for t in req.tokens if not 0 <= t < tok.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {tok.vocab_size})", param="tokens")
        return {"prompt": tok.decode(req.tokens)}

    return app
