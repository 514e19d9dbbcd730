"""generation_config.json supplies the sampling knobs a request or the command line leaves out (as in vLLM):
temperature, top_p, top_k, min_p, repetition_penalty; what the user gives always wins."""
from __future__ import annotations

import argparse
from types import SimpleNamespace

from dsv2.cli.run import _params, _sampling_args
from dsv2.serve.protocol import ChatCompletionRequest, CompletionRequest

GEN = {"do_sample": True, "temperature": 0.3, "top_p": 0.95, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}


def _knobs(p):
    return p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty


def test_server_requests_fall_back_to_generation_config():
    req = CompletionRequest(prompt="x")
    assert _knobs(req.sampling_params(GEN, max_tokens=8)) == (0.3, 0.95, 20, 0.05, 1.1)
    assert _knobs(req.sampling_params({}, max_tokens=8)) == (1.0, 1.0, 0, 0.0, 1.0)  # no file: everything off
    given = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], temperature=0.0, top_p=0.5, top_k=3,
                                  min_p=0.0, repetition_penalty=1.0)
    assert _knobs(given.sampling_params(GEN, max_tokens=8)) == (0.0, 0.5, 3, 0.0, 1.0)


def test_cli_falls_back_to_generation_config():
    ap = argparse.ArgumentParser()
    _sampling_args(ap)
    llm = SimpleNamespace(generation_defaults=GEN)
    assert _knobs(_params(ap.parse_args([]), llm)) == (0.3, 0.95, 20, 0.05, 1.1)
    args = ap.parse_args(["--temperature", "0", "--top-k", "0", "--repetition-penalty", "1.3", "--min-p", "0.2"])
    assert _knobs(_params(args, llm)) == (0.0, 0.95, 0, 0.2, 1.3)
