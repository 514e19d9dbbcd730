"""Weight-only int8 / int4, measured: what each quantized matmul path costs per row count, how fast a quantized model
prefills next to the plan's own bf16 one, and how far quantization moves the next-token distributions from bf16.

    python benchmarks/quant_kernels.py --out benchmarks/results/quant.json          # everything, markdown on stdout
    python benchmarks/quant_kernels.py --only kernels --rows 1,4,16,32,64,256       # where the kernels cross over
    python benchmarks/quant_kernels.py --only accuracy --model /tmp/bench/mini --positions 2048
    python benchmarks/quant_kernels.py --only bits --data /tmp/stdlib-data --out benchmarks/results/quant-bits.json
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 DSV2_CPU_CAPABILITY=avx2 \\
        python benchmarks/quant_kernels.py --only kernels,prefill                   # as on an AVX2 CPU

kernels: one weight matrix of each shape (the benchmark model's dense MLP 2816 x 1024, a V2-Lite expert's gate+up
  2816 x 2048, its down 2048 x 1408) through the module each plan builds for it (model/inference.py prepare_part:
  packed or upcast bf16, int8, int4), and each quantized path forced (kernel only / tiles only), plus torch._int_mm
  with activations quantized per row (a candidate for int8's many-row path). Best of --rounds interleaved rounds:
  on a shared machine every path gets the same chances. Reports ms, GFLOP/s and weight GB/s.
prefill: a full forward of one --prefill-tokens sequence through --model prepared by each plan (auto, int8, int4):
  the matmuls of prefill without the engine around them. Tokens/s, best of --rounds interleaved rounds.
accuracy: each quantization applied to the weights (quantize, dequantize: the same values the real modules multiply
  by) of a model loaded from its bf16 checkpoint, computed in fp32, against the unquantized model in fp32: mean
  KL(bf16 || quantized) in nats and top-1 agreement over --positions next-token positions of Python standard library
  source (each model's own tokenizer), for int8 and int4 at each group size, with lm_head / kv_b_proj / attention
  quantized or not. Models: the shipped dsv2-tiny-stdlib (trained), and --model (default /tmp/bench/mini if present,
  random weights: ../shared/bench/make_bench_model.py).
bits: held-out bits per byte of the shipped model through each plan's real modules (fp32, bf16, int8, int4) over the
  whole validation split of --data: `dsv2 data prepare $STDLIB --include '*.py' --exclude 'site-packages/*'
  --val-fraction 0.03 --tokenizer src/dsv2/assets/dsv2-tiny-stdlib --out /tmp/stdlib-data` (the recipe's split).

The load average is printed with every section: other processes on the machine slow all paths, but not evenly (a
busy 2-core machine makes torch's threads wait for each other, most in small ops). --threads 1 times the CPU time of
the one thread instead of the wall clock: slower numbers, but comparable between paths on a busy machine.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sysconfig
import time

import torch
from torch import nn

import dsv2
from dsv2.capability import cpu_capability, inference_plan
from dsv2.model.inference import prepare_for_inference, prepare_part
from dsv2.model.int4 import dequantize_groups, group_size_for, quantize_groups
from dsv2.model.moe import Experts
from dsv2.model.quant import dequantize_rows, quantize_rows
from dsv2.model.upcast import Workspace
from dsv2.tokenizer import Tokenizer

SHAPES = [(2816, 1024), (2816, 2048), (2048, 1408)]  # (N out, K in)
SHIPPED = os.path.join(os.path.dirname(dsv2.__file__), "assets", "dsv2-tiny-stdlib")


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def best_times(fns: dict, rounds: int) -> dict:
    """name -> best seconds over `rounds` interleaved rounds (one warm-up call each first). With one thread, the
    CPU time of that thread: what the path costs, whatever else the machine runs meanwhile."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    best = dict.fromkeys(fns, float("inf"))
    for f in fns.values():
        f()
    for _ in range(rounds):
        for name, f in fns.items():
            t = clock()
            f()
            best[name] = min(best[name], clock() - t)
    return best


# ---- kernels -------------------------------------------------------------------------------------------------------
def plan_module(plan, w: torch.Tensor) -> nn.Module:
    holder = nn.Module()
    holder.proj = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=plan.weight_dtype)
    holder.proj.weight.data = w.to(plan.weight_dtype)
    prepare_part(holder, plan, Workspace())
    return holder.proj


def int_mm_dynamic(q: torch.Tensor, scale: torch.Tensor):
    """int8 weights x activations quantized per row (symmetric) with torch._int_mm, scaled back to fp32."""
    qt = q.T

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        sx = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        xq = (x / sx).round_().clamp_(-127, 127).to(torch.int8)
        return torch._int_mm(xq, qt) * sx * scale
    return run


def kernels(rows: list[int], rounds: int) -> list[dict]:
    auto, int8, int4 = (inference_plan("cpu", "auto", q) for q in (None, "int8", "int4"))
    compute = auto.compute_dtype
    out = []
    for N, K in SHAPES:
        w = (torch.randn(N, K, generator=torch.Generator().manual_seed(N + K)) * 0.02).bfloat16()
        mods = {f"bf16 ({auto.weights})": (plan_module(auto, w), N * K * 2), "int8": (plan_module(int8, w), N * K),
                "int4": (plan_module(int4, w), N * K // 2 + N * K // int4.group_size * 4)}
        q8, s8 = quantize_rows(w)
        m4, m8 = mods["int4"][0], mods["int8"][0]
        for r in rows:
            x = torch.randn(r, K, generator=torch.Generator().manual_seed(r)).to(compute)
            fns = {name: (lambda m=m: m(x)) for name, (m, _) in mods.items()}
            if int8.int8_kernel:
                fns["int8 tiles only"] = lambda: _forced_int8(m8, x)
            if int4.int4_kernel:
                fns["int4 kernel only"] = lambda: _forced_int4(m4, x, 1 << 30)
                fns["int4 tiles only"] = lambda: _forced_int4(m4, x, 0)
            fns["int8 _int_mm dynamic"] = lambda f=int_mm_dynamic(q8, s8): f(x)
            best = best_times(fns, rounds)
            nbytes = {**{k: b for k, (_, b) in mods.items()}, "int8 tiles only": N * K, "int8 _int_mm dynamic": N * K,
                      "int4 kernel only": mods["int4"][1], "int4 tiles only": mods["int4"][1]}
            for name, t in best.items():
                out.append(dict(N=N, K=K, rows=r, path=name, ms=round(t * 1e3, 3),
                                gflops=round(2 * r * N * K / t / 1e9, 1), weight_gbs=round(nbytes[name] / t / 1e9, 1)))
    return out


def _forced_int4(m, x, kernel_rows):
    from dsv2.model.int4 import int4_linear
    return int4_linear(x, m.qweight, m.scale_zeros, m.layout, m.out_features, m.bias, kernel_rows)


def _forced_int8(m, x):
    from dsv2.model.quant import int8_linear
    return int8_linear(x, m.qweight, m.qweight_scale, m.bias, None)


# ---- prefill -------------------------------------------------------------------------------------------------------
def prefill(model_dir: str, tokens: int, rounds: int) -> list[dict]:
    out = []
    ids = torch.randint(2, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    models = {}
    for name, q in (("auto", None), ("int8", "int8"), ("int4", "int4")):
        plan = inference_plan("cpu", "auto", q)
        models[name] = (plan, prepare_for_inference(dsv2.load_model(model_dir, dtype=plan.weight_dtype), plan))
    with torch.inference_mode():
        best = best_times({name: (lambda m=m: m(ids)) for name, (_, m) in models.items()}, rounds)
    for name, t in best.items():
        plan = models[name][0]
        out.append(dict(model=os.path.basename(model_dir.rstrip("/")), plan=name, weights=plan.weights,
                        compute=str(plan.compute_dtype).removeprefix("torch."), tokens=tokens,
                        tokens_per_s=round(tokens / t, 1), ms=round(t * 1e3, 1)))
    return out


# ---- accuracy ------------------------------------------------------------------------------------------------------
def matrices(model: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """name -> (kind, weight) for every matrix a quantized plan may quantize (the router and embedding excluded)."""
    out = {}
    for name, m in model.named_modules():
        last = name.split(".")[-1]
        if isinstance(m, nn.Linear) and last != "gate":
            kind = {"lm_head": "lm_head", "kv_b_proj": "kv_b_proj"}.get(last, "attention" if "self_attn" in name
                                                                          else "mlp")
            out[name] = (kind, m.weight)
        elif isinstance(m, Experts):
            out[name + ".gate_up_proj"] = ("experts", m.gate_up_proj)
            out[name + ".down_proj"] = ("experts", m.down_proj)
    return out


def ggml_q(m: torch.Tensor, bits: int) -> torch.Tensor:
    """llama.cpp's Q4_0 / Q8_0 (blocks of 32 along K, one fp16 scale each, symmetric), emulated: quantize and
    dequantize [N, K] the way ggml-quants.c does (quantize_row_q4_0_ref, quantize_row_q8_0_ref)."""
    b = m.float().view(m.shape[0], -1, 32)
    if bits == 4:  # d = the signed value of largest magnitude / -8; codes trunc(x / d + 8.5) clamped to 15
        big = b.gather(-1, b.abs().argmax(-1, keepdim=True))
        d = (big / -8).half().float()
        q = (b / torch.where(d == 0, 1, d) + 8.5).trunc().clamp(0, 15)
        return ((q - 8) * d).view_as(m)
    d = (b.abs().amax(-1, keepdim=True) / 127).half().float()
    return ((b / torch.where(d == 0, 1, d)).round() * d).view_as(m)


def fake_quantize(w: torch.Tensor, bits, group: int) -> torch.Tensor:
    """w with each matrix (of a stack: one at a time) replaced by its quantized-then-dequantized values."""
    out = torch.empty_like(w)
    for i, m in enumerate(w.view(-1, *w.shape[-2:])):
        if bits in ("q4_0", "q8_0"):
            out.view(-1, *w.shape[-2:])[i] = ggml_q(m, int(bits[1]))
        elif bits == 8:
            q, s = quantize_rows(m)
            out.view(-1, *w.shape[-2:])[i] = dequantize_rows(q, s, torch.float32)
        else:
            q, sz = quantize_groups(m, group_size_for(m.shape[1], group))
            out.view(-1, *w.shape[-2:])[i] = dequantize_groups(q, sz)
    return out


# (label, {kind: bits}, group): kinds absent stay bf16
CONFIGS = [
    ("int8 (all but kv_b_proj)", dict(attention=8, mlp=8, experts=8, lm_head=8), 0),
    ("int8 + kv_b_proj", dict(attention=8, mlp=8, experts=8, lm_head=8, kv_b_proj=8), 0),
] + [(f"int4 g{g}, lm_head {h}", dict(attention=4, mlp=4, experts=4, lm_head={"int4": 4, "int8": 8}.get(h)), g)
     for g in (32, 64, 128) for h in ("int4", "int8", "bf16")] + [
    ("int4 g64 experts+mlp only, rest int8", dict(attention=8, mlp=4, experts=4, lm_head=8), 64),
    ("int4 g64 + kv_b_proj int4, lm_head int8", dict(attention=4, mlp=4, experts=4, lm_head=8, kv_b_proj=4), 64),
    # llama.cpp at the same bits (its formats emulated; its Q4_0 files keep output.weight in Q6_K, here Q8_0)
    ("llama.cpp Q8_0 (emulated), all matrices", dict.fromkeys(("attention", "mlp", "experts", "lm_head",
                                                               "kv_b_proj"), "q8_0"), 0),
    ("llama.cpp Q4_0 (emulated), output Q8_0", dict(attention="q4_0", mlp="q4_0", experts="q4_0", lm_head="q8_0",
                                                     kv_b_proj="q4_0"), 0),
]


def text_ids(tok: Tokenizer, positions: int, seq: int) -> torch.Tensor:
    """[B, seq] token ids from standard library files (sorted, every 7th), B * (seq - 1) >= positions."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[::7]
    rows, need = [], -(-positions // (seq - 1))
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            ids = tok.encode(fh.read())
        rows += [ids[i:i + seq] for i in range(0, len(ids) - seq + 1, seq)][:2]
        if len(rows) >= need:
            break
    return torch.tensor(rows[:need])


def accuracy(model_dir: str, positions: int, seq: int) -> list[dict]:
    ids = text_ids(Tokenizer.from_pretrained(model_dir), positions, seq)
    model = dsv2.load_model(model_dir, dtype=torch.float32).eval()  # a bf16 checkpoint: the values are bf16's
    mats = matrices(model)
    originals = {name: w.detach().clone() for name, (_, w) in mats.items()}
    with torch.inference_mode():
        ref = model(ids)[:, :-1].float().log_softmax(-1)
    out = []
    for label, bits, group in CONFIGS:
        with torch.no_grad():
            for name, (kind, w) in mats.items():
                b = bits.get(kind)
                w.copy_(originals[name] if b is None else fake_quantize(originals[name], b, group))
        with torch.inference_mode():
            logp = model(ids)[:, :-1].float().log_softmax(-1)
        kl = (ref.exp() * (ref - logp)).sum(-1)
        out.append(dict(model=os.path.basename(model_dir.rstrip("/")), config=label, positions=kl.numel(),
                        kl=round(kl.mean().item(), 5), kl_p99=round(kl.flatten().quantile(0.99).item(), 4),
                        top1=round((logp.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4)))
        print(f"  {out[-1]}", flush=True)
    return out


def bits_per_byte(model_dir: str, data: str, seq: int, plans: list[str]) -> list[dict]:
    """Held-out bits per byte of model_dir over the whole validation split of `data` (`dsv2 data prepare` with the
    model's tokenizer), through the modules each plan really builds (load_for_inference: int8 / int4 kernels and
    tiles, bf16 compute), against the fp32 model."""
    from dsv2.engine.prepare import load_for_inference
    from dsv2.train.data import TokenShards
    from dsv2.train.evaluate import evaluate
    shards = TokenShards(data, "validation")
    out = []
    for name in plans:
        t = time.perf_counter()
        model = dsv2.load_model(model_dir) if name == "fp32" else load_for_inference(
            model_dir, inference_plan("cpu", "auto", None if name == "bf16" else name))
        r = evaluate(model, shards, seq, batch_size=8)
        out.append(dict(model=os.path.basename(model_dir.rstrip("/")), plan=name, tokens=r["tokens"],
                        loss=round(r["loss"], 4), bits_per_byte=round(r["bits_per_byte"], 4),
                        seconds=round(time.perf_counter() - t)))
        print(f"  {out[-1]}", flush=True)
    return out


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="kernels,prefill,accuracy", help="comma-separated sections")
    ap.add_argument("--rows", default="1,16,256", help="row counts for the kernel section")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="/tmp/bench/mini" if os.path.isdir("/tmp/bench/mini") else None,
                    help="a second model for prefill and accuracy (bf16 checkpoint)")
    ap.add_argument("--prefill-tokens", type=int, default=256)
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=257, help="tokens per sequence in the accuracy section")
    ap.add_argument("--data", help="bits section: a `dsv2 data prepare` directory made with the shipped model's "
                                   "tokenizer (recipes/tiny-stdlib.sh's split: the same 3%% held out)")
    ap.add_argument("--bits-plans", default="fp32,bf16,int8,int4", help="plans of the bits section")
    ap.add_argument("--out", help="also write everything as JSON here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    only = set(a.only.split(","))
    cap = cpu_capability()
    result = {"torch": torch.__version__, "cpu": cap.as_dict(), "threads": a.threads,
              "plans": {q or "auto": inference_plan("cpu", "auto", q).as_dict() for q in (None, "int8", "int4")}}
    print(f"torch {torch.__version__}, CPU {cap.level} (torch {cap.torch_level}), {a.threads} threads")
    if "kernels" in only:
        result["kernels_load_before"] = load()
        result["kernels"] = kernels([int(r) for r in a.rows.split(",")], a.rounds)
        result["kernels_load_after"] = load()
        print(f"\n## Kernels (load average {result['kernels_load_before']} -> {result['kernels_load_after']})\n")
        print(table(result["kernels"]))
    models = [SHIPPED] + ([a.model] if a.model else [])
    if "prefill" in only:
        result["prefill_load_before"] = load()
        result["prefill"] = prefill(models[-1], a.prefill_tokens, a.rounds)  # (the shipped model is too small to
        # time: its ops last microseconds, and on a busy 2-core machine waits between threads dominate them)
        result["prefill_load_after"] = load()
        print(f"\n## Prefill (load average {result['prefill_load_before']} -> {result['prefill_load_after']})\n")
        print(table(result["prefill"]))
    if "accuracy" in only:
        result["accuracy"] = [r for m in models for r in accuracy(m, a.positions, a.seq)]
        print("\n## Accuracy against bf16 (fp32 compute)\n")
        print(table(result["accuracy"]))
    if "bits" in only:
        result["bits"] = bits_per_byte(SHIPPED, a.data, 512, a.bits_plans.split(","))
        print("\n## Held-out bits per byte, the shipped model\n")
        print(table(result["bits"]))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
