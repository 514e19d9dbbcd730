"""The CPU decode attention kernel (kernels/mla_decode_cpu.cpp, built at first use) against its slow twin
mla.latent_attention over the same gathered context; the SDPA form it falls back to; the build for another vector
ISA (AVX2 flags on an x86 machine, in a subprocess); and the engine's decode with and without the kernel."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from conftest import YARN, make_hf_model
from dsv2.engine.llm import LLM
from dsv2.engine.sampling_params import SamplingParams
from dsv2.kernels import cpu_mla, paged_slots
from dsv2.model.mla import latent_attention

KERNEL = cpu_mla.decode_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"kernel not built: {cpu_mla.unavailable_reason()}")


def paged_case(B, n, R, Dr, BS, lens, dtype, seed=0, q_std=2.0, extra_blocks=1):
    """A shuffled paged cache, block tables wider than the longest context (entries past a context are junk blocks
    that must not be read), and queries whose scores reach a few tens."""
    g = torch.Generator().manual_seed(seed)
    D, NB = R + Dr, 4 * sum(-(-l // BS) + extra_blocks for l in lens)
    cache = (torch.randn(NB, BS, D, generator=g) * 2).to(dtype)
    W = max(-(-l // BS) for l in lens) + extra_blocks
    tables = torch.randperm(NB, generator=g)[:B * W].view(B, W).int()
    q = (torch.randn(B, n, D, generator=g) * q_std).to(dtype)
    return q, cache, tables, torch.tensor(lens, dtype=torch.int32)


def twin(q, cache, tables, lens, R, scale):
    """The gathered context attended in fp64 by the written-out math (mla.latent_attention)."""
    slots, pad = paged_slots(tables, lens, cache.shape[1])
    latent = cache.view(-1, cache.shape[-1]).index_select(0, slots).view(*pad.shape, -1)
    return latent_attention(q.double(), latent.double(), pad, R, scale)


CASES = [  # B, n, R, Dr, BS, lens
    (1, 8, 256, 32, 16, [1000]),  # the mini bench model's widths
    (3, 4, 64, 16, 16, [1, 17, 300]),  # a one-position context, a block and one, several blocks
    (2, 16, 512, 64, 64, [5, 640]),  # V2's widths, 64-slot blocks, a context of exactly 10 blocks
    (5, 3, 32, 8, 8, [9, 8, 7, 100, 1]),  # a head count that is not a multiple of four
    (2, 5, 48, 16, 4, [33, 2]),
]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_the_fp32_twin(case, dtype):
    B, n, R, Dr, BS, lens = case
    q, cache, tables, lens_t = paged_case(B, n, R, Dr, BS, lens, dtype)
    ref = twin(q, cache, tables, lens_t, R, 0.15)
    for splits in (None, 1, 3, 7):  # ranges of blocks per sequence, some of them past every context
        out = cpu_mla.mla_decode_cpu(KERNEL, q, cache, tables, lens_t, R, 0.15, splits)
        assert out.dtype == dtype and out.shape == (B, n, R) and out.is_contiguous()
        if dtype == torch.float32:  # fp32 throughout: summation order apart, the same arithmetic
            torch.testing.assert_close(out.double(), ref, atol=2e-5 * ref.abs().max().item(), rtol=0)
        else:  # bf16 in and out: the output's own rounding
            rounding = (ref.to(dtype).double() - ref).abs().max()
            assert (out.double() - ref).abs().max() <= 2 * rounding, splits


@needs_kernel
def test_kernel_reads_strided_tables_and_takes_an_fp32_query_over_a_bf16_cache():
    """Compiled decode hands the kernel views of its input rows ([token | position | length | table] per sequence):
    tables and lengths are read through their strides. An fp32 query over a bf16 cache (fp32 compute, bf16 cache)
    takes the fp32 scores and gives an fp32 output."""
    q, cache, tables, lens = paged_case(3, 6, 64, 16, 8, [19, 1, 40], torch.bfloat16)
    rows = torch.zeros(3, 3 + tables.shape[1], dtype=torch.int32)
    rows[:, 2], rows[:, 3:] = lens, tables
    q32 = q.float() * 1.001  # not bf16-representable
    out = cpu_mla.mla_decode_cpu(KERNEL, q32, cache, rows[:, 3:], rows[:, 2], 64, 0.2)
    assert out.dtype == torch.float32
    ref = twin(q32, cache, tables, lens, 64, 0.2)
    torch.testing.assert_close(out.double(), ref, atol=2e-5 * ref.abs().max().item(), rtol=0)


@needs_kernel
def test_kernel_survives_extreme_scores():
    """Scores hundreds apart (weights that underflow to exactly 0, a running max that jumps between blocks) and a
    zero query (uniform weights: the output is the context's mean)."""
    q, cache, tables, lens = paged_case(2, 4, 32, 8, 4, [50, 37], torch.float32, q_std=40.0)
    ref = twin(q, cache, tables, lens, 32, 1.0)
    out = cpu_mla.mla_decode_cpu(KERNEL, q, cache, tables, lens, 32, 1.0, 3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-5)
    zero = torch.zeros_like(q)
    out = cpu_mla.mla_decode_cpu(KERNEL, zero, cache, tables, lens, 32, 1.0, 2)
    torch.testing.assert_close(out.double(), twin(zero, cache, tables, lens, 32, 1.0), atol=1e-5, rtol=0)


@needs_kernel
def test_paged_operator_uses_the_kernel_and_its_fallback_agrees(monkeypatch):
    """dsv2::paged_latent_attention (what compiled decode calls) with the kernel, and with it unavailable (the
    SDPA form over the gathered context): both within bf16 rounding of the twin."""
    q, cache, tables, lens = paged_case(3, 8, 64, 16, 16, [40, 3, 129], torch.bfloat16)
    ref = twin(q, cache, tables, lens, 64, 0.2)
    rounding = (ref.bfloat16().double() - ref).abs().max()
    calls = []
    real = cpu_mla.mla_decode_cpu
    monkeypatch.setattr(cpu_mla, "mla_decode_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    with_kernel = torch.ops.dsv2.paged_latent_attention(q, cache, tables, lens, 64, 0.2)
    assert calls and (with_kernel.double() - ref).abs().max() <= 2 * rounding
    monkeypatch.setattr(cpu_mla, "decode_kernel", lambda: None)
    calls.clear()
    fallback = torch.ops.dsv2.paged_latent_attention(q, cache, tables, lens, 64, 0.2)
    assert not calls and fallback.is_contiguous() and (fallback.double() - ref).abs().max() <= 2 * rounding



needs_amx = pytest.mark.skipif(KERNEL is None or not cpu_mla.amx(),
                               reason="AMX tiles: a CPU with AMX-BF16 (Intel Sapphire Rapids or later) and Linux")
AMX_CASES = [  # B, n, R, Dr, BS, lens: latent and rope widths multiples of 32 (the tile path's shapes)
    (1, 8, 256, 32, 16, [1000]),  # the mini bench model's widths
    (3, 4, 64, 32, 16, [1, 17, 300]),  # a one-position context, a block and one, several blocks
    (2, 16, 512, 64, 64, [5, 640]),  # V2's widths, 64-slot blocks (chunks of 16 rows)
    (2, 20, 128, 32, 24, [50, 7]),  # two head groups (16 + 4), blocks of 24 (chunks of 12 rows)
    (3, 5, 64, 32, 5, [33, 2, 5]),  # odd chunks of 5 rows (weights and V rows padded to pairs)
    (2, 3, 32, 32, 1, [9, 4]),  # one-slot blocks
]


@needs_amx
@pytest.mark.parametrize("case", AMX_CASES)
def test_amx_tiles_match_the_twin_and_the_vector_path(case, monkeypatch):
    """bf16 query and cache: the tile path (scores by tile products, weights split into two bf16 parts) within bf16
    rounding of the fp64 twin, as the vector path is, over splits that leave ranges past every context."""
    B, n, R, Dr, BS, lens = case
    q, cache, tables, lens_t = paged_case(B, n, R, Dr, BS, lens, torch.bfloat16)
    ref = twin(q, cache, tables, lens_t, R, 0.15)
    rounding = (ref.bfloat16().double() - ref).abs().max()
    for splits in (None, 1, 3, 7):
        monkeypatch.setattr(cpu_mla, "USE_AMX", True)
        tiles = cpu_mla.mla_decode_cpu(KERNEL, q, cache, tables, lens_t, R, 0.15, splits)
        monkeypatch.setattr(cpu_mla, "USE_AMX", False)
        vector = cpu_mla.mla_decode_cpu(KERNEL, q, cache, tables, lens_t, R, 0.15, splits)
        assert (tiles.double() - ref).abs().max() <= 2 * rounding, splits
        assert (tiles.double() - vector.double()).abs().max() <= 2 * rounding, splits


@needs_amx
def test_amx_tiles_never_read_slots_past_the_context(monkeypatch):
    """Tiles load whole chunks of a block: slots past a context (NaN and infinity bits here, as a freed or unwritten
    slot may hold) must change nothing, and the rows of the block before must be read."""
    q, cache, tables, lens = paged_case(2, 8, 256, 32, 16, [37, 5], torch.bfloat16)
    ref = twin(q, cache, tables, lens, 256, 0.1)
    poisoned = cache.clone()
    for b, length in enumerate(lens.tolist()):
        last = tables[b, (length - 1) // 16]
        poisoned[last, (length - 1) % 16 + 1:] = float("nan")
        poisoned[tables[b, (length - 1) // 16 + 1]] = float("inf")  # the table's next entry: a junk block
    monkeypatch.setattr(cpu_mla, "USE_AMX", True)
    clean = cpu_mla.mla_decode_cpu(KERNEL, q, cache, tables, lens, 256, 0.1, 2)
    dirty = cpu_mla.mla_decode_cpu(KERNEL, q, poisoned, tables, lens, 256, 0.1, 2)
    assert torch.equal(clean, dirty)
    assert (clean.double() - ref).abs().max() <= 2 * (ref.bfloat16().double() - ref).abs().max()
    zero = torch.zeros_like(q)  # uniform weights: the mean of the context's rows, the poisoned block's included
    torch.testing.assert_close(cpu_mla.mla_decode_cpu(KERNEL, zero, poisoned, tables, lens, 256, 0.1).double(),
                               twin(zero, cache, tables, lens, 256, 0.1), atol=2e-2, rtol=0)


def test_build_says_why_it_cannot(monkeypatch, tmp_path):
    monkeypatch.setenv("DSV2_NO_CPU_KERNELS", "1")
    with pytest.raises(RuntimeError, match="DSV2_NO_CPU_KERNELS"):
        cpu_mla._build()
    monkeypatch.delenv("DSV2_NO_CPU_KERNELS")
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, c++ or clang++ either
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        cpu_mla._build()


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 vector ISAs")
def test_the_avx2_build_runs_and_matches(tmp_path):
    """What an AVX2 machine gets: with torch restricted to AVX2 the kernel is built with AVX2 flags (no AVX-512),
    into a fresh cache, and matches the twin. Run in a subprocess: the capability is read once per process."""
    script = (
        "import torch, sys; sys.path.insert(0, %r)\n"
        "from test_cpu_mla import paged_case, twin\n"
        "from dsv2.kernels import cpu_mla\n"
        "flags = cpu_mla.arch_flags(); assert flags == ['-mavx2', '-mfma', '-mf16c'], flags\n"
        "k = cpu_mla.decode_kernel(); assert k is not None, cpu_mla.unavailable_reason()\n"
        "q, cache, tables, lens = paged_case(3, 5, 64, 16, 16, [70, 1, 33], torch.float32)\n"
        "out = cpu_mla.mla_decode_cpu(k, q, cache, tables, lens, 64, 0.2, 3)\n"
        "ref = twin(q, cache, tables, lens, 64, 0.2)\n"
        "assert (out.double() - ref).abs().max() <= 2e-5 * ref.abs().max(), (out.double() - ref).abs().max()\n"
        "import os; print(os.listdir(cpu_mla.cache_dir()))\n") % os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "DSV2_CPU_CAPABILITY": "avx2",
           "XDG_CACHE_HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "mla_decode_cpu-" in p.stdout  # built into the fresh cache, not taken from the usual one


@needs_kernel
def test_engine_decode_with_and_without_the_kernel(tmp_path, monkeypatch):
    """Eager CPU decode through block tables and the kernel against the padded-group path (SDPA) it replaces:
    fp32, contexts of different lengths in one batch, block size 4 (many blocks, a table per sequence)."""
    path = str(make_hf_model(tmp_path / "m", rope=YARN, std=0.15)[0])
    calls = []
    real = cpu_mla.mla_decode_cpu
    monkeypatch.setattr(cpu_mla, "mla_decode_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompts = [torch.randint(2, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 41, 17)]
    params = SamplingParams(max_tokens=10, logprobs=4, temperature=0, ignore_eos=True)
    runs = []
    for use_kernel in (True, False):
        llm = LLM(path, dtype="float32", block_size=4)
        llm.runner._use_decode_kernel = use_kernel
        calls.clear()
        runs.append(llm.generate(prompts, params))
        assert bool(calls) is use_kernel
    for a, b in zip(*runs):
        assert a.token_ids == b.token_ids
        for pa, pb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for tok, lp in pa.items():
                assert abs(lp.logprob - pb[tok].logprob) <= 1e-5
