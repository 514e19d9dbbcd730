"""`dsv2 serve`: the OpenAI-compatible HTTP server (needs `pip install 'dsv2[serve]'`).

    dsv2 serve --model ~/models/DeepSeek-V2-Lite-Chat                      # http://127.0.0.1:8000/v1
    DSV2_API_KEY=sk-local dsv2 serve --model DIR --host 0.0.0.0 --port 8080 --served-model-name deepseek-v2-lite
    dsv2 serve --model DIR --max-num-seqs 64 --max-waiting 512 --shutdown-grace 60
    dsv2 serve --model DIR --max-seqs-per-request 64 --max-stop-strings 4 --body-timeout 10
    dsv2 serve --model DIR --tensor-parallel-size 8                          # 8 GPUs on this host
    torchrun --nnodes 2 --node-rank NODE --nproc-per-node 8 --master-addr HOST0 --master-port 29500 \
        -m dsv2.cli serve --model DIR --tensor-parallel-size 16 --host 0.0.0.0   # 2 hosts; node 0 serves HTTP
"""
from __future__ import annotations

import os
import sys

from .run import _model_args


def register(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, metrics)",
                       description="Serve a model over the OpenAI API: /v1/completions, /v1/chat/completions (SSE "
                                   "with stream: true), /v1/models, /tokenize, /detokenize, /health and Prometheus "
                                   "/metrics. All requests share one continuous batch. SIGTERM drains: new requests "
                                   "get 503, requests in flight get --shutdown-grace seconds to finish.")
    _model_args(s)
    s.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1, this machine only; 0.0.0.0 exposes it: set a key)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    s.add_argument("--api-key", default=os.environ.get("DSV2_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* and /tokenize, /detokenize (default: the "
                        "DSV2_API_KEY environment variable; prefer it, a flag shows up in `ps`). /health and "
                        "/metrics stay open")
    s.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send (default: the model directory's name)")
    s.add_argument("--max-num-seqs", type=int, default=256,
                   help="sequences in the running batch at most (default 256); more wait in the queue")
    s.add_argument("--max-waiting", type=int, default=256,
                   help="sequences queued for the batch at most (a request counts prompts x n) before new requests "
                        "get 429 + Retry-After (default 256)")
    s.add_argument("--max-seqs-per-request", type=int, default=256, metavar="N",
                   help="prompts x n of one request at most; more is a 400 (default 256; a request over "
                        "--max-waiting could never be queued, so that bounds it too)")
    s.add_argument("--max-stop-strings", type=int, default=16, metavar="N",
                   help="stop strings per request at most (default 16; OpenAI allows 4). Every stop string is "
                        "checked after each token of each sequence: raise it only if your clients need more")
    s.add_argument("--max-stop-chars", type=int, default=64, metavar="N",
                   help="characters per stop string at most (default 64)")
    s.add_argument("--max-body-bytes", default="16MiB", metavar="SIZE",
                   help="largest request body accepted; larger gets 413 (default 16MiB)")
    s.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                   help="seconds a request body may stall between two reads before the request gets 408 and its "
                        "connection is closed (default 30, as nginx's client_body_timeout)")
    s.add_argument("--shutdown-grace", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds the requests in flight get to finish before they are aborted "
                        "(default 30); an aborted request gets 503 shutting_down, an aborted stream ends with an "
                        "error event")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info: one access-log line per request)")
    s.set_defaults(func=run_serve)


def served_name(model: str | None) -> str:
    """What /v1/models lists: a directory's basename, a repo id as given, or the shipped model's name."""
    if model is None:
        from ..assets import DEFAULT_MODEL
        return os.path.basename(DEFAULT_MODEL)
    return os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model


def run_serve(args) -> int:
    try:
        from ..serve import ServerConfig, run_server
    except ImportError as e:
        print(f"dsv2 serve: {e.name} is missing; install the server extra: pip install 'dsv2[serve]'",
              file=sys.stderr)
        return 1
    from ..engine.llm import LLM
    from ..units import parse_bytes
    config = ServerConfig(model_name=args.served_model_name or served_name(args.model), api_key=args.api_key or None,
                          max_waiting=args.max_waiting, max_seqs_per_request=args.max_seqs_per_request,
                          max_stop_strings=args.max_stop_strings, max_stop_chars=args.max_stop_chars,
                          max_body_bytes=parse_bytes(args.max_body_bytes), body_timeout=args.body_timeout)
    with LLM(args.model, dtype=args.dtype, device=args.device, kv_cache_memory=args.kv_cache_memory,
             max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, quantization=args.quantization,
             kv_cache_dtype=args.kv_cache_dtype, tensor_parallel_size=args.tensor_parallel_size,
             compile_decode=args.compile, cpu_weight_packing=args.cpu_weight_packing) as llm:
        if args.compile:
            print(f"dsv2 serve: decode compiled in {llm.warm_up():.1f} s", file=sys.stderr)
        run_server(llm, config, host=args.host, port=args.port, grace=args.shutdown_grace, log_level=args.log_level)
    return 0
