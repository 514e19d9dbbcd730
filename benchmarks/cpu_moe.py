"""SwiGLU experts on the CPU, one MoE layer (or one MLP), three ways over the same bf16 weights:

- loop: ExpertGroup's grouping with one torch matmul pair per expert that got tokens (plain weights; what the "plain"
  plan ran before the kernel; for an MLP, its three linears);
- packed: the same loop over oneDNN-prepacked weights (the "packed" plan, model/packed.py);
- kernel: the C++ kernel over all experts in one call (kernels/moe_cpu.cpp).

    python benchmarks/cpu_moe.py [--out benchmarks/results/cpu-moe-mini.json]               # the mini bench model
    python benchmarks/cpu_moe.py --hidden 2048 --width 1408 --experts 64 --top-k 6           # V2-Lite's widths

Best of several interleaved rounds per case; prints a markdown table (ms per call, and the GB/s of weights the
call reads: every chosen expert once) and writes JSON with --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from dsv2.kernels import cpu_moe
from dsv2.model.moe import ExpertGroup
from dsv2.model.packed import _pack, _packed_linear


class Loop(ExpertGroup):
    def __init__(self, gate_up, down, packed: bool):
        super().__init__(gate_up.shape[0])
        self.pairs = [(_pack(gu), _pack(d)) if packed else (gu, d) for gu, d in zip(gate_up, down)]
        self.linear = _packed_linear if packed else F.linear

    def expert(self, e, x):
        gu, d = self.pairs[e]
        gate, up = self.linear(x, gu).chunk(2, dim=-1)
        return self.linear(F.silu(gate) * up, d)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--width", type=int, default=512, help="moe_intermediate_size")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--shared", type=int, default=2, help="shared experts (the MLP rows: one MLP this many wide)")
    ap.add_argument("--tokens", default="1,2,4,16,64,256")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if cpu_moe.kernel() is None:
        raise SystemExit(f"the kernel is not built here: {cpu_moe.unavailable_reason()}")
    H, I, E, K = a.hidden, a.width, a.experts, a.top_k
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(E, 2 * I, H, generator=g) * 0.02).bfloat16()
    down = (torch.randn(E, H, I, generator=g) * 0.02).bfloat16()
    Is = I * a.shared
    mlp_w = [(torch.randn(Is, H, generator=g) * 0.02).bfloat16(), (torch.randn(Is, H, generator=g) * 0.02).bfloat16(),
             (torch.randn(H, Is, generator=g) * 0.02).bfloat16()]
    loops = {"loop": Loop(gate_up, down, False), "packed": Loop(gate_up, down, True)}
    mlp_packed = (_pack(torch.cat(mlp_w[:2])), _pack(mlp_w[2]))
    rows = []
    with torch.inference_mode():
        for what in ("routed", "mlp"):
            for T in map(int, a.tokens.split(",")):
                x = torch.randn(T, H, generator=g).bfloat16()
                w, idx = torch.rand(T, E, generator=g).softmax(-1).topk(K, dim=-1)
                if what == "routed":
                    ways = {"loop": lambda: loops["loop"](x, w, idx), "packed": lambda: loops["packed"](x, w, idx),
                            "kernel": lambda: cpu_moe.swiglu_experts(x, gate_up[:, :I], gate_up[:, I:], down, w, idx)}
                    chosen = idx.unique().numel()
                    nbytes = chosen * 3 * I * H * 2
                else:
                    ways = {"loop": lambda: F.linear(F.silu(F.linear(x, mlp_w[0])) * F.linear(x, mlp_w[1]), mlp_w[2]),
                            "packed": lambda: _packed_linear(
                                (lambda gu: F.silu(gu[..., :Is]) * gu[..., Is:])(_packed_linear(x, mlp_packed[0])),
                                mlp_packed[1]),
                            "kernel": lambda: cpu_moe.mlp(x, *mlp_w)}
                    nbytes = 3 * Is * H * 2
                calls = max(3, int(2e8 // nbytes))
                best = {k: float("inf") for k in ways}
                for _ in range(a.rounds):
                    for k, f in ways.items():
                        f()
                        t = time.perf_counter()
                        for _ in range(calls):
                            f()
                        best[k] = min(best[k], (time.perf_counter() - t) / calls)
                rows.append({"what": what, "tokens": T, "weight_mb": nbytes / 1e6,
                             **{f"{k}_ms": v * 1e3 for k, v in best.items()},
                             **{f"{k}_gbs": nbytes / v / 1e9 for k, v in best.items()}})
                print(rows[-1], flush=True)
    head = (f"hidden {H}, {E} experts of width {I}, top-{K}; MLP width {Is}; bf16; {torch.get_num_threads()} threads; "
            f"{platform.processor() or platform.machine()}; bf16 dot instruction: {cpu_moe.bf16_dot()}")
    lines = [head, "", "| what | tokens | weights read MB | loop ms | packed ms | kernel ms | kernel GB/s | "
             "kernel vs loop | kernel vs packed |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['tokens']} | {r['weight_mb']:.1f} | {r['loop_ms']:.3f} | "
                     f"{r['packed_ms']:.3f} | {r['kernel_ms']:.3f} | {r['kernel_gbs']:.1f} | "
                     f"{r['loop_ms'] / r['kernel_ms']:.2f}x | {r['packed_ms'] / r['kernel_ms']:.2f}x |")
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": vars(a), "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
        with open(a.out.removesuffix(".json") + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
