"""Every CPU path, on every machine: the capability check (and DSV2_CPU_CAPABILITY lowering it), the plan each kind
of CPU gets, each weight format against its slow twin, and the whole engine under an emulated AVX2 CPU."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from conftest import YARN, make_hf_model, naive_greedy
import dsv2
from dsv2.capability import ENV, CpuCapability, cpu_capability, inference_plan
from dsv2.engine.llm import LLM
from dsv2.engine.sampling_params import SamplingParams
from dsv2.kernels import cpu_moe
from dsv2.model.inference import prepare_for_inference
from dsv2.model.upcast import UpcastEmbedding, UpcastExperts, UpcastLinear, UpcastMLP, Workspace, upcast_linear

HERE = os.path.dirname(os.path.abspath(__file__))
X86 = cpu_capability().is_x86
LEVEL = cpu_capability().level


def fake_cpu(level: str, arch: str = "x86_64", bf16: bool | None = None, int8: bool = True,
             int4: bool = True) -> CpuCapability:
    """A CPU of another kind, for the planner (which is a pure function of what the checks found)."""
    fast = level == "avx512" if bf16 is None else bf16
    return CpuCapability(arch=arch, torch_level=level, level=level, forced=None,
                         onednn_bf16=fast and arch == "x86_64", fast_bf16=fast, fast_fp16=False, int8_gemv=int8,
                         flags=(), int4_kernel=int4, reasons={"onednn_bf16": "fake", "fast_bf16": "fake",
                                                              "int8_gemv": "fake", "int4_kernel": "fake"})


# ---- the capability check -----------------------------------------------------------------------------------
@pytest.mark.skipif(not X86 or LEVEL == "default", reason="needs an x86 CPU with at least AVX2 to lower")
def test_dsv2_cpu_capability_lowers_the_level_and_switches_the_fast_paths_off(monkeypatch):
    low = cpu_capability("avx2")
    assert low.level == "avx2" and low.forced == "avx2"
    assert not low.onednn_bf16 and not low.fast_bf16 and "AVX-512" in low.reasons["onednn_bf16"]
    assert cpu_capability("default").level == "default"
    monkeypatch.setenv(ENV, "avx2")
    assert cpu_capability() == low  # the environment variable is the same switch
    monkeypatch.setenv(ENV, "avx9000")
    with pytest.raises(ValueError, match=f"{ENV}='avx9000'.*default, avx2, avx512"):
        cpu_capability()


def test_the_capability_never_rises_above_what_torch_runs():
    cap = cpu_capability("avx512")
    assert cap.level == (LEVEL if X86 else "default") and cap.torch_level == torch.backends.cpu.get_cpu_capability().lower()
    if cap.level != "avx512":
        assert not cap.onednn_bf16 and "ignored" in cap.reasons["level"]


def test_nothing_x86_only_is_tried_on_arm(monkeypatch):
    """On ARM (Apple Silicon, Graviton) the check must not even try oneDNN's x86 weight prepacking."""
    import dsv2.capability as capability

    def refuse(*args, **kwargs):
        raise AssertionError("an x86-only oneDNN call on ARM")
    monkeypatch.setattr(capability.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse, raising=False)
    cap = capability._detect.__wrapped__(None)
    assert cap.arch == "aarch64" and not cap.is_x86 and not cap.onednn_bf16
    assert "not x86" in cap.reasons["onednn_bf16"]
    assert inference_plan("cpu", "auto", capability=cap).weights in ("upcast", "plain")


def test_the_int8_and_int4_kernels_are_used_only_where_their_trials_passed():
    cap = cpu_capability()
    assert inference_plan("cpu", "auto", "int8").int8_kernel == cap.int8_gemv
    assert inference_plan("cpu", "auto", "int4").int4_kernel == cap.int4_kernel
    if cap.int4_kernel:  # the trial read torch's packing back, and says which it is
        assert "packing: blocks of" in cap.reasons["int4_kernel"]


def test_a_failing_int4_trial_switches_the_kernel_off(monkeypatch):
    """A kernel that gives wrong answers (or none) is never chosen: the capability says why, the plan notes it."""
    import dsv2.capability as capability

    def wrong(x, w, group_size, scale_zeros):
        return torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype)
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", wrong, raising=False)
    cap = capability._detect.__wrapped__(None)
    assert not cap.int4_kernel and "wrong results" in cap.reasons["int4_kernel"]
    plan = inference_plan("cpu", "auto", "int4", capability=cap)
    assert not plan.int4_kernel and "unavailable" in " ".join(plan.notes)
    monkeypatch.setattr(capability, "int4_cpu_packing", lambda: None)  # a packing dsv2 cannot read back
    assert "cannot read back" in capability._check_int4_kernel()[1]


# ---- what each kind of CPU gets ------------------------------------------------------------------------------
def test_auto_picks_by_cpu_kind():
    avx512, avx2 = fake_cpu("avx512"), fake_cpu("avx2")
    p = inference_plan("cpu", "auto", capability=avx512)
    assert (p.weights, p.weight_dtype, p.compute_dtype, p.cache_dtype) == \
        ("packed", torch.bfloat16, torch.bfloat16, torch.bfloat16)
    p = inference_plan("cpu", "auto", capability=avx2)  # compact weights, fp32 compute, compact cache
    assert (p.weights, p.weight_dtype, p.compute_dtype, p.cache_dtype) == \
        ("upcast", torch.bfloat16, torch.float32, torch.bfloat16)
    assert "fp32 compute" in p.notes[0]
    arm = fake_cpu("default", arch="aarch64", bf16=False)
    assert inference_plan("cpu", "auto", capability=arm).weights == "upcast"
    arm_bf16 = fake_cpu("default", arch="aarch64", bf16=True)  # bf16 fast but no x86 oneDNN packing
    p = inference_plan("cpu", "auto", capability=arm_bf16)
    assert (p.weights, p.compute_dtype) == ("plain", torch.bfloat16)


def test_an_explicit_dtype_means_what_it_says():
    avx2 = fake_cpu("avx2")
    p = inference_plan("cpu", "bfloat16", capability=avx2)
    assert (p.weights, p.compute_dtype) == ("plain", torch.bfloat16) and "slow" in p.notes[0]
    p = inference_plan("cpu", "float32", capability=fake_cpu("avx512"))
    assert (p.weights, p.weight_dtype, p.compute_dtype) == ("plain", torch.float32, torch.float32)
    p = inference_plan("cpu", "bfloat16", cpu_weight_packing=False, capability=fake_cpu("avx512"))
    assert p.weights == "plain"
    with pytest.raises(ValueError, match="cpu_weight_packing=True is not possible here"):
        inference_plan("cpu", "bfloat16", cpu_weight_packing=True, capability=avx2)
    with pytest.raises(ValueError, match="dtype 'bf17'"):
        inference_plan("cpu", "bf17")


def test_int8_plans():
    p = inference_plan("cpu", "auto", "int8", capability=fake_cpu("avx512"))
    assert (p.weights, p.compute_dtype, p.int8_kernel) == ("int8", torch.bfloat16, True)
    p = inference_plan("cpu", "auto", "int8", capability=fake_cpu("avx2"))
    assert (p.compute_dtype, p.cache_dtype, p.int8_kernel) == (torch.float32, torch.bfloat16, True)
    p = inference_plan("cpu", "float32", "int8", capability=fake_cpu("avx2"))
    assert not p.int8_kernel and "dequantize" in p.notes[0]  # the kernel would round fp32 activations to bf16
    p = inference_plan("cpu", "auto", "int8", capability=fake_cpu("avx2", int8=False))
    assert not p.int8_kernel and "unavailable" in p.notes[0]
    with pytest.raises(ValueError, match=r"quantization='int3'.*\['int8', 'int4'\]"):
        inference_plan("cpu", "auto", "int3")
    with pytest.raises(ValueError, match="cpu_weight_packing=True and quantization='int8'"):
        inference_plan("cpu", "auto", "int8", cpu_weight_packing=True)


def test_int4_plans():
    p = inference_plan("cpu", "auto", "int4", capability=fake_cpu("avx512"))
    assert (p.weights, p.compute_dtype, p.int4_kernel, p.group_size) == ("int4", torch.bfloat16, True, 64)
    assert "aten._weight_int4pack_mm_for_cpu" in p.kernels()[f"linear <= {p.gemv_rows} rows (decode)"]
    assert p.formats()["lm_head"].startswith("int8") and p.as_dict()["formats"] == p.formats()  # what info shows
    assert any(k.startswith("kv_b_proj") and v == "bfloat16" for k, v in p.formats().items())
    p = inference_plan("cpu", "auto", "int4", capability=fake_cpu("avx2"), group_size=128)
    assert (p.compute_dtype, p.cache_dtype, p.int4_kernel, p.group_size) == (torch.float32, torch.bfloat16, True, 128)
    assert p.as_dict()["group_size"] == 128 and p.as_dict()["int4_kernel"]
    p = inference_plan("cpu", "float32", "int4", capability=fake_cpu("avx2"))
    assert not p.int4_kernel and "dequantize" in p.notes[0]  # the kernel would round fp32 activations to bf16
    p = inference_plan("cpu", "auto", "int4", capability=fake_cpu("avx2", int4=False))
    assert not p.int4_kernel and "int4 kernel unavailable (fake)" in p.notes[0]
    assert all("by tiles" in v for k, v in p.kernels().items() if k.startswith("linear"))
    with pytest.raises(ValueError, match="group_size=48: int4 takes one of"):
        inference_plan("cpu", "auto", "int4", group_size=48)
    with pytest.raises(ValueError, match="group_size=64 is for quantization='int4' only"):
        inference_plan("cpu", "auto", "int8", group_size=64)


@pytest.mark.skipif(not X86 or LEVEL == "default", reason="needs an x86 CPU with at least AVX2 to lower")
def test_int4_plan_under_an_emulated_avx2_cpu(monkeypatch):
    monkeypatch.setenv(ENV, "avx2")
    p = inference_plan("cpu", "auto", "int4")
    assert p.compute_dtype == torch.float32 and p.int4_kernel == cpu_capability().int4_kernel


def test_cuda_plans_do_not_ask_the_cpu():
    p = inference_plan("cuda", "auto")
    assert (p.weights, p.compute_dtype, p.device) == ("plain", torch.bfloat16, "cuda")
    kinds = p.kernels()
    assert any("cuBLAS" in v for v in kinds.values())


# ---- each weight format against its slow twin ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_hf_model(tmp_path_factory.mktemp("cpu") / "m", rope=YARN, topk_method="group_limited_greedy",
                            n_group=4, topk_group=2, std=0.15)
    bf16 = dsv2.load_model(path, dtype=torch.bfloat16)
    dsv2.save_model(bf16, path)  # bf16 weights on disk, so a float32 load holds the very same values
    return path


@pytest.mark.parametrize("kernel_rows", [0, 3])  # 3: up to 3 rows in kernels/moe_cpu.cpp (where it is built)
@pytest.mark.parametrize("workspace", [4 << 20, 1000])  # 1000 floats: the 48 x 64 matrix goes in chunks of 15 rows
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])
def test_upcast_linear_every_kernel_equals_the_fp32_product(rows, workspace, kernel_rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(48, 64, generator=g).bfloat16()
    bias = torch.randn(48, generator=g)
    x = torch.randn(rows, 64, generator=g)
    y = upcast_linear(x, w, bias, gemv_rows=16, workspace=Workspace(workspace), kernel_rows=kernel_rows)
    assert y.dtype == torch.float32 and y.shape == (rows, 48)
    if rows <= kernel_rows and cpu_moe.kernel() is not None:  # fp32 rows over the bf16 weight: exact products
        torch.testing.assert_close(y, x @ w.float().T + bias, rtol=1e-5, atol=1e-5)
        ref = x.bfloat16().float() @ w.float().T + bias
        assert (y - ref).abs().max() > 1e-4  # not the GEMV's bf16-rounded activations
    elif rows > 16:  # fp32 GEMM on the exact bf16 values
        torch.testing.assert_close(y, x @ w.float().T + bias, rtol=1e-5, atol=1e-5)
    else:  # half-precision GEMV: activations rounded to bf16, fp32 accumulation
        ref = x.bfloat16().float() @ w.float().T + bias
        assert (y - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_upcast_model_equals_the_fp32_model_on_the_same_weights(tiny):
    """bf16 weights computed in fp32 (the AVX2 default) against the same weights loaded as fp32: on the GEMM kernel
    and in the C++ kernel (kernels/moe_cpu.cpp) every product is an fp32 product of identical values; on the GEMV
    kernel activations are rounded to bf16 on the way in; the default switches per matmul by its row count (routed
    experts see few rows even in prefill)."""
    fp32 = dsv2.load_model(tiny, dtype=torch.float32)
    plan = inference_plan("cpu", "auto", capability=fake_cpu("avx2"))
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = fp32(ids)
    outs = {}
    variants = {0: dict(gemv_rows=0, upcast_kernel_rows=0), plan.gemv_rows: {},  # all GEMM, the default,
                1 << 30: dict(gemv_rows=1 << 30, upcast_kernel_rows=0), "kernel": dict(upcast_kernel_rows=1 << 30)}
    for name, change in variants.items():  # ... all GEMV, all the C++ kernel
        model = prepare_for_inference(dsv2.load_model(tiny, dtype=torch.bfloat16), dataclasses.replace(plan, **change))
        with torch.no_grad():
            outs[name] = model(ids)
    kinds = {type(m) for m in model.modules()}
    assert {UpcastLinear, UpcastMLP, UpcastExperts, UpcastEmbedding} <= kinds
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert model.model.layers[0].self_attn.w_uk.dtype == torch.float32  # absorbed weights in the compute dtype
    stored = {p.dtype for n, p in model.named_parameters() if not n.endswith("gate.weight")}
    assert stored == {torch.bfloat16}  # nothing was widened in memory
    torch.testing.assert_close(outs[0], ref, rtol=1e-4, atol=1e-4)
    if cpu_moe.kernel() is not None:
        torch.testing.assert_close(outs["kernel"], ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # for scale: a model computed in bf16 throughout
        bf16_err = (dsv2.load_model(tiny, dtype=torch.bfloat16)(ids) - ref).abs()
    gemv_err, default_err = (outs[1 << 30] - ref).abs(), (outs[plan.gemv_rows] - ref).abs()
    assert gemv_err.mean() <= bf16_err.mean() and gemv_err.max() <= bf16_err.max()
    assert default_err.max() <= 0.01 * ref.abs().max() and default_err.mean() <= 0.1 * bf16_err.mean()


PLANS = {  # name -> LLM arguments and a CPU kind to plan for (None: this machine)
    "auto-here": (dict(dtype="auto"), None),
    "auto-avx2": (dict(dtype="auto"), "avx2"),
    "int8-avx2": (dict(dtype="auto", quantization="int8"), "avx2"),
    "int8-fp32": (dict(dtype="float32", quantization="int8"), None),
    "int4-here": (dict(dtype="auto", quantization="int4"), None),
    "int4-avx2": (dict(dtype="auto", quantization="int4"), "avx2"),
    "int4-fp32": (dict(dtype="float32", quantization="int4"), None),
    "bf16-plain": (dict(dtype="bfloat16", cpu_weight_packing=False), None),
    "fp32": (dict(dtype="float32"), None),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_engine_on_every_plan_equals_a_full_forward_of_the_same_model(tiny, name, monkeypatch):
    """The engine (chunked prefill + absorbed decode over the paged cache, each matmul on its row-count kernel)
    against a full causal forward of the same prepared model over prompt + the engine's tokens: the same tokens'
    logprobs, and every token the argmax. Exact where both sides compute the same products in fp32; elsewhere the
    kernels round differently, and a near-tied router choice may flip, so most positions must agree closely."""
    kwargs, level = PLANS[name]
    if level is not None:
        monkeypatch.setenv(ENV, level)
    llm = LLM(tiny, block_size=4, max_num_batched_tokens=32, **kwargs)
    if level == "avx2" and X86 and LEVEL != "default":
        assert llm.plan.weights in ("upcast", "int8", "int4") and llm.plan.compute_dtype == torch.float32
    exact = llm.plan.compute_dtype == torch.float32 and llm.plan.weights != "upcast" and not llm.plan.int8_kernel \
        and not llm.plan.int4_kernel
    prompts = [torch.randint(2, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 23, 11)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, ignore_eos=True, max_tokens=12, logprobs=0))
    gaps, margins = [], []
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        with torch.no_grad():
            full = llm.model(torch.tensor([p + c.token_ids]))[0, len(p) - 1:-1].log_softmax(-1)  # [12, V]
        chosen = full.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        engine = torch.tensor([pos[t].logprob for t, pos in zip(c.token_ids, c.logprobs)])
        gaps.append((engine - chosen).abs())
        margins.append(full.max(-1).values - chosen)  # 0 where the engine's token is the full forward's argmax
        if exact:
            assert c.token_ids == naive_greedy(llm.model, p, 12)
    gaps, margins = torch.cat(gaps), torch.cat(margins)
    if exact:
        assert gaps.max() <= 1e-4 and margins.max() <= 1e-4
    else:  # fp32 compute with bf16-rounded operands in places, or bf16 compute throughout
        tol = 0.05 if llm.plan.compute_dtype == torch.float32 else 0.1
        assert gaps.median() <= tol / 4 and (gaps <= tol).float().mean() >= 0.9, gaps
        assert (margins <= tol).float().mean() >= 0.9, margins
    assert llm.allocator.num_free_blocks == llm.num_blocks


# ---- the whole engine on an emulated AVX2 CPU ------------------------------------------------------------------
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", ENV: "avx2"}
AVX2_TESTS = ["test_cpu_paths.py", "test_engine.py", "test_quant.py", "test_model_internals.py",
              "test_default_model.py", "test_cli_run.py"]


@pytest.mark.skipif(not X86 or LEVEL != "avx512" or os.environ.get("ATEN_CPU_CAPABILITY") == "avx2",
                    reason="runs where the main suite takes the AVX-512 paths; on AVX2 the suite already is this")
def test_model_and_engine_suites_pass_as_on_an_avx2_cpu():
    """torch, oneDNN and dsv2 all restricted to AVX2 (what crashed the default path on AMD EPYC AVX2 machines):
    the engine, quantization, model and CLI tests run again in a child pytest and must all pass."""
    env = {**os.environ, **AVX2_ENV}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *AVX2_TESTS,
                        "-k", "not avx2_cpu"], cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert " passed" in p.stdout.splitlines()[-1]
