"""Where a decode step's time goes: weight matmuls vs attention vs small ops vs Python/engine overhead.

    python benchmarks/decode_profile.py /tmp/bench-mini [--batch 1] [--context 256] [--steps 20]
    python benchmarks/decode_profile.py ~/models/v2-lite-4l --quantization int4 --kv-cache-memory 1GiB

Runs the engine to steady decode, times `steps` plain steps (wall clock), then profiles the same number of steps
with torch.profiler and groups operator self-time into categories. "Python and dispatch" is the wall time no
operator accounts for. Prints a markdown table and the top operators.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from dsv2.engine.llm import LLM
from dsv2.engine.sampling_params import SamplingParams

CATEGORIES = [  # first match wins
    ("weight matmuls (packed / linear)", ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear")),
    ("quantized matmuls (int8 / int4 kernels)", ("aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm")),
    ("attention (bmm, softmax, gather)", ("aten::bmm", "aten::_softmax", "aten::index_select", "aten::index_copy_",
                                          "aten::masked_fill_", "aten::_scaled_dot_product")),
    ("MoE routing (topk, sort, scatter)", ("aten::topk", "aten::sort", "aten::argsort", "aten::bincount",
                                           "aten::index_add_", "aten::scatter_add_", "aten::_local_scalar_dense")),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--quantization", choices=("int8", "int4"), default=None)
    ap.add_argument("--kv-cache-memory", default=None, help="e.g. 1GiB (default: the engine's sizing)")
    a = ap.parse_args()
    llm = LLM(a.model, max_num_seqs=a.batch, quantization=a.quantization, kv_cache_memory=a.kv_cache_memory)
    params = SamplingParams(temperature=0, max_tokens=3 * a.steps + 8, ignore_eos=True)
    for b in range(a.batch):
        llm.add_request(np.random.default_rng(b).integers(2, llm.config.vocab_size, a.context).tolist(), params)
    for _ in range(4):  # prefill and warm-up
        llm.step()
    t = time.perf_counter()
    for _ in range(a.steps):
        llm.step()
    wall = (time.perf_counter() - t) / a.steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            llm.step()
    events = [e for e in prof.key_averages() if e.key.startswith(("aten::", "mkldnn::"))]
    totals = {name: 0.0 for name, _ in CATEGORIES}
    totals["other operators"] = 0.0
    for e in events:
        for name, keys in CATEGORIES:
            if e.key in keys or any(e.key.startswith(k) for k in keys):
                totals[name] += e.self_cpu_time_total
                break
        else:
            totals["other operators"] += e.self_cpu_time_total
    per_step = {k: v / a.steps / 1e3 for k, v in totals.items()}  # ms
    ops = sum(per_step.values())
    print(f"decode step, batch {a.batch}, context {a.context}: {wall * 1e3:.2f} ms wall "
          f"({a.batch / wall:.1f} tok/s); operators account for {ops:.2f} ms (profiled run)\n")
    print("| part | ms / step | share of wall |\n|---|---|---|")
    for k, v in per_step.items():
        print(f"| {k} | {v:.2f} | {100 * v / (wall * 1e3):.0f}% |")
    rest = wall * 1e3 - ops
    print(f"| Python, dispatch and engine bookkeeping | {max(rest, 0):.2f} | {100 * max(rest, 0) / (wall * 1e3):.0f}% |")
    n_ops = sum(e.count for e in events) / a.steps
    print(f"\n{n_ops:.0f} operator calls per step.\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=16))


if __name__ == "__main__":
    main()
