"""`dsv2 generate`, `dsv2 chat`, `dsv2 bench`: the inference engine from the command line.

    dsv2 generate "def fibonacci(n):"                      # the shipped model, streamed to stdout
    dsv2 generate --model ~/models/DeepSeek-V2-Lite-Chat --max-tokens 200 "Write a haiku about the sea."
    dsv2 chat --model ~/models/DeepSeek-V2-Lite-Chat        # multi-turn; /reset, /exit
    dsv2 bench --model DIR --batch 16 --context 256 --new 64 --json
    dsv2 generate --model DIR --tensor-parallel-size 2 "Hello"      # split over 2 processes (GPUs, or CPU ranks)
    torchrun --nnodes 2 --node-rank NODE --nproc-per-node 8 --master-addr HOST0 --master-port 29500 \
        -m dsv2.cli generate --model DIR --tensor-parallel-size 16 "Hello"   # every rank runs it; rank 0 prints
"""
from __future__ import annotations

import argparse
import json
import sys
import time


QUANTIZATIONS = ("int8", "int4")  # capability.QUANTIZATIONS, spelled out so that --help does not import torch


def _model_args(p) -> None:
    p.add_argument("--model", default=None, metavar="PATH",
                   help="Hugging Face DeepSeek-V2 directory or repo id (default: the small model shipped with dsv2)")
    p.add_argument("--dtype", default="auto", help="bfloat16 (auto, the default), float16 or float32")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                   help="latent cache size, e.g. 4GiB, per rank with --tensor-parallel-size (default: most of free "
                        "GPU memory / a quarter of free RAM, shared by the CPU ranks of a host)")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion to accept")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split the model over N processes: N GPUs (one per rank, nccl), or on CPU N ranks sharing "
                        "the cores (gloo); every rank keeps a whole copy of the latent cache. Several hosts: run the "
                        "same command under torchrun with N = WORLD_SIZE (default 1)")
    p.add_argument("--quantization", default=None, choices=list(QUANTIZATIONS),
                   help="weight-only quantization, applied while the checkpoint streams in (peak memory near the "
                        "quantized model): int8 = a scale per output row, half the bf16 bytes; int4 = groups of 64 "
                        "with a scale and zero point, ~0.28x (lm_head int8, kv_b_proj and the embedding kept). "
                        "Default: none, weights in --dtype")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="the latent cache: auto = the compute dtype (bf16); fp8 = DeepSeek's layout, e4m3 latents "
                        "with a scale per 128 values and bf16 rope keys (656 B/token/layer for V2 vs 1,152: ~1.75x "
                        "the tokens in the same memory)")
    p.add_argument("--compile", action="store_true",
                   help="CPU: run decode steps as one torch.compile'd graph (fused operators around the matrix "
                        "kernels: 1.1-2.1x the eager decode rate measured here). Compiling takes tens of seconds to "
                        "minutes before the first token. Needs a C++ compiler (g++); without one decode stays "
                        "eager, with a notice")
    p.add_argument("--no-weight-packing", dest="cpu_weight_packing", action="store_const", const=False,
                   default=None,
                   help="CPU: keep bf16 weights in their plain layout instead of oneDNN's blocked one. With "
                        "--compile, single-sequence decode then runs matrix-vector code the compiler generates "
                        "(the fastest one-stream decode: 1.7x packed on the benchmark model) at the cost of prefill "
                        "and batched decode (~0.8x)")


def _sampling_args(p) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; default: the model's generation_config.json, else 1.0")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: generation_config or 1)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens (0 = off; default: generation_config or off)")
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens below min_p x the top probability (default: generation_config or 0)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="> 1 discourages repeats, e.g. 1.1 (default: generation_config or 1 = off)")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop at this string (repeatable)")


def register(sub) -> None:
    g = sub.add_parser("generate", help="complete prompts, streaming tokens as they come",
                       description="Complete one or more prompts. One prompt streams to stdout as it is generated; "
                                   "several run together in one continuous batch.")
    g.add_argument("prompts", nargs="+", metavar="PROMPT")
    _model_args(g)
    _sampling_args(g)
    g.set_defaults(func=run_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat through the model's chat template",
                       description="Talk to a chat model. Commands: /reset clears the conversation, /exit quits "
                                   "(Ctrl-D too).")
    c.add_argument("--system", default=None, help="a system prompt to start every conversation with")
    _model_args(c)
    _sampling_args(c)
    c.set_defaults(func=run_chat)

    b = sub.add_parser("bench", help="measure prefill and decode throughput",
                       description="B concurrent sequences of C random prompt tokens each, then N greedy tokens each; "
                                   "reports aggregate prefill and decode tokens/s. Compare against transformers and "
                                   "llama.cpp with benchmarks/compare.py.")
    _model_args(b)
    b.add_argument("--batch", type=_sizes, default=(1,), metavar="B[,B...]",
                   help="concurrent sequences (default 1); a list (1,16) measures each after one load -- a model "
                        "that takes minutes to load is loaded once")
    b.add_argument("--context", type=_sizes, default=(256,), metavar="C[,C...]",
                   help="prompt tokens per sequence (default 256); a list measures each")
    b.add_argument("--new", type=int, default=64, help="generated tokens per sequence (default 64)")
    b.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget per step (default: max(2048, batch x context): the whole batch prefills in one step)")
    b.add_argument("--repeat", type=int, default=1, help="repeat the measurement and report the best (default 1)")
    b.add_argument("--json", action="store_true", help="print one JSON object per measurement (one line each)")
    b.set_defaults(func=run_bench)


def _llm(args, **extra):
    from ..engine.llm import LLM
    return LLM(args.model, dtype=args.dtype, device=args.device, kv_cache_memory=args.kv_cache_memory,
               max_model_len=args.max_model_len, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
               tensor_parallel_size=args.tensor_parallel_size, compile_decode=args.compile,
               cpu_weight_packing=args.cpu_weight_packing, **extra)


def _params(args, llm):
    from ..engine.sampling_params import GENERATION_CONFIG_KNOBS, SamplingParams, with_generation_defaults
    knobs = with_generation_defaults(llm.generation_defaults, **{k: getattr(args, k) for k in GENERATION_CONFIG_KNOBS})
    return SamplingParams(max_tokens=args.max_tokens, seed=args.seed, stop=args.stop, **knobs)


def run_generate(args) -> int:
    with _llm(args) as llm:
        return _generate(args, llm)


def _generate(args, llm) -> int:
    params = _params(args, llm)
    if len(args.prompts) == 1:
        sys.stdout.write(args.prompts[0])
        for delta in llm.stream(args.prompts[0], params):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    for i, out in enumerate(llm.generate(args.prompts, params)):
        print(f"=== [{i}] {out.finish_reason}, {len(out.token_ids)} tokens\n{out.prompt}{out.text}")
    return 0


def run_chat(args) -> int:
    with _llm(args) as llm:
        return _chat(args, llm)


def _chat(args, llm) -> int:
    if llm.tokenizer is None:
        print("dsv2 chat: this model directory has no tokenizer.json", file=sys.stderr)
        return 1
    params = _params(args, llm)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    print("dsv2 chat -- /reset clears the conversation, /exit quits.", file=sys.stderr)
    while True:
        try:
            user = input(">>> ")
        except EOFError:
            print()
            return 0
        if user.strip() in ("/exit", "/quit"):
            return 0
        if user.strip() == "/reset":
            history = list(start)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not user.strip():
            continue
        history.append({"role": "user", "content": user})
        ids = llm.tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        reply = []
        try:
            for delta in llm.stream(ids, params):
                reply.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this answer, keep the session
            pass
        print()
        history.append({"role": "assistant", "content": "".join(reply).strip()})


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma-separated list of numbers, got {text!r}")
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return sizes


def run_bench(args) -> int:
    from ..engine.benchmark import run_benchmark
    cases = [(b, c) for b in args.batch for c in args.context]
    budget = args.max_num_batched_tokens or max(2048, max(b * c for b, c in cases))
    started = time.perf_counter()
    with _llm(args, max_num_seqs=max(args.batch), max_num_batched_tokens=budget) as llm:
        load_s = time.perf_counter() - started
        warm_up_s = llm.warm_up()  # with --compile: the compilations, before anything is timed
        for batch, context in cases:
            result = {**run_benchmark(llm, batch=batch, context=context, new=args.new, repeat=args.repeat),
                      "load_s": load_s, "warm_up_s": warm_up_s}
            if args.json:
                print(json.dumps(result), flush=True)
                continue
            kind = result["dtype"] if result["compute_dtype"] == result["dtype"] else \
                f"{result['dtype']} weights, {result['compute_dtype']} compute"
            kind += f", {result['quantization']}" if result["quantization"] else ""
            tp = f" tensor-parallel {result['tensor_parallel_size']}" if result["tensor_parallel_size"] > 1 else ""
            print(f"dsv2 {kind} ({result['weights']}){tp} batch={batch} context={context} new={args.new}: "
                  f"prefill {result['prefill_tokens_per_s']:.0f} tok/s, decode {result['decode_tokens_per_s']:.1f} "
                  f"tok/s (latent cache {result['kv_cache_bytes_per_token']} B/token, peak RSS "
                  f"{result['peak_rss_mb']:.0f} MB, loaded in {load_s:.1f} s, warm-up {warm_up_s:.1f} s)",
                  flush=True)
    return 0
