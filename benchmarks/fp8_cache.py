"""Accuracy and speed of the FP8 latent cache (LLM(kv_cache_dtype="fp8")) against the bf16 cache, on one model.

    python benchmarks/fp8_cache.py /tmp/bench/mini
    python benchmarks/fp8_cache.py /tmp/bench/mini --out benchmarks/results/fp8-cache-mini.json \\
        --markdown benchmarks/results/fp8-cache-mini.md

Accuracy: the model is loaded once (dtype auto) and two engine runners share it, one with a bf16 latent cache, one
with the fp8 cache. For each context C, S sequences of Python standard-library source (tokenized by the model's
tokenizer; the bench model's tokenizer was trained on it) are prefilled C tokens deep, then the next P tokens are
teacher-forced one decode step at a time, all S in one batch: absorbed attention over the paged cache, exactly as
generation runs (ModelRunner.forced_logits). At each forced position: KL(bf16 || fp8) of the next-token
distributions, whether their top-1 tokens agree, and |delta log p| of the bf16 top-1 token. The prefill's own
positions are not scored (a prefill without a cached prefix attends to its exact latents in either cache).

Speed: one sequence prefilled --speed-context (4096) tokens deep in a runner with each cache, then --steps decode
steps, the two runners' steps alternating so that a busy machine slows both alike; the median step counts (decode
tok/s = 1 / median). A step is ModelRunner.execute: the model over the paged cache, what the cache dtype changes;
the scheduler and sampler around it are the same for both.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import sysconfig
import time

import torch

from dsv2 import LLM
from dsv2.engine.kv_cache import latent_bytes_per_token
from dsv2.engine.runner import ModelRunner, StepInputs

CACHES = ("auto", "fp8")  # "auto": the plan's cache dtype, bf16 with dtype auto


def stdlib_tokens(tokenizer, n: int) -> list[int]:
    """At least n tokens of CPython's standard library source, the files in sorted order."""
    ids: list[int] = []
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            ids += tokenizer.encode(f.read())
        if len(ids) >= n:
            return ids[:n]
    raise SystemExit(f"the standard library gave only {len(ids)} tokens, {n} are needed")


def compare(llm: LLM, tokens: list[int], context: int, sequences: int, positions: int, block_size: int = 16) -> dict:
    """bf16 (auto) vs fp8 cache at one context: S windows of C + P tokens, teacher-forced through each runner."""
    span = context + positions
    windows = [tokens[s * span:(s + 1) * span] for s in range(sequences)]
    prompts, forced = [w[:context] for w in windows], [w[context:] for w in windows]
    blocks = sequences * -(-span // block_size)
    logp = {}
    for kv in CACHES:
        runner = ModelRunner(llm.model, blocks, block_size, llm.plan.cache_dtype, kv)
        rows = runner.forced_logits(prompts, forced)  # per sequence [1 + P, V]; row 0 is the prefill's
        logp[kv] = torch.cat([r[1:] for r in rows]).log_softmax(-1)  # [S * P, V]
        del runner
    ref, fp8 = logp["auto"], logp["fp8"]
    kl = (ref.exp() * (ref - fp8)).sum(-1)  # [S * P]
    top = ref.argmax(-1)
    dtop = (ref.gather(1, top[:, None]) - fp8.gather(1, top[:, None])).abs()
    return {"context": context, "sequences": sequences, "positions": int(kl.numel()),
            "kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
            "top1_agreement": (fp8.argmax(-1) == top).float().mean().item(),
            "top1_logprob_delta_mean": dtop.mean().item(), "top1_logprob_delta_max": dtop.max().item()}


def decode_speed(llm: LLM, tokens: list[int], context: int, steps: int, block_size: int = 16) -> dict:
    """Median ms of one decode step `context` tokens deep with each cache, the runners' steps interleaved."""
    table = list(range(-(-(context + steps) // block_size)))
    runners = {kv: ModelRunner(llm.model, len(table), block_size, llm.plan.cache_dtype, kv) for kv in CACHES}
    for runner in runners.values():
        runner.execute(StepInputs(tokens[:context], [0], [context], [table], 0, [context - 1], [0], {}))
    seconds = {kv: [] for kv in CACHES}
    for i in range(steps):
        for kv, runner in runners.items():
            t = time.perf_counter()
            runner.execute(StepInputs([tokens[context + i]], [context + i], [1], [table], 1, [0], [0], {}))
            seconds[kv].append(time.perf_counter() - t)
    return {kv: {"decode_ms_median": 1e3 * statistics.median(s), "decode_ms_min": 1e3 * min(s),
                 "decode_tokens_per_s": 1 / statistics.median(s)} for kv, s in seconds.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--contexts", default="256,1024,4096")
    ap.add_argument("--sequences", default="8,3,2", help="sequences per context (batched in each decode step)")
    ap.add_argument("--positions", type=int, default=48, help="teacher-forced decode positions per sequence")
    ap.add_argument("--speed-context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed with each cache")
    ap.add_argument("--out", default=None, help="write the JSON here (else print it)")
    ap.add_argument("--markdown", default=None, help="write the markdown table here (else print it)")
    a = ap.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    sequences = [int(s) for s in a.sequences.split(",")]
    longest = max(contexts + [a.speed_context]) + max(a.positions, a.steps) + 16
    result = {"model": a.model, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "load_average_start": os.getloadavg(), "accuracy": [], "speed": {}}

    llm = LLM(a.model, max_model_len=longest, kv_cache_memory=64 << 20, max_num_seqs=4)
    result["plan"] = llm.plan.as_dict()
    tokens = stdlib_tokens(llm.tokenizer, max([(c + a.positions) * s for c, s in zip(contexts, sequences)]
                                              + [a.speed_context + a.steps]))
    for context, seqs in zip(contexts, sequences):
        t = time.perf_counter()
        row = compare(llm, tokens, context, seqs, a.positions)
        row["seconds"] = time.perf_counter() - t
        result["accuracy"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    result["speed"] = decode_speed(llm, tokens, a.speed_context, a.steps)
    for kv in CACHES:
        result["speed"][kv]["kv_cache_bytes_per_token"] = latent_bytes_per_token(llm.config, llm.plan.cache_dtype, kv)
    print(json.dumps(result["speed"]), file=sys.stderr, flush=True)
    result["load_average_end"] = os.getloadavg()

    auto, fp8 = result["speed"]["auto"], result["speed"]["fp8"]
    lines = ["| context | positions (sequences x forced) | KL(bf16 \\|\\| fp8) mean | KL max | top-1 agreement | "
             "mean \\|delta log p\\| of the top-1 | max |", "|---|---|---|---|---|---|---|"]
    for r in result["accuracy"]:
        lines.append(f"| {r['context']} | {r['positions']} ({r['sequences']} x {r['positions'] // r['sequences']}) | "
                     f"{r['kl_mean']:.2e} | {r['kl_max']:.2e} | {100 * r['top1_agreement']:.1f}% | "
                     f"{r['top1_logprob_delta_mean']:.4f} | {r['top1_logprob_delta_max']:.4f} |")
    lines += ["", "| cache | bytes / token (all layers) | decode ms / step, median (min) | decode tok/s |",
              "|---|---|---|---|"]
    for kv, name in (("auto", f"{result['plan']['cache_dtype']} (auto)"), ("fp8", "fp8")):
        s = result["speed"][kv]
        lines.append(f"| {name} | {s['kv_cache_bytes_per_token']:,} | {s['decode_ms_median']:.1f} "
                     f"({s['decode_ms_min']:.1f}) | {s['decode_tokens_per_s']:.2f} |")
    lines += ["", f"Decode {a.speed_context} tokens deep, 1 sequence, {a.steps} steps with each cache; fp8 holds "
                  f"{auto['kv_cache_bytes_per_token'] / fp8['kv_cache_bytes_per_token']:.2f}x the tokens per byte. "
                  f"Load average {result['load_average_start'][0]:.2f} at the start, "
                  f"{result['load_average_end'][0]:.2f} at the end."]
    markdown = "\n".join(lines)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown + "\n")
    print(markdown)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
    else:
        print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
