"""dsv2 vs transformers.DeepseekV2ForCausalLM (the oracle) on random tiny checkpoints, at every position."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, YARN, make_hf_model, to_published_format
from reference_impl import reference_logits

import dsv2
from dsv2.checkpoint import checkpoint_tensors
from dsv2.config import ModelConfig
from dsv2.model import build_model

FP32_TOL = 1e-4
T = 160  # 5x past original_max_position_embeddings=32 of the YaRN cases

CASES = {
    "mha-q_greedy_plain-rope": dict(q_lora_rank=None),
    "q-lora_group-limited_scaled_yarn": dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4,
                                             topk_group=2, routed_scaling_factor=2.5, rope=YARN),
    "mha-q_greedy_yarn_scale16": dict(q_lora_rank=None, routed_scaling_factor=16.0, rope=YARN),
    "q-lora_group-limited_top1-group": dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=2,
                                            topk_group=1, num_experts_per_tok=2, rope=YARN),
    # the reference applies mscale_all_dim to the softmax scale for any scaled rope, not only YaRN
    "linear-rope_mscale-all-dim": dict(rope={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0,
                                             "mscale_all_dim": 0.707}),
    "dynamic-rope_mscale-all-dim": dict(rope={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0,
                                              "mscale_all_dim": 0.707}, max_position_embeddings=64),
}


@pytest.mark.parametrize("fmt", ["transformers5", "published"])
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_parity_every_position(tmp_path, case, fmt):
    path, hf = make_hf_model(tmp_path / case, **CASES[case])
    if fmt == "published":
        to_published_format(path)
    model = dsv2.load_model(path)
    ids = torch.randint(0, 128, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ours = hf(ids).logits.float(), model(ids)
    assert ours.shape == (2, T, 128) and ours.dtype == torch.float32
    per_pos = (ref - ours).abs().amax(dim=(0, 2))  # [T]
    assert per_pos.max() <= FP32_TOL, f"worst position {per_pos.argmax()}: {per_pos.max():.2e}"
    assert ref.abs().max() > 1.0  # logits are far from trivial, so the tolerance means something


def test_yarn_softmax_scale_and_tables_match_the_spec():
    cfg = ModelConfig.from_pretrained(f"{__import__('conftest').REFERENCE}/configs/DeepSeek-V2")
    assert cfg.mscale == pytest.approx(1.260804, abs=1e-6)
    assert cfg.softmax_scale == pytest.approx(0.1147214, abs=1e-7)
    from dsv2.model.rope import rope_inv_freq
    inv, amp = rope_inv_freq(cfg)
    assert amp == 1.0
    base = 1.0 / 10000 ** (torch.arange(0, 64, 2).double() / 64)
    # dims below low=10 keep the original frequency, above high=23 are fully interpolated by factor 40
    torch.testing.assert_close(inv[:10].double(), base[:10], rtol=1e-6, atol=0)
    torch.testing.assert_close(inv[23:].double(), base[23:] / 40, rtol=1e-6, atol=0)
    assert ((inv[10:23].double() < base[10:23]) & (inv[10:23].double() > base[10:23] / 40)).all()


def test_bf16_close_to_transformers_bf16(tmp_path):
    """bf16 is judged by its error against fp32, next to transformers' own bf16 error on the same weights. (dsv2's
    fused SDPA kernel rounds differently from transformers' math-path attention -- it keeps scores in fp32 -- and a
    rounding difference can flip a near-tied expert choice, so the two bf16 results are not compared to each other.)"""
    path, _ = make_hf_model(tmp_path / "m", **CASES["q-lora_group-limited_scaled_yarn"])
    from transformers import DeepseekV2ForCausalLM
    hf = DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    hf32 = DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = dsv2.load_model(path, dtype=torch.bfloat16)
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32  # the router stays fp32
    ours_mean, hf_mean, ours_agree, hf_agree = 0.0, 0.0, 0.0, 0.0
    for seed in range(5):
        ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref32, ref16, ours = hf32(ids).logits.float(), hf(ids).logits.float(), model(ids)
        assert ours.dtype == torch.float32 and ours.shape == ref32.shape
        hf_err, our_err = (ref16 - ref32).abs(), (ours - ref32).abs()
        assert our_err.max() <= 1.5 * hf_err.max() + 1e-3, f"prompt {seed}: worse than transformers' bf16 rounding"
        assert our_err.max() <= 0.3 * ref32.abs().max(), f"prompt {seed}: bf16 far from fp32"
        ours_mean, hf_mean = ours_mean + our_err.mean().item(), hf_mean + hf_err.mean().item()
        top = ref32.argmax(-1)
        ours_agree += (ours.argmax(-1) == top).float().mean().item() / 5
        hf_agree += (ref16.argmax(-1) == top).float().mean().item() / 5
    assert ours_mean <= 1.1 * hf_mean, (ours_mean, hf_mean)  # at least as accurate on average
    assert ours_agree >= hf_agree - 0.02 and ours_agree >= 0.9, (ours_agree, hf_agree)


def _own_reference_case(tmp_path, **kw):
    path, _ = make_hf_model(tmp_path / "m", num_hidden_layers=4, **kw)
    model = dsv2.load_model(path)
    cfg = model.config
    sd = load_file(f"{path}/model.safetensors")
    ids = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].double()
    return cfg, sd, ids, ours


def test_reference_impl_agrees_with_transformers(tmp_path):
    """The naive oracle below is trusted only because it matches transformers where transformers is right."""
    cfg, sd, ids, ours = _own_reference_case(tmp_path, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                             routed_scaling_factor=2.0, rope=YARN)
    ref = reference_logits(cfg, sd, ids)
    assert (ref - ours).abs().max() <= FP32_TOL


def test_norm_topk_prob_and_moe_layer_freq_against_own_reference():
    cfg = ModelConfig.from_dict({**TINY, "num_hidden_layers": 4, "norm_topk_prob": True, "moe_layer_freq": 2,
                                 "routed_scaling_factor": 3.0, "rope_parameters": YARN})
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, False, True, False]
    model = build_model(cfg, seed=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.08 * torch.randn_like(p))
    sd = {k: v.clone() for k, v in checkpoint_tensors(model).items()}
    ids = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].double()
    ref = reference_logits(cfg, sd, ids)
    assert (ref - ours).abs().max() <= FP32_TOL
    # norm_topk_prob really changes the result, so this test could fail
    plain = build_model(cfg.replace(norm_topk_prob=False), init=False)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (plain(torch.tensor([ids]))[0].double() - ours).abs().max() > 1e-2
