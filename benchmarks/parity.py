"""How close dsv2 is to transformers.DeepseekV2ForCausalLM: max |logit difference| over every position.

    python benchmarks/parity.py [--seq 256]

Random tiny checkpoints written by transformers (the published key layout), loaded by both; fp32 and bf16; the
YaRN cases run 8x past original_max_position_embeddings. bf16 is measured against transformers fp32 for both
implementations (bf16 rounding can flip near-tied expert choices, so two bf16 runs are compared through fp32).
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

import dsv2

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
BASE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, n_shared_experts=2, n_routed_experts=16, num_experts_per_tok=4,
            first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
            max_position_embeddings=4096)
CASES = {
    "V2-Lite-like: q_proj, greedy, plain rope": dict(q_lora_rank=None, topk_method="greedy"),
    "V2-like: q_lora, group-limited, scale 16, YaRN": dict(q_lora_rank=48, topk_method="group_limited_greedy",
                                                           n_group=4, topk_group=2, routed_scaling_factor=16.0,
                                                           rope_parameters=YARN),
    "q_proj, greedy, YaRN": dict(q_lora_rank=None, topk_method="greedy", rope_parameters=YARN),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=256)
    a = ap.parse_args()
    print("| case | fp32: dsv2 vs transformers, max abs diff | fp32 logit scale | bf16 vs fp32, dsv2 (max / mean) | "
          "bf16 vs fp32, transformers (max / mean) |")
    print("|---|---|---|---|---|")
    for name, kw in CASES.items():
        torch.manual_seed(0)
        kw = {**BASE, **kw}
        kw.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0})
        hf = DeepseekV2ForCausalLM(DeepseekV2Config(**kw)).eval()
        with torch.no_grad():
            for n, p in hf.named_parameters():
                p.copy_(1 + 0.1 * torch.randn_like(p) if n.endswith("norm.weight") else 0.06 * torch.randn_like(p))
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            ours32, ours16 = dsv2.load_model(d), dsv2.load_model(d, dtype=torch.bfloat16)
            hf16 = DeepseekV2ForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
        ids = torch.randint(0, kw["vocab_size"], (2, a.seq), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref32, ref16 = hf(ids).logits.float(), hf16(ids).logits.float()
            d32 = (ours32(ids) - ref32).abs().max().item()
            e16, h16 = (ours16(ids) - ref32).abs(), (ref16 - ref32).abs()
        print(f"| {name} | {d32:.2e} | {ref32.abs().max().item():.1f} | {e16.max().item():.2e} / {e16.mean().item():.2e} | "
              f"{h16.max().item():.2e} / {h16.mean().item():.2e} |")


if __name__ == "__main__":
    main()
