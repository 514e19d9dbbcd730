"""Weight-only int8: both matmul paths against the fp32 slow twin, the quantized model against the original, and
the engine on a quantized model against a naive loop over the same quantized model."""
from __future__ import annotations

import pytest
import torch

import dsv2
from conftest import YARN, make_hf_model, naive_greedy
from dsv2.engine.llm import LLM
from dsv2.engine.sampling_params import SamplingParams
from dsv2.model.inference import quantize_int8
from dsv2.model.quant import (GEMV_ROWS, Int8Experts, Int8Linear, Int8MLP, dequantize_rows, int8_linear,
                              int8_linear_reference, quantize_rows)


def test_quantize_rows_error_is_half_a_step():
    w = torch.randn(3, 40, 96) * torch.linspace(0.01, 2.0, 40)[:, None]  # rows of very different ranges
    q, s = quantize_rows(w, torch.float32)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.shape == (3, 40)
    assert int(q.abs().max()) == 127  # each row's largest entry maps to +-127
    err = (dequantize_rows(q, s, torch.float32) - w).abs()
    assert (err <= s.unsqueeze(-1) / 2 + 1e-7).all()


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, GEMV_ROWS, GEMV_ROWS + 1, 37])
@pytest.mark.parametrize("k", [64, 24])  # 24: not a multiple of the CPU kernel's block of 16
def test_int8_linear_paths_equal_the_reference(dtype, rows, k, kernel):
    g = torch.Generator().manual_seed(rows)
    lin = torch.nn.Linear(k, 48, bias=True).to(dtype)
    torch.nn.init.normal_(lin.weight, 0, 0.2, generator=g)
    torch.nn.init.normal_(lin.bias, 0, 0.2, generator=g)
    layer = Int8Linear(lin, kernel=kernel)
    x = torch.randn(rows, k, generator=g).to(dtype)
    ref = int8_linear_reference(x, layer.qweight, layer.scale, layer.bias).float()
    out = layer(x)
    assert out.dtype == dtype and out.shape == (rows, 48)
    # the kernel (decode rows, K a multiple of 16) rounds activations to bf16; dequantize + matmul in fp32 does not
    kernel_ran = kernel and rows <= GEMV_ROWS and k % 16 == 0
    exact = dtype == torch.float32 and not kernel_ran
    tol = 1e-5 if exact else 2e-2 * ref.abs().max().item()
    assert (out.float() - ref).abs().max() <= tol
    # leading dims are kept
    assert layer(x.view(1, rows, k)).shape == (1, rows, 48)


def test_int8_linear_small_and_large_row_paths_agree():
    """The decode path (int8 GEMV kernel) and the prefill path (dequantize + matmul) give the same rows, both
    within bf16 rounding of the fp32 reference."""
    g = torch.Generator().manual_seed(0)
    q, s = quantize_rows(torch.randn(80, 128, generator=g))
    x = torch.randn(9, 128, generator=g).bfloat16()
    many = int8_linear(x, q, s, kernel_scale=s.bfloat16())  # 9 rows as one call: still the kernel (<= GEMV_ROWS)
    one_by_one = torch.cat([int8_linear(x[i:i + 1], q, s, kernel_scale=s.bfloat16()) for i in range(9)])
    dequantized = int8_linear(x, q, s)  # no kernel: dequantize to bf16 + matmul
    ref = int8_linear_reference(x.float(), q, s)
    torch.testing.assert_close(one_by_one, many, rtol=0, atol=0)  # row i does not depend on the other rows
    for y in (one_by_one, dequantized):
        assert (y.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_hf_model(tmp_path_factory.mktemp("q") / "m", rope=YARN, topk_method="group_limited_greedy",
                            n_group=4, topk_group=2)
    return path


def test_quantized_model_is_close_to_the_original_and_half_the_size(tiny):
    model = dsv2.load_model(tiny)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
    matrix_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if p.dim() >= 2 and "embed" not in n and "kv_b_proj" not in n and ".gate." not in n)
    quantize_int8(model)
    kinds = {type(m) for m in model.modules()}
    assert {Int8Linear, Int8MLP, Int8Experts} <= kinds and not any(type(m) is torch.nn.Linear and n.split(".")[-1]
                                                                   != "kv_b_proj" for n, m in model.named_modules())
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32  # the router is untouched
    int8_bytes = sum(b.numel() for b in model.buffers() if b.dtype == torch.int8)
    assert int8_bytes * 4 == matrix_bytes  # fp32 -> int8: every quantized matrix is a quarter of its bytes
    with torch.no_grad():
        out = model(ids)
        bf16 = dsv2.load_model(tiny, dtype=torch.bfloat16)(ids)  # for scale: what bf16 rounding alone does
    err, bf16_err = (out - ref).abs(), (bf16 - ref).abs()
    assert 0 < err.mean() <= 2 * bf16_err.mean(), (err.mean(), bf16_err.mean())  # int8 rows ~ bf16's 8-bit mantissa
    assert err.max() <= 0.1 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_on_int8_weights_equals_naive_loop_on_the_same_weights(tiny, dtype):
    llm = LLM(tiny, dtype=dtype, quantization="int8", block_size=4, max_num_batched_tokens=32)
    assert llm.quantization == "int8"
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 128, (n,), generator=g).tolist() for n in (5, 23, 11)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, ignore_eos=True, max_tokens=12))
    matches = [o.token_ids == naive_greedy(llm.model, p, 12) for p, o in zip(prompts, outs)]
    if dtype == "float32":
        assert all(matches)
    else:  # bf16: decode's GEMV kernel and prefill's matmul round differently; near-ties may flip late tokens
        assert sum(matches) >= 2
        for p, o in zip(prompts, outs):
            assert o.token_ids[:4] == naive_greedy(llm.model, p, 4)
    assert llm.allocator.num_free_blocks == llm.num_blocks


def test_unsupported_quantization_is_refused_with_the_options(tiny):
    with pytest.raises(ValueError, match=r"quantization='fp8'.*\['int8'\]"):
        LLM(tiny, quantization="fp8")
