"""`dsv2` command line: parses and dispatches; each command's work lives in its own subsystem.

    dsv2 info PATH [--json]          architecture, parameter counts, latent KV-cache size
    dsv2 generate [--model PATH] PROMPT...   stream completions
    dsv2 chat [--model PATH]         interactive chat
    dsv2 bench --model PATH ...      prefill / decode throughput
    dsv2 serve [--model PATH]        OpenAI-compatible HTTP server
    dsv2 tokenizer train / data prepare / train / export / evaluate / plot   pretraining
    dsv2 sft / grpo                  alignment: supervised fine-tuning (+ LoRA), GRPO
    dsv2 quantize IN OUT             write an int8 / int4 checkpoint that loads without re-quantizing
    dsv2 --help / dsv2 COMMAND --help
"""
from __future__ import annotations

import argparse
import sys

from . import grpo, info, quantize, run, serve, sft, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv2", description="DeepSeek-V2 on PyTorch: run, serve and train the DeepSeek-V2 family.",
        epilog="Run `dsv2 COMMAND --help` for the options of one command.")
    parser.add_argument("--version", action="version", version=f"dsv2 {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (info, run, serve, train, sft, grpo, quantize):
        module.register(sub)
    return parser


def _version() -> str:
    from .. import __version__
    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code = args.func(args) or 0
    except KeyboardInterrupt:
        code = 130
    except (ValueError, FileNotFoundError) as e:  # config / checkpoint / request errors speak for themselves
        print(f"dsv2 {args.command}: error: {e}", file=sys.stderr)
        code = 1
    return code


def entry() -> None:
    """The `dsv2` program (console script and `python -m dsv2.cli`): main(), then the process ends with its code.
    main() itself returns, so that code calling it in-process (tests, notebooks) carries on."""
    code = main()
    from ..parallel.launch import left_a_group
    if left_a_group():
        _exit_now(code)
    sys.exit(code)


def _exit_now(code: int) -> None:
    """End the process without the interpreter's teardown, for a process that took part in a process group. A
    rank that took part in a gloo group (torch 2.13) can abort at interpreter exit -- 'terminate called without an
    active exception', SIGABRT -- even after the group was destroyed at a barrier and every result was written, and
    torchrun then reports the whole job failed. Everything the program owes is on disk by now (checkpoints and
    metrics are written and closed); flush the streams and go."""
    import os
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
