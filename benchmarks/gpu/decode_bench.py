"""Decode and prefill speed of the CUDA path on the full-size DeepSeek-V2-Lite shape, with the HBM bandwidth each
decode step achieves, and the Triton MLA kernel alone. The model is built on the GPU with random bf16 weights (no
checkpoint to write or read: seconds instead of minutes); the latent cache holds random latents (decode reads the
same bytes whatever they are). Steps go straight to the ModelRunner, eager and with CUDA graphs, so the times are
the model's, without the scheduler and sampler. Run by benchmarks/gpu/run.sh:

    PYTHONPATH=src python benchmarks/gpu/decode_bench.py --out DIR                 # 27 layers, ~31 GB
    PYTHONPATH=src python benchmarks/gpu/decode_bench.py --out DIR --layers 4      # same widths, a quick look

Bytes a decode step must read: every weight it multiplies (attention with W_UK / W_UV^T instead of kv_b_proj,
dense MLP, shared experts, routers, lm_head; the embedding's B rows are left out), each routed expert that at least
one of the B tokens chose (counted per layer from one eager step's routing), and the B contexts' latents. Achieved
bandwidth = those bytes / step time, against --peak-tbs (the H200's 4.8 TB/s) and a measured device copy.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from dsv2.capability import inference_plan
from dsv2.config import ModelConfig
from dsv2.engine.runner import ModelRunner, StepInputs
from dsv2.kernels.triton_mla import mla_decode, paged_slots
from dsv2.model import build_model
from dsv2.model.inference import prepare_for_inference
from dsv2.model.mla import Fp8Latent
from dsv2.model.moe import Gate

BS = 16  # block size


def cuda_time(fn, reps: int, warmup: int = 3) -> float:
    """Mean seconds per call, by CUDA events around `reps` back-to-back calls (wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():  # --device cpu: a dry run of this script's logic
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def copy_bandwidth(device) -> float:
    """Device-to-device copy, bytes read + written per second: the practical roof for a memory-bound step."""
    x = torch.empty(1 << 30 if device.type == "cuda" else 1 << 24, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x), 10)
    return 2 * x.numel() / t


def decode_weight_bytes(model) -> tuple[int, int]:
    """(bytes every decode step reads apart from routed experts, bytes of one routed expert)."""
    fixed, expert = 0, 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "embed_tokens" in name or name.endswith("kv_b_proj.weight"):  # rows gathered / prefill only
            continue
        if ".experts." in name and "shared" not in name:
            expert += t[0].numel() * t.element_size()  # one expert's slice of the stacked [E, ...] tensor
            continue
        fixed += t.numel() * t.element_size()
    moe_layers = sum(model.config.is_moe_layer(i) for i in range(model.config.num_hidden_layers))
    return fixed, expert // max(moe_layers, 1)


def decode_step(batch: int, context: int, width: int) -> StepInputs:
    """batch sequences, each at `context` tokens, decoding one more; sequence i owns blocks i*W .. i*W+W-1."""
    tables = [list(range(i * width, i * width + -(-(context + 1) // BS))) for i in range(batch)]
    return StepInputs(token_ids=[7 + i for i in range(batch)], starts=[context] * batch, num_new=[1] * batch,
                      block_tables=tables, num_decode=batch, logits_indices=list(range(batch)),
                      sample_rows=list(range(batch)), prompt_rows={})


def experts_touched(model, runner, step) -> list[int]:
    """Per MoE layer, how many distinct routed experts the step's tokens chose (one eager step, hooks on the
    routers)."""
    counts = []
    hooks = [m.register_forward_hook(lambda m, i, out: counts.append(int(out[1].unique().numel())))
             for m in model.modules() if isinstance(m, Gate)]
    try:
        runner._execute_staged(step)
    finally:
        for h in hooks:
            h.remove()
    return counts


def bench_decode(model, cfg, batch, context, steps, fixed, expert, graphs: bool) -> dict:
    width = -(-(context + 1) // BS)
    runner = ModelRunner(model, batch * width, BS, torch.bfloat16, enforce_eager=not graphs,
                         max_model_len=width * BS, max_num_seqs=max(batch, 1))
    for c in runner.kv_caches:
        c.normal_(0, 0.5)  # random latents: the bytes are what counts
    step = decode_step(batch, context, width)
    touched = experts_touched(model, runner, step)
    t = cuda_time(lambda: runner.execute(step), steps)
    cache_bytes = batch * context * cfg.kv_cache_bytes_per_token(2)
    total = fixed + sum(touched) * expert + cache_bytes
    out = {"batch": batch, "context": context, "cuda_graphs": runner.graphs is not None and runner.graphs.capture,
           "ms_per_step": t * 1e3, "tokens_per_s": batch / t, "bytes_per_step": total,
           "weight_bytes": fixed + sum(touched) * expert, "cache_bytes": cache_bytes,
           "experts_touched_per_layer": sum(touched) / max(len(touched), 1), "achieved_tb_s": total / t / 1e12}
    del runner
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def bench_mla_kernel(model, cfg, batch, context, fp8: bool) -> dict:
    """mla_decode alone on one layer's cache, and its twin (gather every slot + attend_latent)."""
    mla = model.model.layers[0].self_attn
    n, R, Dr = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    width = -(-context // BS)
    dev = model.model.embed_tokens.weight.device
    g = torch.Generator(device=dev).manual_seed(0)
    latent = torch.randn(batch * width * BS, R + Dr, device=dev, generator=g, dtype=torch.bfloat16)
    fmt = Fp8Latent(R, Dr) if fp8 else None
    cache = (fmt.quantize(latent) if fp8 else latent).view(batch * width, BS, -1)
    del latent
    tables = torch.arange(batch * width, device=dev, dtype=torch.int32).view(batch, width)
    lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    q = torch.randn(batch, n, R + Dr, device=dev, dtype=torch.bfloat16, generator=g)
    t = cuda_time(lambda: mla_decode(q, cache, tables, lens, R, mla.softmax_scale, fmt), 20)

    def twin():
        slots, pad = paged_slots(tables, lens, BS)
        rows = cache.view(-1, cache.shape[-1]).index_select(0, slots)
        ctx = (fmt.dequantize(rows) if fp8 else rows).view(batch, -1, R + Dr)
        return mla.attend_latent(q, ctx, pad)
    got, want = mla_decode(q, cache, tables, lens, R, mla.softmax_scale, fmt), twin()
    err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
    t_twin = cuda_time(twin, 5)
    read = batch * context * cache.shape[-1] * cache.element_size()
    return {"batch": batch, "context": context, "cache": "fp8" if fp8 else "bf16", "kernel_us": t * 1e6,
            "kernel_gb_s": read / t / 1e9, "twin_us": t_twin * 1e6, "max_rel_err_vs_twin": err}


def bench_prefill(model, tokens: int, reps: int) -> dict:
    width = -(-tokens // BS)
    runner = ModelRunner(model, width, BS, torch.bfloat16)
    step = StepInputs(list(range(2, tokens + 2)), [0], [tokens], [list(range(width))], 0, [tokens - 1], [0], {})
    t = cuda_time(lambda: runner.execute(step), reps, warmup=1)
    active = model.config.param_counts()["activated"]
    del runner
    return {"tokens": tokens, "ms": t * 1e3, "tokens_per_s": tokens / t,
            "matmul_tflop_s": 2 * active * tokens / t / 1e12}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs",
                                                     "DeepSeek-V2-Lite.json"))
    ap.add_argument("--layers", type=int, default=None, help="keep this many of the config's layers")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--context", type=int, default=1024, help="tokens already in each decoding sequence")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prefill", type=int, default=2048, help="tokens of the timed prefill chunk")
    ap.add_argument("--peak-tbs", type=float, default=4.8, help="the card's HBM bandwidth (H200: 4.8 TB/s)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the logic (needs TRITON_INTERPRET=1; tiny "
                    "--layers, --context and --prefill)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    cfg = ModelConfig.from_pretrained(args.config)
    if args.layers:
        cfg = cfg.replace(num_hidden_layers=args.layers)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model = prepare_for_inference(build_model(cfg, dtype=torch.bfloat16, device=args.device, seed=0),
                                      inference_plan(args.device, "bfloat16", cpu_weight_packing=False))
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    report = {"device": name, "torch": torch.__version__, "layers": cfg.num_hidden_layers,
              "build_s": time.perf_counter() - t0, "weights_gb": sum(p.numel() * p.element_size()
                                                                     for p in model.parameters()) / 1e9,
              "copy_tb_s": copy_bandwidth(device) / 1e12, "peak_tb_s": args.peak_tbs}
    print(f"built {cfg.num_hidden_layers} layers ({report['weights_gb']:.1f} GB) in {report['build_s']:.1f} s; "
          f"device copy {report['copy_tb_s']:.2f} TB/s", flush=True)
    fixed, expert = decode_weight_bytes(model)
    report["decode"], report["mla_kernel"] = [], []
    for b in [int(x) for x in args.batches.split(",")]:
        for graphs in (False, True):
            r = bench_decode(model, cfg, b, args.context, args.steps, fixed, expert, graphs)
            r["of_peak"] = r["achieved_tb_s"] / args.peak_tbs
            report["decode"].append(r)
            print(json.dumps(r), flush=True)
        for fp8 in (False, True):
            r = bench_mla_kernel(model, cfg, b, args.context if device.type == "cpu" else max(args.context, 4096),
                                 fp8)
            report["mla_kernel"].append(r)
            print(json.dumps(r), flush=True)
    report["prefill"] = bench_prefill(model, args.prefill, 3)
    print(json.dumps(report["prefill"]), flush=True)

    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"# CUDA path on {report['device']} (torch {report['torch']}), V2-Lite shape, {report['layers']} layers, "
             f"bf16, random weights", "",
             f"device copy {report['copy_tb_s']:.2f} TB/s (read + write); peak {args.peak_tbs} TB/s", "",
             "| batch | context | CUDA graphs | ms/step | tok/s | GB read/step | experts/layer | TB/s | of peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["decode"]:
        lines.append(f"| {r['batch']} | {r['context']} | {'yes' if r['cuda_graphs'] else 'no'} | "
                     f"{r['ms_per_step']:.2f} | {r['tokens_per_s']:.0f} | {r['bytes_per_step'] / 1e9:.2f} | "
                     f"{r['experts_touched_per_layer']:.1f} | {r['achieved_tb_s']:.2f} | {r['of_peak']:.0%} |")
    lines += ["", "| MLA kernel: batch | context | cache | us | GB/s | twin us | max rel err |",
              "|---|---|---|---|---|---|---|"]
    for r in report["mla_kernel"]:
        lines.append(f"| {r['batch']} | {r['context']} | {r['cache']} | {r['kernel_us']:.0f} | "
                     f"{r['kernel_gb_s']:.0f} | {r['twin_us']:.0f} | {r['max_rel_err_vs_twin']:.1e} |")
    p = report["prefill"]
    lines += ["", f"prefill, one {p['tokens']}-token chunk: {p['ms']:.1f} ms, {p['tokens_per_s']:.0f} tok/s, "
              f"~{p['matmul_tflop_s']:.0f} TFLOP/s in the activated weights' matmuls"]
    with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
