"""Fast paths against their slow twins, and the model's construction contracts."""
import pytest
import torch

from conftest import TINY, YARN
from dsv2.config import ModelConfig
from dsv2.model import build_model
from dsv2.kernels.cpu_mla import latent_attention_sdpa
from dsv2.model.mla import latent_attention
from dsv2.model.rope import rope_freqs

CFG = ModelConfig.from_dict({**TINY, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                             "rope_parameters": YARN})


def _model():
    m = build_model(CFG, seed=0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.08)
    return m.eval()


def test_absorbed_attention_equals_decompressed():
    torch.manual_seed(0)
    attn = _model().model.layers[0].self_attn
    L = 40
    q_nope, q_pe = torch.randn(1, L, 4, 16), torch.randn(1, L, 4, 8)
    c_kv, k_pe = torch.randn(1, L, 16), torch.randn(1, L, 8)
    with torch.no_grad():
        full = attn.attend_decompressed(q_nope, q_pe, c_kv, k_pe)[0]  # [L, n, Dv], causal
        latent = torch.cat([c_kv[0], k_pe[0]], -1)  # [L, 24]
        for t in (0, 7, L - 1):  # query t sees keys 0..t
            q_abs = attn.absorb_query(q_nope[0, t:t + 1], q_pe[0, t:t + 1])  # [1, n, R + Dr]
            out = attn.absorbed_output(attn.attend_latent(q_abs, latent[None, :t + 1]))
            torch.testing.assert_close(out[0], full[t], rtol=1e-5, atol=1e-5)


def test_stacked_experts_equal_the_per_expert_loop():
    moe = _model().model.layers[1].mlp
    x = torch.randn(50, 64)
    with torch.no_grad():
        w, idx, _ = moe.gate(x)
        torch.testing.assert_close(moe.experts(x, w, idx), moe.experts.forward_reference(x, w, idx), rtol=1e-5, atol=1e-6)
        w1, idx1, _ = moe.gate(x[:1])  # the decode shape: one token
        torch.testing.assert_close(moe.experts(x[:1], w1, idx1), moe.experts.forward_reference(x[:1], w1, idx1))


@pytest.mark.parametrize("bf16", [False, True])
def test_training_pads_expert_rows_without_changing_outputs_or_gradients(monkeypatch, bf16):
    """Training on the CPU pads each expert's rows with zero rows (moe.ROW_MULTIPLE); the unpadded grouping and the
    every-expert reference are its twins, outputs and gradients."""
    from dsv2.model import moe as moe_module
    experts = _model().model.layers[1].mlp.experts.train()
    x = torch.randn(50, 64)
    w = torch.rand(50, 3)
    idx = torch.stack([torch.randperm(8)[:3] for _ in range(50)])
    idx[:20] = torch.tensor([0, 1, 2])  # uneven loads: 20+ rows for some experts, a few for others

    def run(rows=None):
        if rows is not None:
            monkeypatch.setattr(moe_module, "ROW_MULTIPLE", rows)
        xr = x.clone().requires_grad_()
        experts.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = experts(xr, w, idx) if rows is not None else experts.forward_reference(xr, w, idx)
        (y.float() * torch.linspace(-1, 1, 64)).sum().backward()
        return y.float(), xr.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()

    padded, unpadded, reference = run(16), run(1), run(None)
    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-5, atol=1e-6)
    for a, b, c in zip(padded, unpadded, reference):
        torch.testing.assert_close(a, b, **tol)
        torch.testing.assert_close(a, c, **tol)


def test_group_limited_routing_stays_in_the_chosen_groups():
    moe = _model().model.layers[1].mlp
    x = torch.randn(500, 64)
    _, idx, scores = moe.gate(x)
    groups = scores.view(500, 4, 2).amax(-1).topk(2, dim=-1).indices  # [T, 2]
    assert ((idx // 2).unsqueeze(-1) == groups.unsqueeze(1)).any(-1).all()


def test_router_stays_fp32_and_model_is_built_once_on_meta():
    m = build_model(CFG, dtype=torch.bfloat16, init=False)
    gate = m.model.layers[1].mlp.gate.weight
    assert gate.dtype == torch.float32 and m.lm_head.weight.dtype == torch.bfloat16
    m.to(torch.float16)
    assert m.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert not any(p.is_meta for p in m.parameters())


def test_rope_pairs_are_interleaved():
    """Position p rotates (x[0], x[1]) as one pair -- not (x[0], x[D/2]) as NeoX half-split rope would."""
    from dsv2.model.rope import apply_rope
    x = torch.zeros(1, 8)
    x[0, 0] = 1.0
    y = apply_rope(x, rope_freqs(CFG, torch.tensor([3])))
    assert y[0, 1].abs() > 1e-3 and y[0, 4].abs() == 0


def test_positions_argument_matches_the_default_and_shifts_rope():
    m = _model()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        a = m(ids)
        b = m(ids, positions=torch.arange(12))
        c = m(ids, positions=torch.arange(12) + 5)  # rope is relative: a uniform shift changes nothing
        d = m(ids, positions=torch.arange(12) * 2)  # different distances do
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)
    assert (a - d).abs().max() > 1e-3


def test_cpu_packed_weights_give_the_same_logits():
    """The packed inference model (oneDNN-blocked bf16 weights, fused input projections and gate/up) against the
    plain model it came from, on the plain causal forward. Runs wherever oneDNN's bf16 path works."""
    import pytest
    from dsv2.capability import cpu_capability, inference_plan
    from dsv2.model.inference import prepare_for_inference
    cap = cpu_capability()
    if not cap.onednn_bf16:
        pytest.skip(f"oneDNN weight packing cannot run on this CPU: {cap.reasons['onednn_bf16']}")
    model = _model().to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        plain = model(ids)
        prepare_for_inference(model, inference_plan("cpu", "bfloat16"))
        packed = model(ids)
    assert model.model.layers[0].self_attn.fused_input
    assert type(model.model.layers[0].self_attn.input_proj).__name__ == "PackedLinear"
    torch.testing.assert_close(packed, plain, rtol=0, atol=0.02 * plain.abs().max().item())
    assert (packed.argmax(-1) == plain.argmax(-1)).float().mean() > 0.97


def test_casting_the_model_leaves_the_fp32_router_untouched():
    """model.to(bf16) casts every weight but the router, which must come out bit for bit (a round trip through
    bf16 would silently flip near-tie routing decisions)."""
    model = _model()
    gate = model.model.layers[1].mlp.gate
    before = gate.weight.detach().clone()
    assert not torch.equal(before, before.bfloat16().float())  # the values are not bf16-representable
    model.to(torch.bfloat16)
    assert gate.weight.dtype == torch.float32 and torch.equal(gate.weight, before)
    assert model.model.layers[1].mlp.experts.down_proj.dtype == torch.bfloat16
    model.to(torch.float32).to(torch.float16)
    assert torch.equal(gate.weight, before)


def test_absorbed_decode_scores_keep_fp32_precision_over_a_long_bf16_context():
    """attend_latent on bf16 latents must equal the same attention computed in fp32 from those bf16 inputs up to the
    output's own bf16 rounding: rounding the 2,048 scores to bf16 before the softmax (as decode once did, while
    prefill's SDPA keeps scores in fp32) would be several times off."""
    torch.manual_seed(0)
    attn = _model().model.layers[0].self_attn
    L, n, W = 2048, 4, 24
    latent = (torch.randn(2, L, W) * 3).bfloat16()
    q_abs = (torch.randn(2, n, W) * 3).bfloat16()  # scores of a few tens: what trained models see
    with torch.no_grad():
        out = attn.attend_latent(q_abs, latent).float()
        scores = (q_abs.float() @ latent.float().transpose(-1, -2)) * attn.softmax_scale
        ref = (scores.softmax(-1) @ latent.float())[..., :attn.rank]
    rounding = (ref.bfloat16().float() - ref).abs().max()  # what storing the output in bf16 costs alone
    assert (out - ref).abs().max() <= 2 * rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_latent_attention_matches_its_fp32_twin_with_padding(dtype):
    """The CPU decode's SDPA form (heads as query positions of one shared key) against the written-out fp32 math, on
    contexts padded to a common length as the engine batches them: fp32 within 1e-5, bf16 within twice the output's
    own bf16 rounding. A query whose context is a single position, and fp32 latents under a bf16 query (FP8 caches
    dequantize to fp32), are in the cases."""
    torch.manual_seed(0)
    n, R, W, L = 4, 16, 24, 300
    q_abs = (torch.randn(3, n, W) * 3).to(dtype)
    latent = (torch.randn(3, L, W) * 2).to(dtype)
    pad = torch.arange(L) >= torch.tensor([L, 129, 1])[:, None]  # full, partial, one position
    ref = latent_attention(q_abs.double(), latent.double(), pad, R, 0.3)
    for lat in (latent, latent.float()):
        out = latent_attention_sdpa(q_abs, lat, pad, R, 0.3)
        assert out.dtype == dtype and out.shape == (3, n, R)
        if dtype == torch.float32:
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
        else:
            rounding = (ref.to(dtype).double() - ref).abs().max()
            assert (out.double() - ref).abs().max() <= 2 * rounding
    # the one-position context attends only to that position: the output is its value
    torch.testing.assert_close(latent_attention_sdpa(q_abs, latent, pad, R, 0.3)[2].float(),
                               latent[2, 0, :R].float().expand(n, R), atol=0, rtol=0)
