"""Absorbed MLA decode attention on the CPU, one layer, three ways over the same paged bf16 cache:

- twin: gather the context, convert it to fp32, scores / softmax / weighted sum as plain fp32 ops
  (mla.latent_attention, what decode ran before the kernel);
- sdpa: gather, then SDPA's fused CPU kernel with the heads as query positions (kernels/cpu_mla.py's fallback);
- kernel: the C++ flash-decoding kernel reading the cache through the block table (kernels/mla_decode_cpu.cpp);
  on a CPU with AMX tiles (Intel Sapphire Rapids and later) its tile path, and "vector" its vector path beside it.

    python benchmarks/cpu_attention.py [--heads 8 --rank 256 --rope 32] [--out benchmarks/results/cpu-attention.json]
    python benchmarks/cpu_attention.py --heads 16 --rank 512 --rope 64     # V2-Lite's widths

Best of several interleaved rounds per case; prints a markdown table (ms per call and the GB/s of cache read) and
writes JSON with --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from dsv2.kernels import cpu_mla, paged_slots
from dsv2.model.mla import latent_attention


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--rope", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--cases", default="1x256,1x4096,1x16384,16x256,16x4096", help="BATCHxCONTEXT,...")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    kernel = cpu_mla.decode_kernel()
    if kernel is None:
        raise SystemExit(f"the kernel is not built here: {cpu_mla.unavailable_reason()}")
    amx = cpu_mla.amx()

    def kernel_call(q, cache, tables, lens, R, scale, tiles):
        cpu_mla.USE_AMX = tiles
        try:
            return cpu_mla.mla_decode_cpu(kernel, q, cache, tables, lens, R, scale)
        finally:
            cpu_mla.USE_AMX = amx
    n, R, D, BS = a.heads, a.rank, a.rank + a.rope, a.block_size
    scale = D ** -0.5
    rows = []
    for case in a.cases.split(","):
        B, L = map(int, case.split("x"))
        W = -(-L // BS)
        g = torch.Generator().manual_seed(0)
        cache = torch.randn(B * W + 8, BS, D, generator=g).bfloat16()
        tables = torch.randperm(B * W + 8, generator=g)[:B * W].view(B, W).int()
        lens = torch.full((B,), L, dtype=torch.int32)
        q = torch.randn(B, n, D, generator=g).bfloat16()

        def gathered():
            slots, pad = paged_slots(tables, lens, BS)
            return cache.view(-1, D).index_select(0, slots).view(B, -1, D), pad

        ways = {
            "twin": lambda: latent_attention(q, *gathered(), R, scale),
            "sdpa": lambda: cpu_mla.latent_attention_sdpa(q, *gathered(), R, scale),
            "kernel": lambda: kernel_call(q, cache, tables, lens, R, scale, amx),
            **({"vector": lambda: kernel_call(q, cache, tables, lens, R, scale, False)} if amx else {}),
        }
        calls = max(3, int(2e8 // (B * L * D)))
        best = {k: float("inf") for k in ways}
        for _ in range(a.rounds):
            for k, f in ways.items():
                f()
                t = time.perf_counter()
                for _ in range(calls):
                    f()
                best[k] = min(best[k], (time.perf_counter() - t) / calls)
        cache_bytes = B * L * D * 2
        rows.append({"batch": B, "context": L, **{f"{k}_ms": v * 1e3 for k, v in best.items()},
                     **{f"{k}_gbs": cache_bytes / v / 1e9 for k, v in best.items()}})
    print(f"heads {n}, latent {R} + rope {a.rope} (bf16), blocks of {BS}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, kernel with AMX tiles: {amx}\n")
    vector = " vector path ms | kernel vs vector |" if amx else ""
    print(f"| batch x context | twin ms | sdpa ms | kernel ms | kernel GB/s | kernel vs twin | kernel vs sdpa |{vector}")
    print("|---|---|---|---|---|---|---|" + ("---|---|" if amx else ""))
    for r in rows:
        extra = f" {r['vector_ms']:.3f} | {r['vector_ms'] / r['kernel_ms']:.2f}x |" if amx else ""
        print(f"| {r['batch']} x {r['context']} | {r['twin_ms']:.3f} | {r['sdpa_ms']:.3f} | {r['kernel_ms']:.3f} | "
              f"{r['kernel_gbs']:.1f} | {r['twin_ms'] / r['kernel_ms']:.2f}x | {r['sdpa_ms'] / r['kernel_ms']:.2f}x |{extra}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"heads": n, "rank": R, "amx": amx, "rope": a.rope, "block_size": BS, "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
