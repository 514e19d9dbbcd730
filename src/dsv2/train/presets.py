"""Named model configurations for `dsv2 train --model NAME`: plain dicts of ModelConfig fields.

vocab_size and the bos/eos ids are taken from the tokenizer the data was prepared with, so one preset fits any
tokenizer. Anything else can be changed by passing a config.json instead (start from `dsv2 train --model NAME
--print-config`).
"""
from __future__ import annotations

from ..config import ModelConfig

PRESETS: dict[str, dict] = {
    # The 14.2M-parameter config of shared/bench/hf_train_bench.py (transformers' training-throughput anchor):
    # 1 dense + 5 MoE layers, 16 routed experts (top-2 of 4 groups, 2 groups kept) + 1 shared.
    "train-small": dict(
        vocab_size=8192, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=8, n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=2, n_group=4,
        topk_group=2, topk_method="group_limited_greedy", first_k_dense_replace=1, kv_lora_rank=64,
        q_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=2048,
        routed_scaling_factor=1.0, norm_topk_prob=False, aux_loss_alpha=0.001,
    ),
    # The model dsv2 ships (src/dsv2/assets/dsv2-tiny-stdlib, see MODEL_CARD.md): every DeepSeek-V2 part at
    # small scale -- MLA with a query low-rank projection, DeepSeekMoE with 2 shared + 16 fine-grained routed
    # experts (top-4), group-limited routing to M=3 of D=8 groups as in V2, and a YaRN rope_scaling block whose
    # factor 1.0 makes it the identity within the trained 512-token context (raise `factor` and
    # max_position_embeddings together to extend it, as V2 did from 4K to 128K with factor 40).
    "tiny-stdlib": dict(
        vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=64, num_hidden_layers=6,
        num_attention_heads=8, n_shared_experts=2, n_routed_experts=16, num_experts_per_tok=4, n_group=8,
        topk_group=3, topk_method="group_limited_greedy", first_k_dense_replace=1, kv_lora_rank=64,
        q_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=512,
        routed_scaling_factor=1.0, norm_topk_prob=False, aux_loss_alpha=0.003,
        rope_scaling={"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 512, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
    # tiny-stdlib's shape at a few hundred thousand parameters: smoke tests and CI.
    "debug": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, topk_method="group_limited_greedy", first_k_dense_replace=1, kv_lora_rank=16,
        q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=512,
        routed_scaling_factor=1.0, aux_loss_alpha=0.001,
        rope_scaling={"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 512, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
}


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)} (or pass a config.json)")
    return ModelConfig.from_dict(PRESETS[name])
