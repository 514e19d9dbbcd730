"""`dsv2 info PATH`: what a DeepSeek-V2 config describes -- works on a directory holding only config.json.
`dsv2 info --system`: what this machine runs fast, and the kernel each kind of matmul gets (dsv2.capability).

    dsv2 info ~/models/DeepSeek-V2-Lite-Chat
    dsv2 info --system                          # the default plan here: dtype auto, no quantization
    dsv2 info --system --quantization int8 --json
    DSV2_CPU_CAPABILITY=avx2 dsv2 info --system # what an AVX2 CPU gets
"""
from __future__ import annotations

import json
import os

from .run import QUANTIZATIONS


def register(sub) -> None:
    p = sub.add_parser("info", help="architecture summary, parameter counts and KV-cache size of a model",
                       description="Summarise a DeepSeek-V2 model from its config.json (no weights needed): "
                                   "layers, MLA and MoE shapes, total and per-token parameters, and the latent "
                                   "KV-cache bytes per token next to what a per-head K/V cache would take.")
    p.add_argument("path", nargs="?", default=None,
                   help="model directory or config.json (default: the model shipped with dsv2)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--system", action="store_true",
                   help="describe this machine instead: CPU capability (as checked, not assumed), and the weight "
                        "format and kernel each kind of matmul gets for --device / --dtype / --quantization")
    p.add_argument("--device", default=None, help="with --system: cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="with --system: the dtype to plan for (default auto)")
    p.add_argument("--quantization", default=None, choices=list(QUANTIZATIONS),
                   help="with --system: the plan for int8 / int4 weights")
    p.set_defaults(func=run)


def describe(path: str) -> dict:
    from ..checkpoint import resolve_model_path
    from ..config import ModelConfig
    if not os.path.isfile(path):
        path = resolve_model_path(path)
    cfg = ModelConfig.from_pretrained(path)
    counts = cfg.param_counts()
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    from ..engine.kv_cache import latent_bytes_per_token
    latent, full = cfg.kv_cache_bytes_per_token(2), cfg.full_kv_cache_bytes_per_token(2)
    fp8 = latent_bytes_per_token(cfg, kv_cache_dtype="fp8")
    return {
        "path": path,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "dense_layers": cfg.num_hidden_layers - moe_layers, "moe_layers": moe_layers,
        "num_attention_heads": cfg.num_attention_heads, "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok, "topk_method": cfg.topk_method,
        "n_group": cfg.n_group, "topk_group": cfg.topk_group, "routed_scaling_factor": cfg.routed_scaling_factor,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
        "rope": cfg.rope_type, "rope_scaling": cfg.rope_scaling, "softmax_scale": cfg.softmax_scale,
        "total_params": counts["total"], "activated_params": counts["activated"],
        "kv_cache_bytes_per_token": latent, "kv_cache_bytes_per_token_fp8": fp8,
        "per_head_kv_cache_bytes_per_token": full,
        "kv_cache_reduction": full / latent,
        "bf16_weight_bytes": 2 * counts["total"],
        "quantization": _quantization(path),
    }


def _quantization(path: str) -> dict | None:
    """config.json's quantization_config when `dsv2 quantize` wrote the directory, with the weights' bytes on disk."""
    from ..engine.quantized_checkpoint import quantization_config
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    quant = quantization_config(directory)
    if quant is None:
        return None
    weights = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    return {**quant, "weight_bytes": sum(os.path.getsize(os.path.join(directory, f)) for f in weights) or None}


def describe_system(device: str | None = None, dtype: str = "auto", quantization: str | None = None) -> dict:
    import torch
    from ..capability import cpu_capability, inference_plan
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = {"torch": torch.__version__, "cpu": cpu_capability().as_dict(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        out["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    out["plan"] = inference_plan(device, dtype, quantization).as_dict()
    from ..engine.compiled import compiler_unavailable_reason
    reason = compiler_unavailable_reason()
    out["compiled_decode"] = {"available": reason is None, "reason": reason or "a C++ compiler and Inductor are here"}
    if device == "cpu":
        from ..kernels import cpu_mla, cpu_moe
        # each builds its kernel if it is not in the cache yet (~1-2 s)
        out["decode_attention_kernel"] = _kernel_state(cpu_mla.unavailable_reason, cpu_mla.bf16_dot)
        out["decode_attention_kernel"]["amx"] = out["decode_attention_kernel"]["available"] and cpu_mla.amx()
        out["experts_kernel"] = _kernel_state(cpu_moe.unavailable_reason, cpu_moe.bf16_dot)
    return out


def _kernel_state(unavailable_reason, bf16_dot) -> dict:
    """One C++ CPU kernel's state: built or not (and why), and whether it uses bf16 dot-product instructions."""
    from ..kernels.cpu_build import arch_flags
    reason = unavailable_reason()
    return {"available": reason is None, "bf16_dot": reason is None and bf16_dot(),
            "reason": reason or f"built with {' '.join(arch_flags()) or 'the compiler defaults'}"}


def run_system(args) -> int:
    d = describe_system(args.device, args.dtype, args.quantization)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    cpu, plan = d["cpu"], d["plan"]
    yes = lambda key: ("yes" if cpu[key] else "no") + f": {cpu['reasons'][key]}"
    rows = [("torch", f"{d['torch']}, {d['threads']} threads"),
            ("cpu", f"{cpu['arch']}, level {cpu['level']} ({cpu['reasons']['level']})"),
            ("cpu flags", " ".join(cpu["flags"]) or "(not reported)"),
            ("oneDNN bf16", yes("onednn_bf16")),
            ("fast bf16 GEMM", yes("fast_bf16")),
            ("int8 GEMV kernel", yes("int8_gemv")),
            ("int4 kernel", yes("int4_kernel")),
            ("compiled decode", ("yes" if d["compiled_decode"]["available"] else "no")
             + f" (--compile): {d['compiled_decode']['reason']}")]
    for key, what, dot, fallback in (("decode_attention_kernel", "decode attention", "bf16 dot-product scores", "SDPA"),
                                      ("experts_kernel", "experts, decode", "bf16 dot products",
                                       "torch matmuls per expert")):
        if key in d:
            k = d[key]
            amx = ", AMX tiles for bf16" if k.get("amx") else ""
            rows.append((what, f"C++ kernel, {k['reason']}" + (f", {dot}" if k["bf16_dot"] else "") + amx
                         if k["available"] else f"{fallback} (the C++ kernel is not built: {k['reason']})"))
    if "cuda" in d:
        rows.append(("cuda", ", ".join(d["cuda"])))
    rows.append(("plan", f"{plan['device']}, dtype {args.dtype}"
                         + (f", {plan['quantization']}" if plan["quantization"] else "")
                         + f": weights {plan['weights']} ({plan['weight_dtype']} stored)"
                         + f", compute {plan['compute_dtype']}, latent cache {plan['cache_dtype']}"))
    rows += [(f"  {what}", how) for what, how in plan.get("formats", {}).items()]
    rows += [(f"  {kind}", kernel) for kind, kernel in plan["kernels"].items()]
    rows += [("note", n) for n in plan["notes"]]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def run(args) -> int:
    if args.system:
        return run_system(args)
    path = args.path
    if path is None:
        from ..assets import default_model_path
        path = default_model_path()
    d = describe(path)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    moe = (f"{d['n_routed_experts']} routed (top-{d['num_experts_per_tok']}, {d['topk_method']}"
           + (f", {d['topk_group']} of {d['n_group']} groups" if d["topk_method"] == "group_limited_greedy" else "")
           + f") + {d['n_shared_experts']} shared, routed_scaling_factor {d['routed_scaling_factor']}"
           if d["n_routed_experts"] else "none (dense)")
    rs = d["rope_scaling"]
    rope = d["rope"] + (f" (factor {rs.get('factor')}, original {rs.get('original_max_position_embeddings')})"
                        if rs and d["rope"] == "yarn" else "")
    rows = [
        ("model", d["path"]),
        ("layers", f"{d['num_hidden_layers']} ({d['dense_layers']} dense + {d['moe_layers']} MoE), hidden {d['hidden_size']}"),
        ("attention", f"MLA, {d['num_attention_heads']} heads, q_lora {d['q_lora_rank']}, kv_lora {d['kv_lora_rank']}, "
                      f"nope/rope/v {d['qk_nope_head_dim']}/{d['qk_rope_head_dim']}/{d['v_head_dim']}"),
        ("experts", moe),
        ("positions", f"{rope}, max {d['max_position_embeddings']:,}, softmax scale {d['softmax_scale']:.7f}"),
        ("vocabulary", f"{d['vocab_size']:,}"),
        ("parameters", f"{d['total_params']:,} total ({_human(d['total_params'])}), "
                       f"{d['activated_params']:,} per token ({_human(d['activated_params'])})"),
        ("weights (bf16)", _bytes(d["bf16_weight_bytes"])),
        *([("quantization", _describe_quantization(d["quantization"]))] if d["quantization"] else []),
        ("KV cache / token", f"{d['kv_cache_bytes_per_token']:,} B latent (bf16; "
                             f"{d['kv_cache_bytes_per_token_fp8']:,} B with --kv-cache-dtype fp8) vs "
                             f"{d['per_head_kv_cache_bytes_per_token']:,} B per-head K/V: {d['kv_cache_reduction']:.1f}x smaller"),
        ("KV cache, 128K ctx", f"{_bytes(d['kv_cache_bytes_per_token'] * 131072)} latent "
                               f"({_bytes(d['kv_cache_bytes_per_token_fp8'] * 131072)} fp8) vs "
                               f"{_bytes(d['per_head_kv_cache_bytes_per_token'] * 131072)} per-head"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _describe_quantization(q: dict) -> str:
    fmt = q["format"] + (f", groups of {q['group_size']} with a scale and zero each" if q.get("group_size") else
                         ", a scale per output row")
    int8 = f"; {', '.join(q['modules_in_int8'])} int8" if q.get("modules_in_int8") else ""
    size = f", {_bytes(q['weight_bytes'])} on disk" if q.get("weight_bytes") else ""
    return (f"{fmt}{int8} (written by dsv2 quantize {q.get('dsv2_version', '?')}{size}; embedding, norms, "
            f"router and kv_b_proj kept in {q.get('kept_dtype', 'bfloat16')}). Loads as stored; dsv2 only")


def _human(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
