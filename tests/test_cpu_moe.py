"""The CPU expert kernel (kernels/moe_cpu.cpp, kernels/cpu_moe.py) against its slow twins: the routed experts'
every-expert mask form (Experts.forward_reference) and torch's per-expert loop, and MLP's three linears; fp32
(summation order only), bf16 (bf16 rounding), fp32 activations over bf16 weights (the upcast plan), and the AVX2
build in a subprocess."""
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dsv2.config import ModelConfig
from dsv2.kernels import cpu_moe
from dsv2.model.layers import MLP
from dsv2.model.moe import ExpertGroup, Experts

needs_kernel = pytest.mark.skipif(cpu_moe.kernel() is None, reason=f"kernel not built: {cpu_moe.unavailable_reason()}")


def experts_case(E=8, H=96, I=40, T=5, K=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = ModelConfig(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K,
                      num_attention_heads=2, num_hidden_layers=1, vocab_size=16, intermediate_size=64)
    experts = Experts(cfg)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(E, 2 * I, H, generator=g) * 0.1)
        experts.down_proj.copy_(torch.randn(E, H, I, generator=g) * 0.1)
    experts = experts.to(dtype).requires_grad_(False)
    x = torch.randn(T, H, generator=g).to(dtype)
    weights, idx = torch.rand(T, E, generator=g).softmax(-1).topk(K, dim=-1)
    return experts, x, weights, idx


def reference(experts, x, weights, idx):
    """fp64 twin with torch's rounding points: for bf16 activations gate, up, silu(gate), act and each expert's
    output rounded to bf16 (as torch's bf16 operators round them), the weighted sum in high precision."""
    I = experts.down_proj.shape[-1]
    r = (lambda t: t.to(x.dtype).double()) if x.dtype == torch.bfloat16 else (lambda t: t)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), idx[t].tolist()):
            h = r(experts.gate_up_proj[e].double() @ x[t].double())
            act = (r(F.silu(h[:I])) * h[I:]).to(x.dtype).double()
            out[t] += w * r(experts.down_proj[e].double() @ act)
    return out


@needs_kernel
@pytest.mark.parametrize("T", [1, 2, 3, 7, 70])
@pytest.mark.parametrize("H,I", [(96, 40), (64, 33), (130, 17)])  # widths that are not multiples of the vectors
def test_routed_experts_fp32(T, H, I):
    experts, x, weights, idx = experts_case(H=H, I=I, T=T)
    out = cpu_moe.stacked_experts(x, experts.gate_up_proj, experts.down_proj, weights, idx)
    ref = reference(experts, x, weights, idx)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    loop = ExpertGroup.forward(experts, x, weights, idx)  # torch's per-expert loop (the grouping twin)
    assert (out - loop).abs().max() <= 1e-5 * loop.abs().max()
    assert (out - experts.forward_reference(x, weights, idx)).abs().max() <= 1e-5 * loop.abs().max()


@needs_kernel
@pytest.mark.parametrize("T", [1, 4, 33])
def test_routed_experts_bf16(T):
    experts, x, weights, idx = experts_case(T=T, H=256, I=96, E=16, K=4, dtype=torch.bfloat16)
    out = cpu_moe.stacked_experts(x, experts.gate_up_proj, experts.down_proj, weights, idx)
    ref = reference(experts, x, weights, idx)
    assert out.dtype == torch.bfloat16
    ulp = ref.abs().max() * 2 ** -8
    assert (out.double() - ref).abs().max() <= ulp  # the output's own rounding (and rare near-ties inside)
    loop = ExpertGroup.forward(experts, x, weights, idx)  # torch's loop: the same roundings, other sum orders
    assert (out.double() - loop.double()).abs().max() <= ulp
    assert (out != loop).float().mean() <= 0.05  # mostly bit for bit


@needs_kernel
def test_fp32_activations_over_bf16_weights():
    """The upcast plan: bf16 weights widened in the kernel, fp32 activations never rounded."""
    experts, x, weights, idx = experts_case(T=6, dtype=torch.bfloat16)
    x32 = x.float() + torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 1e-3  # not bf16 values
    out = cpu_moe.stacked_experts(x32, experts.gate_up_proj, experts.down_proj, weights, idx)
    as_fp32 = Experts.forward_reference(experts.float(), x32, weights, idx)
    assert out.dtype == torch.float32 and (out - as_fp32).abs().max() <= 1e-5 * as_fp32.abs().max()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp(dtype):
    g = torch.Generator().manual_seed(3)
    mlp = MLP(72, 50)
    for p in mlp.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
    mlp = mlp.to(dtype).requires_grad_(False)
    x = torch.randn(2, 3, 72, generator=g).to(dtype)
    out = cpu_moe.mlp(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    ref = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)).double()  # the twin: torch's three matmuls
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8  # fp32 sum order; bf16: the same roundings, other sum orders
    assert out.shape == x.shape and (out.double() - ref).abs().max() <= tol * ref.abs().max()


@needs_kernel
@pytest.mark.parametrize("T", [1, 3, 9])
def test_linear(T):
    """cpu_moe.linear (the compiled single-sequence step's large matrices) against F.linear: fp32 to summation
    order, bf16 to one rounding of the output, fp32 rows over bf16 weights unrounded."""
    g = torch.Generator().manual_seed(T)
    w, x = torch.randn(70, 130, generator=g) * 0.1, torch.randn(2, T, 130, generator=g)
    ref = F.linear(x.double(), w.double())
    out = cpu_moe.linear(x, w)
    assert out.shape == (2, T, 70) and (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    wb, xb = w.bfloat16(), x.bfloat16()
    ref = F.linear(xb.double(), wb.double())
    out = cpu_moe.linear(xb, wb)
    assert out.dtype == torch.bfloat16 and (out.double() - ref).abs().max() <= 2 ** -8 * ref.abs().max()
    out = cpu_moe.linear(x, wb)
    ref = F.linear(x.double(), wb.double())
    assert out.dtype == torch.float32 and (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@needs_kernel
def test_modules_take_the_kernel_only_for_inference(monkeypatch):
    """Experts.forward and MLP.forward call the kernel on frozen weights and few rows, never for trainable weights
    (the torch path keeps gradients, and a trainable model's no_grad forward stays bit for bit training's), never
    above the row limits; results equal the torch path's within fp32 summation order."""
    calls = []
    real = cpu_moe.swiglu_experts
    monkeypatch.setattr(cpu_moe, "swiglu_experts", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    experts, x, weights, idx = experts_case(T=4)
    with torch.no_grad():
        fast = experts(x, weights, idx)
    assert calls == [4]
    experts.requires_grad_(True)
    slow = experts(x, weights, idx)  # trainable weights: torch's loop
    assert calls == [4] and slow.requires_grad
    assert (fast - slow.detach()).abs().max() <= 1e-5 * slow.abs().max()
    with torch.no_grad():
        assert torch.equal(experts(x, weights, idx), slow.detach())  # also under no_grad: training's own forward
    assert calls == [4]
    mlp = MLP(96, 40).requires_grad_(False)
    with torch.no_grad():
        mlp(x)
        mlp(torch.randn(cpu_moe.MLP_ROWS + 1, 96))  # prefill-sized: torch's matmuls
    assert calls == [4, 4]
    monkeypatch.setattr(cpu_moe, "EXPERT_ROWS", 3)
    with torch.no_grad():
        experts.requires_grad_(False)(x, weights, idx)
    assert calls == [4, 4]


@needs_kernel
def test_bad_arguments_are_refused():
    experts, x, weights, idx = experts_case()
    with pytest.raises(ValueError, match="out of range"):
        cpu_moe.stacked_experts(x, experts.gate_up_proj, experts.down_proj, weights, idx + 100)
    with pytest.raises(ValueError, match="contiguous rows"):
        cpu_moe.swiglu_experts(x, experts.gate_up_proj[:, :, :40].transpose(1, 2), experts.gate_up_proj[:, 40:],
                               experts.down_proj, weights, idx)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 vector ISAs")
def test_the_avx2_build_runs_and_matches(tmp_path):
    """What an AVX2 machine gets: the kernel built with AVX2 flags into a fresh cache (bf16 widened by shifts, 8-lane
    FMAs), matching the fp64 twin in fp32, bf16, and fp32 over bf16. A subprocess: the capability is read once."""
    script = (
        "import torch, sys; sys.path.insert(0, %r)\n"
        "from test_cpu_moe import experts_case, reference\n"
        "from dsv2.kernels import cpu_moe, cpu_build\n"
        "assert cpu_build.arch_flags() == ['-mavx2', '-mfma', '-mf16c'], cpu_build.arch_flags()\n"
        "assert cpu_moe.kernel() is not None and not cpu_moe.bf16_dot(), cpu_moe.unavailable_reason()\n"
        "for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2 ** -8)):\n"
        "    experts, x, w, idx = experts_case(T=9, H=100, I=37, dtype=dtype)\n"
        "    out = cpu_moe.stacked_experts(x, experts.gate_up_proj, experts.down_proj, w, idx)\n"
        "    ref = reference(experts, x, w, idx)\n"
        "    assert (out.double() - ref).abs().max() <= tol * ref.abs().max(), (dtype, (out.double() - ref).abs().max())\n"
        "out = cpu_moe.stacked_experts(x.float(), experts.gate_up_proj, experts.down_proj, w, idx)\n"
        "ref = reference(experts, x.float(), w, idx)\n"
        "assert out.dtype == torch.float32 and (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()\n"
        "import os; print(os.listdir(cpu_build.cache_dir()))\n") % os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "DSV2_CPU_CAPABILITY": "avx2",
           "XDG_CACHE_HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "moe_cpu-" in p.stdout  # built into the fresh cache, not taken from the usual one
