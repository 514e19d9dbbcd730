"""Weight-only int8 and int4: every matmul path (kernel, tiles, each int4 layout) against its fp32 slow twin, the
quantized modules and models against the originals, state dicts that load on another layout, and the engine on a
quantized model against a naive loop over the same quantized model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dsv2
from conftest import YARN, make_hf_model, naive_greedy
from dsv2.engine.llm import LLM
from dsv2.engine.sampling_params import SamplingParams
import dsv2.model.int4 as int4
from dsv2.capability import inference_plan
from dsv2.model.inference import prepare_for_inference, quantize_int8
from dsv2.model.int4 import (PLAIN, Int4Experts, Int4Linear, Int4MLP, choose_layout, dequantize_groups,
                             int4_linear_reference, pack, pack_nibbles, quantize_groups, unpack)
from dsv2.model.layers import MLP
from dsv2.model.quant import (GEMV_ROWS, Int8Experts, Int8Linear, Int8MLP, dequantize_rows, int8_linear,
                              int8_linear_reference, quantize_rows)

CPU_LAYOUT = choose_layout(64, 64, 32, True, "cpu")  # torch's packing at this CPU level (PLAIN if no kernel)


def test_quantize_rows_error_is_half_a_step():
    w = torch.randn(3, 40, 96) * torch.linspace(0.01, 2.0, 40)[:, None]  # rows of very different ranges
    q, s = quantize_rows(w, torch.float32)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.shape == (3, 40)
    assert int(q.abs().max()) == 127  # each row's largest entry maps to +-127
    err = (dequantize_rows(q, s, torch.float32) - w).abs()
    assert (err <= s.unsqueeze(-1) / 2 + 1e-7).all()


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, GEMV_ROWS, GEMV_ROWS + 1, 37, 300])
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


@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_on_quantized_weights_equals_naive_loop_on_the_same_weights(tiny, dtype, quantization):
    llm = LLM(tiny, dtype=dtype, quantization=quantization, block_size=4, max_num_batched_tokens=32)
    assert llm.quantization == quantization == llm.plan.weights
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 128, (n,), generator=g).tolist() for n in (5, 23, 11)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, ignore_eos=True, max_tokens=12))
    matches = [o.token_ids == naive_greedy(llm.model, p, 12) for p, o in zip(prompts, outs)]
    if dtype == "float32":  # no kernel: every product dequantized in fp32
        assert all(matches)
    else:  # bf16: decode's kernels and prefill's tiles round differently; near-ties may flip late tokens
        assert sum(matches) >= 2
        for p, o in zip(prompts, outs):
            assert o.token_ids[:4] == naive_greedy(llm.model, p, 4)
    assert llm.allocator.num_free_blocks == llm.num_blocks


def test_unsupported_quantization_is_refused_with_the_options(tiny):
    with pytest.raises(ValueError, match=r"quantization='fp8'.*\['int8', 'int4'\]"):
        LLM(tiny, quantization="fp8")


def test_int8_many_rows_go_by_tiles_never_the_whole_matrix(monkeypatch):
    """Above the kernel's rows the matrix is dequantized a tile of rows at a time into the shared tile buffer, and
    the product equals the fp32 twin whatever the tile size."""
    import dsv2.model.quant as quant
    g = torch.Generator().manual_seed(0)
    q, s = quantize_rows(torch.randn(200, 96, generator=g))
    x = torch.randn(40, 96, generator=g)
    ref = int8_linear_reference(x, q, s)
    seen = []
    real = quant.linear_by_tiles
    monkeypatch.setattr(quant, "linear_by_tiles", lambda x2, n, tile, step: seen.append(step) or real(x2, n, tile,
                                                                                                     step))
    for tile in (96 * 7, 96 * 64, 1 << 20):  # 7 rows a tile (a short last one), 64, the whole matrix
        monkeypatch.setattr(quant, "TILE", tile)
        torch.testing.assert_close(int8_linear(x, q, s), ref, rtol=1e-5, atol=1e-5)
    assert seen == [7, 64, (1 << 20) // 96]


# ---- int4 ------------------------------------------------------------------------------------------------------
def test_int4_groups_round_to_their_nearest_code():
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 2.0, 40)[:, None]
    w[3, :128] = 0.5  # a constant group at every size: scale ~0, every code the same value
    for g in (32, 64, 128):
        q, sz = quantize_groups(w, g)
        assert q.dtype == torch.uint8 and q.shape == w.shape and int(q.max()) <= 15
        assert sz.shape == (256 // g, 40, 2) and sz.dtype == torch.bfloat16
        scale = sz[..., 0].float().T.repeat_interleave(g, dim=1)  # [40, 256]
        err = (dequantize_groups(q, sz) - w).abs()
        # half a step, plus what rounding scale and zero to bf16 moves the group's values (~2^-8 of their size)
        assert (err <= scale / 2 + w.abs() * 2 ** -7 + 1e-6).all()
        assert err[3, :128].max() <= 0.5 * 2 ** -8


@pytest.mark.skipif(CPU_LAYOUT == PLAIN, reason="no int4 kernel on this CPU / torch")
@pytest.mark.parametrize("n", [16, 48, 80, 176, 256])  # whole blocks, a shorter last block, both
def test_int4_cpu_packing_reads_back(n):
    """unpack() reads torch's CPU packing back to the codes, for whole and short blocks, from any block boundary."""
    q = torch.randint(0, 16, (n, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    p = pack(q, CPU_LAYOUT)
    assert p.shape == (n, 64) and p.dtype == torch.uint8
    assert torch.equal(unpack(p, CPU_LAYOUT), q)
    B = CPU_LAYOUT.block
    for start in range(B, n, B):
        assert torch.equal(unpack(p[start:], CPU_LAYOUT), q[start:])
    assert torch.equal(unpack(pack(q, PLAIN), PLAIN), q) and torch.equal(pack(q, PLAIN), pack_nibbles(q))


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4, 16, 64, 300])
@pytest.mark.parametrize("n,k", [(80, 128), (64, 96), (256, 64), (40, 128), (48, 24)])  # (40: N not a multiple of
def test_int4_linear_paths_equal_the_reference(n, k, rows, dtype, kernel):         # 16; 24, 96: smaller groups)
    g = torch.Generator().manual_seed(rows + n)
    w, bias = torch.randn(n, k, generator=g) * 0.2, torch.randn(n, generator=g) * 0.2
    layer = Int4Linear.from_weight(w.to(dtype), bias, kernel=kernel, kernel_rows=16)
    expect_kernel = kernel and CPU_LAYOUT != PLAIN and n % 16 == 0 and k % 32 == 0
    assert layer.layout.kind == ("cpu" if expect_kernel else "plain")
    x = torch.randn(rows, k, generator=g).to(dtype)
    ref = int4_linear_reference(x, layer.codes(), layer.scale_zeros, layer.bias).float()
    out = layer(x)
    assert out.dtype == dtype and out.shape == (rows, n)
    kernel_ran = expect_kernel and rows <= 16  # it rounds activations to bf16
    tol = 1e-5 if dtype == torch.float32 and not kernel_ran else 2e-2 * ref.abs().max().item()
    assert (out.float() - ref).abs().max() <= tol
    assert layer(x.view(1, rows, k)).shape == (1, rows, n)


@pytest.mark.parametrize("tile", [32 * 128, 1 << 20])  # a tile of 32 rows (not a multiple of a 64-row block)
def test_int4_tiles_start_on_block_boundaries(monkeypatch, tile):
    monkeypatch.setattr(int4, "TILE", tile)
    layer = Int4Linear.from_weight(torch.randn(208, 128), kernel=True, kernel_rows=0)
    x = torch.randn(20, 128)
    torch.testing.assert_close(layer(x), int4_linear_reference(x, layer.codes(), layer.scale_zeros),
                               rtol=1e-5, atol=1e-5)


def test_int4_modules_are_close_to_the_plain_ones():
    g = torch.Generator().manual_seed(3)
    mlp = MLP(128, 96)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, 0, 0.1, generator=g)
    x = torch.randn(7, 128, generator=g)
    with torch.no_grad():
        ref = mlp(x)
        out = Int4MLP.from_mlp(mlp, group_size=32)(x)
    # two 4-bit matrices, ~8% relative error each (groups of 32, Gaussian weights): measured 13.7% on the output
    assert (out - ref).norm() <= 0.18 * ref.norm()


def test_int4_experts_quantize_one_expert_at_a_time(monkeypatch):
    """A stack [E, N, K] is quantized expert by expert (never an fp32 copy of the stack), each expert's buffers the
    ones quantizing it alone gives; fp32 temporaries are bounded by the chunk size, which changes nothing."""
    E, H, I = 6, 64, 64  # 128 rows: packed a block at a time, in 2 or 4 pieces
    g = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    alone = [Int4Linear.from_weight(gate_up[e], group_size=32) for e in range(E)]  # one at a time, big chunks
    seen = []
    real = int4.quantize_groups
    monkeypatch.setattr(int4, "quantize_groups", lambda w, gs: seen.append(tuple(w.shape)) or real(w, gs))
    monkeypatch.setattr(int4, "_CHUNK", 3 * H)  # three rows of fp32 at a time; packing: one block of rows
    stacked = Int4Linear.from_weight(gate_up, group_size=32, kernel_rows=0)  # tiles: fp32 products
    assert seen == [(2 * I, H)] * E
    for e in range(E):
        assert torch.equal(stacked.qweight[e], alone[e].qweight)
        assert torch.equal(stacked.scale_zeros[e], alone[e].scale_zeros)
        assert torch.equal(stacked.codes(e), quantize_groups(gate_up[e], 32)[0])
    x = torch.randn(5, H, generator=g)
    torch.testing.assert_close(stacked(x, 2), int4_linear_reference(x, stacked.codes(2), stacked.scale_zeros[2]),
                               rtol=1e-5, atol=1e-5)
    group = Int4Experts(stacked, Int4Linear.from_weight(down, group_size=32))
    assert group.n_experts == E and group.expert(1, x).shape == (5, H)


@pytest.mark.parametrize("stack", [None, 3])
def test_int4_state_dict_is_portable_and_loads_into_modules_built_from_shapes(stack):
    """state_dict() holds the portable layout whatever the layout in memory; a module built empty from shapes (on
    the meta device, as a loader does), materialized and loaded, multiplies exactly as the original."""
    w = torch.randn(*(() if stack is None else (stack,)), 96, 128)
    bias = None if stack else torch.randn(96)
    src = Int4Linear.from_weight(w, bias, kernel=True, kernel_rows=0)  # tiles: the same fp32 values in any layout
    sd = src.state_dict()
    assert set(sd) == ({"qweight", "scale_zeros"} | ({"bias"} if bias is not None else set()))
    members = [src.codes()] if stack is None else [src.codes(e) for e in range(stack)]
    assert torch.equal(sd["qweight"], torch.stack([pack_nibbles(q) for q in members]).view(sd["qweight"].shape))
    for kernel in (True, False):  # the same file into the kernel layout and into the plain one
        with torch.device("meta"):
            dst = Int4Linear(128, 96, bias is not None, kernel=kernel, stack=stack, kernel_rows=0)
        assert dst.qweight.is_meta
        dst = dst.to_empty(device="cpu")
        dst.load_state_dict(sd)
        x = torch.randn(5, 128)
        for e in ([None] if stack is None else range(stack)):
            torch.testing.assert_close(dst(x, e), src(x, e), rtol=0, atol=0)
        assert torch.equal(dst.state_dict()["qweight"], sd["qweight"])


def test_int4_model_is_close_to_the_original_and_a_quarter_of_the_matrix_bytes(tiny):
    """Measured on this model (fp32 compute, tiles only): mean |logit error| 0.133-0.143 over three inputs, mean
    KL 0.015-0.017, top-1 agreement 0.63-0.73 (random tiny weights: many near-ties); int8 on the same: 0.010, 1e-4."""
    model = dsv2.load_model(tiny)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
    plan = inference_plan("cpu", "float32", "int4")
    prepare_for_inference(model, plan)
    kinds = {type(m) for m in model.modules()}
    assert {Int4Linear, Int4MLP, Int4Experts} <= kinds
    assert isinstance(model.lm_head, Int8Linear)  # measured: an int4 lm_head alone doubles the KL
    assert all(type(m) is not nn.Linear or n.endswith("kv_b_proj") for n, m in model.named_modules())
    with torch.no_grad():
        out = model(ids)
    err = (out - ref).abs()
    kl = (ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - out.log_softmax(-1))).sum(-1)
    assert 0 < err.mean() <= 0.18 and kl.mean() <= 0.022, (err.mean(), kl.mean())
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.55


def test_int4_without_the_kernel_uses_the_plain_layout(tiny, monkeypatch):
    """Where the capability trial failed, the plan says so and every matrix takes the tile path."""
    import dataclasses

    import dsv2.capability as capability
    cap = dataclasses.replace(capability.cpu_capability(), int4_kernel=False,
                              reasons={**capability.cpu_capability().reasons, "int4_kernel": "trial failed"})
    plan = inference_plan("cpu", "auto", "int4", capability=cap)
    assert not plan.int4_kernel and any("int4 kernel unavailable (trial failed)" in n for n in plan.notes)
    model = prepare_for_inference(dsv2.load_model(tiny, dtype=plan.weight_dtype), plan)
    layouts = {m.layout.kind for m in model.modules() if isinstance(m, Int4Linear)}
    assert layouts == {"plain"}
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 4, 5]]))).all()


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_a_quantized_model_built_from_shapes_loads_a_quantized_state_dict(tiny, quantization):
    """What a loader of quantized checkpoints does: the model built on the meta device, put in the plan's form there
    (shapes only: nothing is quantized), materialized, then loaded with a quantized model's state dict."""
    from dsv2.config import ModelConfig
    from dsv2.model import Transformer
    plan = inference_plan("cpu", "auto", quantization)
    src = prepare_for_inference(dsv2.load_model(tiny, dtype=plan.weight_dtype), plan)
    with torch.device("meta"):
        dst = Transformer(ModelConfig.from_pretrained(tiny)).to(plan.weight_dtype)
    dst = prepare_for_inference(dst, plan)
    assert all(t.is_meta for t in dst.state_dict().values())
    dst = dst.to_empty(device="cpu")
    dst.load_state_dict(src.state_dict())
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dst(ids), src(ids), rtol=0, atol=0)


def test_int8_state_dict_leaves_the_kernel_scales_to_the_loading_machine():
    """The bf16 kernel scales are derived: not saved, and rebuilt on load where the loading plan uses the kernel."""
    lin = nn.Linear(64, 48)
    with_kernel, without = Int8Linear(lin, kernel=True), Int8Linear(lin, kernel=False)
    sd = with_kernel.state_dict()
    assert set(sd) == {"qweight", "qweight_scale", "bias"} == set(without.state_dict())
    with torch.device("meta"):
        dst = Int8Linear(nn.Linear(64, 48), kernel=True)
    dst = dst.to_empty(device="cpu")
    dst.load_state_dict(without.state_dict())
    assert torch.equal(dst.qweight_kernel_scale, with_kernel.qweight_kernel_scale)
    x = torch.randn(3, 64)
    torch.testing.assert_close(dst(x), with_kernel(x), rtol=0, atol=0)
