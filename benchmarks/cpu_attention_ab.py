"""In-process A/B of two (or more) versions of the CPU decode attention kernel (kernels/mla_decode_cpu.cpp).

Each source file is built for this machine into the usual cache (kernels/cpu_build.py) and loaded side by side; the
calls of all versions are interleaved over the same query, paged bf16 cache and block tables, so that a VM's swings
between minutes hit every version alike (on the project's noisy 2-core VMs, separate runs minutes apart differ by
more than most kernel changes). Prints per case the 25th-percentile ms of each version and the largest difference
between their outputs.

    git show HEAD~1:src/dsv2/kernels/mla_decode_cpu.cpp > /tmp/before.cpp
    python benchmarks/cpu_attention_ab.py /tmp/before.cpp src/dsv2/kernels/mla_decode_cpu.cpp
"""
import argparse
import time

import torch

from dsv2.kernels import cpu_build, cpu_mla


def load(source: str):
    """The decode function of the library built from this version of the source (the signatures cpu_mla declares)."""
    lib = cpu_build.load(source, cpu_mla.SIGNATURES, f"cannot time {source}")
    if isinstance(lib, str):
        raise SystemExit(f"building {source} failed: {lib}")
    return lib.dsv2_mla_decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+", help="versions of mla_decode_cpu.cpp; the first is the reference")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--rope", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--cases", default="1x256,1x4096,16x256,16x1024", help="batch x context, comma-separated")
    ap.add_argument("--calls", type=int, default=30, help="timed calls per version and case")
    args = ap.parse_args()
    fns = [load(s) for s in args.sources]
    n, R, BS = args.heads, args.rank, args.block_size
    torch.manual_seed(0)
    print(f"heads {n}, latent {R} + rope {args.rope} (bf16 cache), blocks of {BS}, {torch.get_num_threads()} threads")
    print("| batch x context | query | " + " | ".join(f"v{j} ms" for j in range(len(fns))) + " | max diff |")
    print("|---|---|" + "---|" * len(fns) + "---|")
    for case in args.cases.split(","):
        B, L = (int(v) for v in case.split("x"))
        W = -(-L // BS)
        cache = torch.randn(B * W + 3, BS, R + args.rope).bfloat16()
        tables = torch.randperm(B * W + 3)[:B * W].view(B, W).to(torch.int32)
        lens = torch.full((B,), L, dtype=torch.int32)
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(B, n, R + args.rope).to(dtype)
            calls = [lambda f=f: cpu_mla.mla_decode_cpu(f, q, cache, tables, lens, R, 0.1) for f in fns]
            outs = [c() for c in calls]
            times = [[] for _ in calls]
            for _ in range(args.calls):
                for j, c in enumerate(calls):
                    t = time.perf_counter()
                    c()
                    times[j].append(time.perf_counter() - t)
            diff = max((o.float() - outs[0].float()).abs().max().item() for o in outs)
            cells = " | ".join(f"{sorted(t)[len(t) // 4] * 1e3:.3f}" for t in times)
            print(f"| {B} x {L} | {str(dtype)[6:]} | {cells} | {diff:.1e} |")


if __name__ == "__main__":
    main()
