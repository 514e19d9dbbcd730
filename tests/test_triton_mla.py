"""The Triton MLA decode kernel (dsv2.kernels.triton_mla) against its twin, the model's own absorbed decode math
(MLA.attend_latent over the context gathered from the paged cache, dequantized for fp8 as mla.py does), under the
Triton interpreter on CPU: batch sizes, context lengths (1, block multiples and not), 1-20 heads (one and two head
blocks), shuffled non-contiguous block tables, split counts with empty splits, fp32 / fp16 / bf16 / fp8 caches, the
real V2 widths. On a GPU (-m gpu) the compiled kernel against the same twin.

triton.language decorates its own helpers when triton is first imported, in interpreter mode only if
TRITON_INTERPRET=1 is set by then; other tests (torch.compile) may have imported it already. So unless this run
started with TRITON_INTERPRET=1, the CPU cases run in one spawned worker process that starts with it set.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton, or the dev extras)")
IN_PROCESS = os.environ.get("TRITON_INTERPRET") == "1"

from dsv2.config import ModelConfig  # noqa: E402
from dsv2.kernels.triton_mla import mla_decode, paged_slots  # noqa: E402
from dsv2.model.mla import MLA, Fp8Latent, latent_attention  # noqa: E402
from conftest import TINY  # noqa: E402


@pytest.fixture(scope="module")
def interpreted():
    """run(fn, **kw): fn(**kw) under the Triton interpreter, here or in the worker process."""
    if IN_PROCESS:
        yield lambda fn, **kw: fn(**kw)
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")  # inherited by the worker, which imports triton afresh
        mp.setenv("OMP_NUM_THREADS", "1")
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            yield lambda fn, **kw: pool.submit(fn, **kw).result()


def twin(rank: int, rope: int, heads: int) -> MLA:
    """An MLA (on meta: attend_latent needs only its softmax scale and rank) with these widths."""
    cfg = ModelConfig.from_dict({**TINY, "kv_lora_rank": rank, "qk_rope_head_dim": rope,
                                 "num_attention_heads": heads})
    with torch.device("meta"):
        return MLA(cfg, 0)


def paged_case(lens, heads, rank, rope, dtype, fp8: bool, block_size=16, seed=0, device="cpu"):
    """Random queries and a random paged cache; each sequence's blocks drawn without replacement from a shuffled
    pool (non-contiguous, out of order), block-table rows padded with a spare block's id."""
    g = torch.Generator().manual_seed(seed)
    W = max(-(-n // block_size) for n in lens)
    num_blocks = len(lens) * W + 3
    tables = torch.randperm(num_blocks, generator=g)[:len(lens) * W].view(len(lens), W)
    for i, n in enumerate(lens):
        tables[i, -(-n // block_size):] = num_blocks - 1  # entries past the context: never read
    q = torch.randn(len(lens), heads, rank + rope, generator=g).to(dtype)
    latent = torch.randn(num_blocks * block_size, rank + rope, generator=g) * 2
    fmt = Fp8Latent(rank, rope) if fp8 else None
    cache = (fmt.quantize(latent) if fp8 else latent.to(dtype)).view(num_blocks, block_size, -1)
    lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q.to(device), cache.to(device), tables.int().to(device), lens, fmt


def reference(mla: MLA, q, cache, tables, lens, fmt):
    """What mla.py computes without the kernel: gather each context's rows, dequantize once, and attend with a padding
    mask in plain fp32 operations (mla.latent_attention, the slow twin of every fused form)."""
    slots, pad = paged_slots(tables, lens, cache.shape[1])
    rows = cache.view(-1, cache.shape[-1]).index_select(0, slots)
    ctx = (fmt.dequantize(rows) if fmt else rows).view(q.shape[0], pad.shape[1], -1)
    return latent_attention(q, ctx, pad, mla.rank, mla.softmax_scale)


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def check(lens, heads, rank=64, rope=16, dtype=torch.float32, fp8=False, splits=None, device="cpu", seed=0):
    mla = twin(rank, rope, heads)
    q, cache, tables, lens_t, fmt = paged_case(lens, heads, rank, rope, dtype, fp8, seed=seed, device=device)
    got = mla_decode(q, cache, tables, lens_t, rank, mla.softmax_scale, fmt, num_splits=splits)
    want = reference(mla, q, cache, tables, lens_t, fmt)
    assert got.shape == (len(lens), heads, rank) and got.dtype == q.dtype
    scale = float(want.float().abs().max())
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=TOL[dtype] * scale)


def zero_length_gives_zeros():
    mla = twin(64, 16, 4)
    q, cache, tables, _, _ = paged_case([8, 8], 4, 64, 16, torch.float32, False)
    out = mla_decode(q, cache, tables, torch.tensor([0, 8], dtype=torch.int32), 64, mla.softmax_scale)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and out[1].abs().sum() > 0


@pytest.mark.parametrize("lens,heads,splits", [
    ([1], 1, 1),  # one token, one head
    ([16, 17, 5], 2, 3),  # a block multiple, one past it, and splits of one sequence left empty
    ([40, 1, 33, 64, 7], 8, 2),
    ([50, 3], 20, 4),  # two head blocks, the second padded
    ([100], 16, 7),  # more splits than inner steps: empty splits combine to nothing
])
def test_fp32_cache_matches_the_absorbed_decode(interpreted, lens, heads, splits):
    interpreted(check, lens=lens, heads=heads, splits=splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_caches(interpreted, dtype):
    interpreted(check, lens=[37, 2, 16], heads=4, dtype=dtype, splits=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fp8_cache_is_decoded_in_the_kernel(interpreted, dtype):
    interpreted(check, lens=[33, 9, 1], heads=3, dtype=dtype, fp8=True, splits=3)


def test_real_widths_and_a_rank_that_is_no_power_of_two(interpreted):
    interpreted(check, lens=[70, 5], heads=16, rank=512, rope=64, dtype=torch.float16, fp8=True, splits=2)
    interpreted(check, lens=[20], heads=2, rank=100, rope=8, splits=1)  # padded to 128 / 16 and masked


def test_default_splits_and_empty_contexts(interpreted):
    """The default split count (shape-based) gives the same answer; a zero context length gives zeros, not NaN."""
    interpreted(check, lens=[25, 3], heads=4)
    interpreted(zero_length_gives_zeros)


def test_bad_inputs_are_named():
    q, cache, tables, lens, _ = paged_case([4], 2, 64, 16, torch.float32, False)
    with pytest.raises(ValueError, match="wide"):
        mla_decode(q, cache[..., :70], tables, lens, 64, 0.1)
    with pytest.raises(ValueError, match="fp8"):
        mla_decode(q, cache, tables, lens, 64, 0.1, Fp8Latent(64, 16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,fp8", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, False)])
def test_compiled_kernel_on_cuda(dtype, fp8):
    check([1, 300, 4097, 16, 64], heads=16, rank=512, rope=64, dtype=dtype, fp8=fp8, device="cuda")
    check([129, 2], heads=2, rank=512, rope=64, dtype=dtype, fp8=fp8, device="cuda")  # a tensor-parallel shard
