"""The grouped MoE (dsv2.kernels.moe_grouped) against its twins in model/moe.py: Experts.forward (a Python loop
over the experts that got tokens) and Experts.forward_reference (every expert on every token, masked), for token
counts from 1 to a prefill chunk, routings that leave most experts idle, fp32 and bf16, through torch._grouped_mm
and through the padded-bmm fallback. On a GPU (-m gpu): no host sync (CUDA's sync debug mode raises on one) and
a CUDA graph replaying new routings."""
from __future__ import annotations

import pytest
import torch

from dsv2.config import ModelConfig
from dsv2.kernels import moe_grouped
from dsv2.kernels.moe_grouped import grouped_experts, grouped_mm, grouped_mm_supported
from dsv2.model.moe import Experts, Gate
from conftest import TINY

CFG = ModelConfig.from_dict({**TINY, "n_routed_experts": 8, "num_experts_per_tok": 3})


def experts(dtype, seed=0, device="cpu", cfg=CFG) -> Experts:
    torch.manual_seed(seed)
    e = Experts(cfg).to(device)
    with torch.no_grad():
        e.gate_up_proj.normal_(0, 0.2)
        e.down_proj.normal_(0, 0.2)
    return e.to(dtype).requires_grad_(False)


def routing(T: int, cfg=CFG, only=None, seed=0, device="cpu"):
    """x [T, H] and the real router's (weights, idx); `only` restricts the choice to a few experts (the others get
    zero tokens)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, cfg.hidden_size, generator=g)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, 0, 0.5, generator=g)
    if only is not None:
        with torch.no_grad():
            gate.weight[[e for e in range(cfg.n_routed_experts) if e not in only]] = -100.0  # never chosen
            x = x.abs()
    with torch.no_grad():
        weights, idx, _ = gate(x)
    return x.to(device), weights.to(device), idx.to(device)


@pytest.fixture(params=["grouped_mm", "padded_bmm"])
def path(request, monkeypatch):
    """Both ways grouped_mm runs: torch._grouped_mm where this torch has it, and the padded-bmm fallback."""
    if request.param == "grouped_mm" and not grouped_mm_supported("cpu", torch.float32):
        pytest.skip("torch._grouped_mm does not run on this CPU build")
    if request.param == "padded_bmm":
        monkeypatch.setattr(moe_grouped, "grouped_mm_supported", lambda device, dtype: False)
    return request.param


@pytest.mark.parametrize("T", [1, 2, 5, 16, 97])
def test_fp32_equals_the_expert_loop_and_the_reference(path, T):
    ex = experts(torch.float32)
    x, w, idx = routing(T, seed=T)
    got = grouped_experts(x, ex.gate_up_proj, ex.down_proj, w, idx)
    torch.testing.assert_close(got, ex(x, w, idx), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, ex.forward_reference(x, w, idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,only", [(1, [7, 2, 4]), (9, [0, 5, 6]), (40, [3, 1, 6, 2])])
def test_experts_with_zero_tokens(path, T, only):
    ex = experts(torch.float32, seed=1)
    x, w, idx = routing(T, only=only, seed=2)
    assert set(idx.unique().tolist()) <= set(only)  # the rest of the 8 experts get nothing
    torch.testing.assert_close(grouped_experts(x, ex.gate_up_proj, ex.down_proj, w, idx),
                               ex.forward_reference(x, w, idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 33])
def test_bf16_rounds_like_the_expert_loop(path, T):
    """Each expert's output is rounded to bf16 once, then combined in fp32, as Experts.forward does: the two
    agree to a bf16 step of the result."""
    ex = experts(torch.bfloat16)
    x, w, idx = routing(T, seed=3)
    x = x.bfloat16()
    got, want = grouped_experts(x, ex.gate_up_proj, ex.down_proj, w, idx), ex(x, w, idx)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2 * float(want.float().abs().max()))


def test_grouped_mm_rows_go_to_their_expert(path):
    """Row a of the result is w[expert[a]] @ x[a], with experts of 0, 1 and many rows."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 24, 16, generator=g)  # [E, out, in]
    expert = torch.tensor([0, 0, 0, 2, 3, 3, 3, 3, 3])
    x = torch.randn(len(expert), 16, generator=g)
    ends = torch.bincount(expert, minlength=4).cumsum(0).int()
    want = torch.stack([w[e] @ x[a] for a, e in enumerate(expert.tolist())])
    torch.testing.assert_close(grouped_mm(x, w, ends, expert), want, rtol=1e-5, atol=1e-5)


def test_unaligned_widths_fall_back():
    """_grouped_mm wants 16-byte row strides; other widths take the padded bmm (same answer)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 6, 5, generator=g)  # 5 and 6 fp32 values: 20 and 24 bytes
    expert = torch.tensor([0, 2, 2])
    x = torch.randn(3, 5, generator=g)
    want = torch.stack([w[e] @ x[a] for a, e in enumerate(expert.tolist())])
    torch.testing.assert_close(grouped_mm(x, w, torch.tensor([1, 1, 3], dtype=torch.int32), expert), want)


def test_capability_is_tried_not_assumed():
    assert grouped_mm_supported("cpu", torch.float32) == grouped_mm_supported("cpu", torch.float32)
    assert isinstance(grouped_mm_supported("cpu", torch.bfloat16), bool)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_cuda_no_host_sync_and_graph_replay():
    cfg = ModelConfig.from_dict({**TINY, "hidden_size": 256, "moe_intermediate_size": 128, "n_routed_experts": 64,
                                 "num_experts_per_tok": 6})
    ex = experts(torch.bfloat16, device="cuda", cfg=cfg)
    x, w, idx = routing(64, cfg=cfg, device="cuda")
    x = x.bfloat16()
    want = ex.forward_reference(x, w, idx)
    grouped_experts(x, ex.gate_up_proj, ex.down_proj, w, idx)  # the capability trial syncs once: not measured
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = grouped_experts(x, ex.gate_up_proj, ex.down_proj, w, idx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * float(want.float().abs().max()))
    if not grouped_mm_supported("cuda", torch.bfloat16):
        pytest.skip("torch._grouped_mm does not run on this GPU: the fallback syncs, so no graph")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = grouped_experts(x, ex.gate_up_proj, ex.down_proj, w, idx)
    x2, w2, idx2 = routing(64, cfg=cfg, seed=5, device="cuda")
    x.copy_(x2)
    w.copy_(w2)
    idx.copy_(idx2)
    graph.replay()
    want2 = ex.forward_reference(x, w, idx)
    torch.testing.assert_close(out.float(), want2.float(), rtol=2e-2, atol=2e-2 * float(want2.float().abs().max()))
