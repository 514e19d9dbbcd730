"""The compiled CPU decode step (engine/compiled.py) against its slow twin, the eager step: logits at every
teacher-forced position for one sequence and for several decoding together (the two compiled specialisations),
with contexts crossing blocks; with int8 weights and with the FP8 latent cache; greedy generation through LLM. Also:
sealing leaves the eager model's output bit for bit; without a C++ compiler, or when compiling fails, decode runs
eagerly and says why."""
from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from conftest import TINY, make_llm_dir
from dsv2.capability import inference_plan
from dsv2.config import ModelConfig
from dsv2.engine import compiled as compiled_mod
from dsv2.engine.compiled import Sealed, compiler_unavailable_reason, seal, unsupported_reason
from dsv2.engine.runner import ModelRunner, StepInputs
from dsv2.model import build_model
from dsv2.model.inference import prepare_for_inference, quantize_int8
from dsv2.kernels import cpu_moe
from dsv2.model.layers import MLP
from dsv2.model.moe import ExpertGroup, Experts

needs_compiler = pytest.mark.skipif(compiler_unavailable_reason() is not None,
                                    reason=f"torch.compile cannot build CPU code here: {compiler_unavailable_reason()}")

CFG = ModelConfig.from_dict({**TINY, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 64}})


def tiny_model(dtype=torch.float32):
    model = build_model(CFG, dtype=dtype, seed=0)
    model.init_weights(std=0.08)  # wide enough that attention and routing are far from uniform
    return model.eval().requires_grad_(False)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, CFG.vocab_size, (n,), generator=g).tolist() for n in lengths]


def assert_twins(model, lengths, forced_tokens=6, kv_cache_dtype="auto", rtol=1e-5, atol=1e-5,
                 cache_dtype=torch.float32):
    """Teacher-forced decode of len(lengths) sequences together, eager vs compiled, on the same weights."""
    ps, forced = prompts(lengths), prompts([forced_tokens] * len(lengths), seed=1)
    eager = ModelRunner(model, 40, 4, cache_dtype, kv_cache_dtype)
    fast = ModelRunner(model, 40, 4, cache_dtype, kv_cache_dtype, compile_decode=True)
    assert fast.compiled is not None
    for a, b in zip(eager.forced_logits(ps, forced), fast.forced_logits(ps, forced)):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
    assert fast.compiled is not None and fast.compiled.failed is None  # every decode step ran compiled
    assert fast.compiled.compile_s > 0
    return fast


@needs_compiler
def test_compiled_decode_equals_the_eager_step():
    """One sequence, then three of different lengths (contexts 5..25 over blocks of 4): both specialisations. The
    fp32 weights are plain, so the single sequence runs the generated matrix-vector products (Sealed's one-row
    path: linears, MLPs and the routed experts' in-place gather), the three the library matmuls."""
    model = tiny_model()
    fast = assert_twins(model, [9])
    assert fast.compiled._seen == {True}
    fast = assert_twins(model, [5, 18, 11], forced_tokens=8)
    assert fast.compiled._seen == {False}


@needs_compiler
def test_engines_side_by_side_each_run_their_own_compiled_step():
    """A compiled step runs with Dynamo's guards skipped but those telling its variants apart: engines that differ
    in what the graph takes as constants (cache format, block size, weights' dtype), used in turn in one process,
    must each still run their own variant -- the second round repeats the first bit for bit, and the fp32 engines
    match their eager twins."""
    fp32, bf16 = tiny_model(), tiny_model(torch.bfloat16)
    ps, forced = prompts([7, 13]), prompts([5, 5], seed=1)
    setups = [(fp32, 40, 4, torch.float32, "auto"), (fp32, 20, 8, torch.float32, "fp8"),
              (bf16, 40, 4, torch.bfloat16, "auto")]
    runners = [(ModelRunner(*s), ModelRunner(*s, compile_decode=True)) for s in setups]
    first = []
    for round in range(2):  # in turn, twice: the second round runs variants already built, guards skipped
        for i, ((eager, fast), setup) in enumerate(zip(runners, setups)):
            out = fast.forced_logits(ps, forced) + fast.forced_logits(ps[:1], forced[:1])  # batch 2, then 1
            assert fast.compiled.failed is None and fast.compiled._seen == {True, False}
            if setup[3] == torch.float32:
                ref = eager.forced_logits(ps, forced) + eager.forced_logits(ps[:1], forced[:1])
                for a, b in zip(ref, out):
                    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            if round == 0:
                first.append(out)
            else:
                assert all(torch.equal(a, b) for a, b in zip(first[i], out)), setups[i][1:]


@needs_compiler
@pytest.mark.skipif(cpu_moe.kernel() is None, reason=f"CPU kernel not built: {cpu_moe.unavailable_reason()}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_single_sequence_through_the_cpu_kernel(monkeypatch, dtype):
    """With every matrix counted large enough, the one-sequence step multiplies in kernels/moe_cpu.cpp (the
    dsv2::cpu_linear / cpu_mlp / cpu_experts operators) instead of generated loops: still the eager step's logits,
    within 1e-5 in fp32 and bf16's rounding in bf16 (the eager twin rounds each op's output where the compiled
    graph keeps fp32)."""
    monkeypatch.setattr(compiled_mod, "ONE_ROW_KERNEL_ELEMENTS", 0)
    model = tiny_model(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.15)
    fast = assert_twins(model, [9], cache_dtype=dtype, **tol)
    assert fast.compiled._seen == {True}
    sealed = [m for m in model.modules() if isinstance(m, Sealed) and type(m.inner) in (nn.Linear, MLP, Experts)]
    assert sealed and all(m.cpu_kernel for m in sealed)


@needs_compiler
def test_compiled_decode_with_int8_weights_and_the_fp8_cache():
    assert_twins(quantize_int8(tiny_model(), kernel=False), [6, 13])
    assert_twins(tiny_model(), [7, 12], kv_cache_dtype="fp8")


def bf16_twins_against_fp32(plan, lengths, seen=None):
    """The same random weights run in fp32 (the reference) and, rounded to bf16, in `plan`'s form eagerly and
    compiled; returns each bf16 run's largest logit error against the reference (teacher-forced decode).
    seen: a dict that gets the model ("model") and the sealed modules the compiled steps called eagerly ("eager":
    through dsv2::matrix_module / routed_experts, not as generated code or the CPU kernel's operators)."""
    ps, forced = prompts(lengths), prompts([6] * len(lengths), seed=1)
    ref_model = tiny_model()
    ref = ModelRunner(ref_model, 40, 4, torch.float32).forced_logits(ps, forced)
    model = build_model(CFG, dtype=plan.weight_dtype, init=False)
    model.load_state_dict(ref_model.state_dict())  # the same weights, rounded (the router stays fp32)
    model = prepare_for_inference(model, plan)
    eager = ModelRunner(model, 40, 4, plan.cache_dtype).forced_logits(ps, forced)
    fast = ModelRunner(model, 40, 4, plan.cache_dtype, compile_decode=True)
    if seen is not None:  # sealed by now; prefill calls the modules directly, not by handle
        sealed, seen["model"], seen["eager"] = compiled_mod._MODULES, model, []

        class Counting(dict):
            def __getitem__(self, handle):
                seen["eager"].append(type(sealed[handle]).__name__)
                return sealed[handle]
        compiled_mod._MODULES = Counting()
    try:
        compiled = fast.forced_logits(ps, forced)
    finally:
        if seen is not None:
            compiled_mod._MODULES = sealed
    assert fast.compiled is not None and fast.compiled.failed is None
    err = lambda runs: max((a - r).abs().max().item() for a, r in zip(runs, ref))
    return err(eager), err(compiled)


@needs_compiler
@pytest.mark.parametrize("packing", [None, False], ids=["default", "plain"])
def test_compiled_bf16_decode_is_no_less_accurate_than_eager(packing):
    """bf16 weights in this CPU's default form (oneDNN-prepacked on AVX-512, upcast to fp32 compute on AVX2) and
    unpacked (--no-weight-packing: one sequence runs the generated matrix-vector products). The compiled graph keeps
    fp32 through what it fuses where eager rounds each op to bf16, so the twins differ by bf16 rounding and the
    compiled step is the closer to fp32. Seen on logits spanning ~4 (AVX-512): eager 0.146 off fp32, compiled 0.140
    (packed) and 0.021 (plain, one sequence)."""
    plan = inference_plan("cpu", "auto", cpu_weight_packing=packing)
    for lengths in ([9], [7, 12]) if packing is None else ([9],):
        eager, compiled = bf16_twins_against_fp32(plan, lengths)
        assert eager < 0.5  # bf16's rounding, not a broken model
        assert compiled <= 1.1 * eager


@needs_compiler
@pytest.mark.skipif(cpu_moe.kernel() is None, reason=f"CPU kernel not built: {cpu_moe.unavailable_reason()}")
@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "generated"])
def test_compiled_single_sequence_on_the_upcast_plan(monkeypatch, kernel):
    """The default of CPUs without fast bf16 GEMMs (AVX2, most ARM): bf16 weights, fp32 compute. A single sequence's
    matrices all run in the CPU kernel (fp32 activations over the bf16 weights; every matrix counted large enough)
    or all in generated matrix-vector code -- none through the eager modules, which round decode activations to
    bf16 -- and the compiled step is no less accurate than eager."""
    from test_cpu_paths import fake_cpu
    monkeypatch.setattr(compiled_mod, "ONE_ROW_KERNEL_ELEMENTS", 0 if kernel else 1 << 62)
    plan = inference_plan("cpu", "auto", capability=fake_cpu("avx2"))
    assert plan.weights == "upcast" and plan.compute_dtype == torch.float32
    seen = {}
    eager, compiled = bf16_twins_against_fp32(plan, [9], seen)
    assert seen["eager"] == []
    sealed = [m for m in seen["model"].modules() if isinstance(m, Sealed)]
    assert {type(m.inner).__name__ for m in sealed} == {"UpcastLinear", "UpcastMLP", "UpcastExperts"}
    assert all(m.cpu_kernel == kernel for m in sealed)
    assert eager < 0.5 and compiled <= 1.1 * eager


@needs_compiler
def test_compiled_upcast_decode_on_either_side_of_the_gemv_row_limit():
    """Upcast modules choose their kernel by row count (torch's half-precision GEMV up to gemv_rows, an fp32 GEMM
    above), so a batched step keeps them opaque: batches on either side of the limit run one compiled variant (a
    traced choice would guard on the batch size, and recompiling under skipped guards raises), equal to eager."""
    from test_cpu_paths import fake_cpu
    plan = inference_plan("cpu", "auto", capability=fake_cpu("avx2"))
    assert plan.weights == "upcast" and plan.gemv_rows == 2
    model = build_model(CFG, dtype=plan.weight_dtype, init=False)
    model.load_state_dict(tiny_model().state_dict())
    model = prepare_for_inference(model, plan)
    eager = ModelRunner(model, 40, 4, plan.cache_dtype)
    fast = ModelRunner(model, 40, 4, plan.cache_dtype, compile_decode=True)
    for lengths in ([7, 12], [5, 9, 12], [7, 12]):
        ps, forced = prompts(lengths), prompts([4] * len(lengths), seed=1)
        for a, b in zip(eager.forced_logits(ps, forced), fast.forced_logits(ps, forced)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        assert fast.compiled is not None and fast.compiled.failed is None and fast.compiled._seen == {False}


@needs_compiler
def test_llm_with_compile_decode_generates_what_eager_generates(tmp_path):
    from dsv2 import LLM, SamplingParams
    path = make_llm_dir(tmp_path / "m")
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    texts = ["def read(path):", "import os\n", "class A:"]
    outs = {}
    for compile_decode in (False, True):
        llm = LLM(path, dtype="float32", compile_decode=compile_decode, kv_cache_memory="8MiB")
        assert llm.warm_up() >= 0
        assert (llm.runner.compiled is not None) == compile_decode
        outs[compile_decode] = [o.outputs[0].token_ids for o in llm.generate(texts, greedy)]
        outs[compile_decode].append(llm.generate(texts[0], greedy)[0].outputs[0].token_ids)  # alone: batch 1
    assert outs[True] == outs[False]


def test_sealing_keeps_the_eager_output_and_reads_through():
    model = tiny_model()
    ids = torch.tensor([prompts([12])[0]])
    before = model(ids)
    lm_head = model.lm_head
    seal(model)
    assert isinstance(model.lm_head, Sealed) and model.lm_head.inner is lm_head
    assert model.lm_head.weight is lm_head.weight and model.lm_head.out_features == CFG.vocab_size
    assert any(isinstance(m, ExpertGroup) for m in model.modules())  # still found by whoever looks for them
    assert torch.equal(model(ids), before)
    handles = [m.handle for m in model.modules() if isinstance(m, Sealed)]
    assert len(handles) == len(set(handles)) and seal(model) is model  # idempotent
    assert [m.handle for m in model.modules() if isinstance(m, Sealed)] == handles


def test_without_a_compiler_decode_stays_eager_and_says_why(monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    reason = compiler_unavailable_reason()
    assert reason is not None and "C++ compiler" in reason
    from dsv2.cli.info import describe_system
    assert describe_system("cpu")["compiled_decode"] == {"available": False, "reason": reason}  # dsv2 info --system
    runner = ModelRunner(tiny_model(), 40, 4, torch.float32, compile_decode=True)
    assert runner.compiled is None
    assert "decode runs eagerly (no C++ compiler" in capsys.readouterr().err


def with_stand_in(runner, compiled):
    """The runner with a CompiledDecode whose compiled function is `compiled` (rows -> logits)."""
    runner.compiled = compiled_mod.CompiledDecode.__new__(compiled_mod.CompiledDecode)
    runner.compiled.__dict__.update(runner=runner, compile_s=0.0, _seen=set(), failed=None, skip_guards=True,
                                    compiled=compiled)
    return runner


def broken(rows):
    raise RuntimeError("no luck\nsecond line")


def test_a_compilation_that_fails_falls_back_to_eager(capsys):
    model = tiny_model()
    ps, forced = prompts([6, 9]), prompts([3, 3], seed=1)
    want = ModelRunner(model, 40, 4, torch.float32).forced_logits(ps, forced)
    runner = with_stand_in(ModelRunner(model, 40, 4, torch.float32), broken)
    for a, b in zip(want, runner.forced_logits(ps, forced)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert runner.compiled is None
    assert "compiling the decode step failed: RuntimeError: no luck" in capsys.readouterr().err


def test_a_guard_failing_while_guards_are_skipped_turns_them_back_on():
    """Steps of a built variant skip Dynamo's guards; should one of them fail after all, Dynamo raises rather than
    recompile. The step then runs with every guard evaluated (compiling what it needs), as do the engine's later
    steps -- the same logits, nothing lost. Here the compiled function is the eager one behind a stand-in that
    raises as Dynamo does on the third step."""
    import torch._dynamo.eval_frame as eval_frame
    model = tiny_model()
    ps, forced = prompts([6, 9]), prompts([4, 4], seed=1)
    want = ModelRunner(model, 40, 4, torch.float32).forced_logits(ps, forced)
    stances = []

    def stand_in(rows):
        stances.append(eval_frame._stance.skip_guard_eval_unsafe)
        if len(stances) == 3:
            raise RuntimeError("Recompilation triggered with skip_guard_eval_unsafe stance. This usually means ...")
        return compiled_mod.static_decode(runner, rows)
    runner = with_stand_in(ModelRunner(model, 40, 4, torch.float32), stand_in)
    for a, b in zip(want, runner.forced_logits(ps, forced)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert runner.compiled is not None and runner.compiled.failed is None and not runner.compiled.skip_guards
    assert stances == [False, True, True, False, False]  # compiled; skipped; raised -> again with guards; guards


def test_what_cannot_be_compiled_says_why():
    dynamic = ModelConfig.from_dict({**TINY, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert "dynamic NTK" in unsupported_reason(build_model(dynamic, seed=0), torch.device("cpu"))
    assert "CPU path" in unsupported_reason(tiny_model(), torch.device("meta"))
