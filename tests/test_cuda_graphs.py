"""The runner's CUDA path, its logic checked on CPU: decode steps through DecodeGraphs' static buffers (padded to a
batch bucket, block tables, slots derived on the device; what a CUDA graph captures) and the staged step (numpy
index arrays in one transfer, decode over block tables) against the plain step, logits at every teacher-forced
position; the numpy slots against the runner's; which models cannot be captured. On a GPU (-m gpu): captured
graphs against the eager step and against the CPU, and LLM(enforce_eager=...) end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY
from dsv2.config import ModelConfig
from dsv2.engine.runner import (GRAPH_BATCHES, ModelRunner, StepInputs, context_slots,
                                graph_unsupported_reason)
from dsv2.model import PagedAttention, build_model
from dsv2.model.inference import quantize_int8

wired = pytest.mark.skipif("block_tables" not in PagedAttention.__dataclass_fields__,
                           reason="needs the block-table decode in model/mla.py (/work/notes/wiring-cuda.patch)")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CFG = ModelConfig.from_dict({**TINY, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 64}})


def tiny_model(dtype=torch.float32, device="cpu"):
    model = build_model(CFG, dtype=dtype, device=device, seed=0)
    model.init_weights(std=0.08)  # wide enough that attention and routing are far from uniform
    return model.eval().requires_grad_(False)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, CFG.vocab_size, (n,), generator=g).tolist() for n in lengths]


def test_numpy_slots_equal_the_runners():
    runner = ModelRunner(tiny_model(), 40, 4, torch.float32)
    rng = np.random.default_rng(0)
    for length in (1, 3, 4, 5, 16, 33):
        table = rng.permutation(40)[:-(-length // 4) + 2].tolist()  # longer than needed, shuffled
        assert np.array_equal(context_slots(table, length, 4), runner._context_slots(table, length).numpy())


def test_models_that_cannot_be_captured_say_why():
    assert graph_unsupported_reason(tiny_model()) is None
    assert "Int8Experts" in graph_unsupported_reason(quantize_int8(tiny_model(), kernel=False))
    dynamic = ModelConfig.from_dict({**TINY, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert "dynamic" in graph_unsupported_reason(build_model(dynamic, seed=0))


@wired
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_static_decode_equals_the_plain_step(kv_cache_dtype):
    """Three sequences decode together (bucket 4: one padding row writing into the spare block), contexts not
    multiples of the block size; the static path's logits equal the plain step's at every forced position."""
    model = tiny_model()
    ps, forced = prompts([5, 18, 9]), prompts([6, 6, 6], seed=1)
    plain = ModelRunner(model, 30, 4, torch.float32, kv_cache_dtype)
    static = ModelRunner(model, 30, 4, torch.float32, kv_cache_dtype, enforce_eager=False, max_model_len=64)
    assert static.graphs is not None and not static.graphs.capture  # CPU: the buffers run eagerly
    assert static.kv_caches[0].shape[0] == 31 and static.table_width == 16
    for a, b in zip(plain.forced_logits(ps, forced), static.forced_logits(ps, forced)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert static.kv_caches[0][:30].ne(0).any() and static.kv_caches[0][30].ne(0).any()  # padding wrote there


@wired
def test_staged_step_equals_the_plain_step():
    """Prefill, a mixed step (two decodes + a chunk after a cached prefix + a fresh prompt), then decodes: the
    staged step (what CUDA runs eagerly) gives the plain step's logits."""
    model = tiny_model()
    plain, staged = ModelRunner(model, 40, 4, torch.float32), ModelRunner(model, 40, 4, torch.float32)
    a, b, c, d = prompts([7, 13, 10, 3])
    steps = [
        StepInputs(a + b, [0, 0], [7, 13], [[0, 1], [2, 3, 4, 5]], 0, [6, 19], [0, 1], {}),
        # decode a and b; c's second chunk (positions 4..9 after 0..3 cached in block 6); d whole, all logits of d
        StepInputs([5, 6] + c[4:] + d, [7, 13, 4, 0], [1, 1, 6, 3], [[0, 1], [2, 3, 4, 5], [6, 7, 8], [9]], 2,
                   [0, 1, 7, 8, 9, 10], [0, 1, 2, 5], {99: (3, 3)}),
        StepInputs([8, 9, 10, 11], [8, 14, 10, 3], [1] * 4, [[0, 1, 10], [2, 3, 4, 5], [6, 7, 8], [9]], 4,
                   [0, 1, 2, 3], [0, 1, 2, 3], {}),
    ]
    prefix = StepInputs(c[:4], [0], [4], [[6]], 0, [3], [0], {})
    for runner in (plain, staged):
        runner.execute(prefix)
    for step in steps:
        want, got = plain.execute(step), staged._execute_staged(step)
        torch.testing.assert_close(got.sample, want.sample, rtol=1e-4, atol=1e-4)
        assert got.prompt.keys() == want.prompt.keys()
        for k in want.prompt:
            torch.testing.assert_close(got.prompt[k], want.prompt[k], rtol=1e-4, atol=1e-4)


def test_buckets_cover_max_num_seqs():
    runner = ModelRunner(tiny_model(), 30, 4, torch.float32, enforce_eager=False, max_num_seqs=20)
    assert runner.graphs.buckets == [1, 2, 4, 8, 16, 20]
    assert ModelRunner(tiny_model(), 30, 4, torch.float32, enforce_eager=False).graphs.buckets == list(GRAPH_BATCHES)
    assert ModelRunner(tiny_model(), 30, 4, torch.float32).graphs is None  # the runner's default is eager


@pytest.mark.gpu
@cuda
@wired
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_captured_graphs_equal_eager_and_cpu(kv_cache_dtype):
    """fp32 on CUDA: replayed graphs (two buckets) against the eager CUDA step and against the CPU runner."""
    cpu, gpu = tiny_model(), tiny_model(device="cuda")
    for n_seq in (3, 9):
        ps, forced = prompts([5, 18, 9, 30, 2, 7, 7, 11, 40][:n_seq]), prompts([6] * n_seq, seed=1)
        want = cpu_logits = ModelRunner(cpu, 60, 4, torch.float32, kv_cache_dtype).forced_logits(ps, forced)
        eager = ModelRunner(gpu, 60, 4, torch.float32, kv_cache_dtype).forced_logits(ps, forced)
        graphs = ModelRunner(gpu, 60, 4, torch.float32, kv_cache_dtype, enforce_eager=False, max_model_len=64)
        got = graphs.forced_logits(ps, forced)
        assert graphs.graphs is not None and graphs.graphs.graphs  # captured, not fallen back
        for w, e, g in zip(want, eager, got):
            torch.testing.assert_close(e.cpu(), w, rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(g.cpu(), w, rtol=1e-3, atol=1e-3)
        del cpu_logits


@pytest.mark.gpu
@cuda
@wired
def test_llm_with_and_without_graphs(tmp_path):
    from conftest import make_hf_model
    from dsv2 import LLM, SamplingParams
    path, _ = make_hf_model(tmp_path / "m")
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ps = prompts([5, 30, 9, 17])
    outs = {}
    for eager in (True, False):
        llm = LLM(path, device="cuda", dtype="float32", enforce_eager=eager, block_size=4, kv_cache_memory="64MiB")
        outs[eager] = [o.outputs[0].token_ids for o in llm.generate(ps, greedy)]
        assert (llm.runner.graphs is None) == eager
    assert outs[True] == outs[False]
