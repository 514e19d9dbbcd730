"""Quantized checkpoints (`dsv2 quantize`, engine/quantized_checkpoint.py): what loads from one is, bit for bit, what
quantizing while loading the original gives; the files are the same whichever CPU level wrote them and load under
another kernel choice; bad files and misuse are named; writing streams (peak RSS measured in a subprocess)."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import make_hf_model
from dsv2.capability import inference_plan
from dsv2.checkpoint import CheckpointError, load_model, read_header, save_model
from dsv2.cli import main as cli
from dsv2.config import ModelConfig
from dsv2.engine.llm import LLM
from dsv2.engine.prepare import load_for_inference
from dsv2.engine.quantized_checkpoint import checkpoint_plan, write_quantized
from dsv2.engine.sampling_params import SamplingParams
from dsv2.fileio import file_sha256
from dsv2.model import build_model
from dsv2.parallel.tensor_parallel import ParallelContext

ROOT = os.path.join(os.path.dirname(__file__), "..")
ENV = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("qsrc")
    tied = make_hf_model(root / "tied", tie_word_embeddings=True, attention_bias=True)[0]  # q_lora on
    (root / "tied" / "tokenizer_config.json").write_text("{}")
    (root / "tied" / "modeling_deepseek.py").write_text("raise SystemExit('remote code')\n")
    return {"untied": make_hf_model(root / "untied", q_lora_rank=None)[0], "tied": tied}


@pytest.fixture(scope="module")
def written(sources, tmp_path_factory):
    """(which, quantization) -> a directory `dsv2 quantize` wrote (through the CLI)."""
    root, out = tmp_path_factory.mktemp("qout"), {}
    for which, path in sources.items():
        for q in ("int8", "int4"):
            out[which, q] = str(root / f"{which}-{q}")
            assert cli(["quantize", path, out[which, q], "--quantization", q]) == 0
    return out


def _tensors(model) -> dict[str, torch.Tensor]:
    return {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None}


def _assert_same_model(a, b) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("which", ["untied", "tied"])
def test_quantized_checkpoint_loads_as_quantizing_while_loading(sources, written, which, quantization):
    plan = inference_plan("cpu", "auto", quantization)
    streamed = load_for_inference(sources[which], plan)
    stored = load_for_inference(written[which, quantization], plan)
    _assert_same_model(stored, streamed)
    # asked without --quantization: the checkpoint's own format, the same model
    unasked = inference_plan("cpu", "auto", None)
    assert checkpoint_plan(written[which, quantization], unasked) == plan
    _assert_same_model(load_for_inference(written[which, quantization], unasked), streamed)


def test_quantized_checkpoint_with_other_dtype_and_group_size(sources, tmp_path):
    out = str(tmp_path / "g32")
    write_quantized(sources["tied"], out, "int4", group_size=32, dtype="float32")
    assert json.loads((tmp_path / "g32" / "config.json").read_text())["torch_dtype"] == "float32"
    plan = inference_plan("cpu", "float32", "int4", group_size=32)
    _assert_same_model(load_for_inference(out, inference_plan("cpu", "float32", "int4")),  # group size: the file's
                       load_for_inference(sources["tied"], plan))


def test_the_directory_layout(sources, written):
    out = written["tied", "int4"]
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer_config.json"]  # no remote code: it could not read these files
    cfg = json.loads(open(os.path.join(out, "config.json")).read())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "dsv2" and q["format"] == "int4" and q["group_size"] == 64 and q["zero_point"]
    assert q["modules_in_int8"] == ["lm_head"] and "model.layers.*.self_attn.kv_b_proj" in q["modules_not_converted"]
    assert ModelConfig.from_pretrained(out) == ModelConfig.from_pretrained(sources["tied"]).replace(
        torch_dtype="bfloat16")
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:  # safetensors' own reader takes it
        names = set(f.keys())
        q4, s4, z4 = (f.get_tensor(f"model.layers.1.mlp.experts.3.down_proj.{k}") for k in ("qweight", "scales", "zeros"))
        q8 = f.get_tensor("lm_head.qweight")
    assert "model.layers.1.self_attn.kv_b_proj.weight" in names and "model.embed_tokens.weight" in names
    assert "model.layers.1.self_attn.q_a_proj.bias" in names and "model.layers.0.self_attn.w_uk" not in names
    assert q4.dtype == torch.uint8 and q4.shape == (64, 16) and s4.shape == z4.shape == (64, 1)
    assert s4.dtype == torch.bfloat16 and q8.dtype == torch.int8 and q8.shape == (128, 64)
    # the stored codes are the documented ones: W = (q - 8) * scale + zero, nibbles low first
    w = load_model(sources["tied"], dtype=torch.bfloat16).model.layers[1].mlp.experts.down_proj[3].float()
    codes = torch.stack([q4 & 15, q4 >> 4], -1).view(64, 32).float()
    assert (((codes - 8) * s4.float() + z4.float()) - w).abs().max() <= s4.float().max()


def test_sharded_output_and_index(sources, tmp_path):
    out = str(tmp_path / "sharded")
    write_quantized(sources["untied"], out, "int8", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    headers = [read_header(str(tmp_path / "sharded" / s)) for s in shards]
    assert index["metadata"]["total_size"] == sum(i["data_offsets"][1] - i["data_offsets"][0]
                                                  for h in headers for i in h.values())
    assert {k for h, s in zip(headers, shards) for k in h if index["weight_map"][k] == s} == set(index["weight_map"])
    plan = inference_plan("cpu", "auto", "int8")
    _assert_same_model(load_for_inference(out, plan), load_for_inference(sources["untied"], plan))


def test_engine_generates_the_same(sources, written):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[3, 17, 42, 5], [9, 9, 100, 7, 64, 2]]
    for q in ("int8", "int4"):
        with LLM(sources["untied"], quantization=q, kv_cache_memory="4MiB") as a, \
                LLM(written["untied", q], kv_cache_memory="4MiB") as b:
            assert [o.token_ids for o in a.generate(prompts, params)] == \
                   [o.token_ids for o in b.generate(prompts, params)]


def test_files_are_machine_independent(sources, written, tmp_path):
    """Written under torch's AVX2 kernels (another int4 packing, another int8 trial): the same bytes. Loaded there
    (the int4 codes packed for that level): the same logits as here within the kernels' tolerance, and bit for bit
    what quantizing while loading gives there."""
    out = str(tmp_path / "avx2")
    script = textwrap.dedent(f"""
        import torch
        from dsv2.capability import inference_plan, int4_cpu_packing
        from dsv2.cli import main
        from dsv2.engine.prepare import load_for_inference
        assert main(["quantize", {sources['tied']!r}, {out!r}, "--quantization", "int4"]) == 0
        plan = inference_plan("cpu", "auto", "int4")
        a, b = load_for_inference({written['tied', 'int4']!r}, plan), load_for_inference({sources['tied']!r}, plan)
        ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            la, lb = a(ids), b(ids)
        assert torch.equal(la, lb)
        torch.save(la, {str(tmp_path / 'logits.pt')!r})
        print("packing", int4_cpu_packing(), "compute", plan.compute_dtype)
    """)
    env = {**ENV, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "DSV2_CPU_CAPABILITY": "avx2"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    here, there = os.path.join(written["tied", "int4"], "model.safetensors"), os.path.join(out, "model.safetensors")
    assert file_sha256(here) == file_sha256(there)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = load_for_inference(written["tied", "int4"], inference_plan("cpu", "auto", "int4"))(ids).float()
    theirs = torch.load(tmp_path / "logits.pt").float()
    assert (mine - theirs).abs().max() <= 0.05 * mine.abs().max(), proc.stdout  # bf16 vs fp32 compute, kernels


def test_a_kernel_free_plan_loads_the_same_file(written):
    """The kernel paths off (int4 in the portable layout, int8 dequantized): the same stored tensors."""
    for q in ("int8", "int4"):
        plan = inference_plan("cpu", "float32", q)
        free = load_for_inference(written["tied", q], dataclasses.replace(plan, int8_kernel=False, int4_kernel=False))
        kernel = load_for_inference(written["tied", q], plan)
        ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            a, b = free(ids), kernel(ids)
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()  # fp32 compute: both dequantize exactly


# ---- misuse and bad files ----------------------------------------------------------------------------------------
def test_another_quantization_than_stored_is_refused(written):
    with pytest.raises(ValueError, match=r"holds int4 weights .* but int8 was asked for: drop --quantization"):
        load_for_inference(written["tied", "int4"], inference_plan("cpu", "auto", "int8"))
    with pytest.raises(ValueError, match=r"holds int8 weights"):
        LLM(written["tied", "int8"], quantization="int4")


def test_plain_weight_paths_refuse_a_quantized_checkpoint(written, tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"dsv2 int4 checkpoint \(written by `dsv2 quantize`\).*needs the "
                                              r"original checkpoint"):
        load_model(written["tied", "int4"])
    with pytest.raises(ValueError, match=r"tensor-parallel loads of quantized checkpoints are not supported"):
        load_for_inference(written["tied", "int8"], inference_plan("cpu", "auto", None), ParallelContext(0, 2))
    # training from it goes through load_model: the CLI prints the same advice
    assert cli(["quantize", written["tied", "int8"], str(tmp_path / "again"), "--quantization", "int4"]) == 1
    assert "already quantized (int8" in capsys.readouterr().err
    assert cli(["quantize", written["tied", "int8"], written["tied", "int4"], "--quantization", "int4"]) == 1
    assert "exists: pass --overwrite" in capsys.readouterr().err


def test_transformers_cannot_use_it(written):
    """transformers refuses the directory outright (its model_type is not one it knows) rather than skipping the
    unknown quant_method and loading randomly initialized matrices; the README says to use dsv2, or give
    transformers the original checkpoint."""
    from transformers import AutoModelForCausalLM
    with pytest.raises(ValueError, match="deepseek_v2_dsv2_quantized"):
        AutoModelForCausalLM.from_pretrained(written["untied", "int8"])
    assert ModelConfig.from_pretrained(written["untied", "int8"]) == ModelConfig.from_pretrained(
        written["untied", "int4"])  # dsv2 reads the config as the original's


def test_bad_files_are_named(written, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(written["untied", "int4"], bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated .* \('model.layers.2.post_attention_"
                                              r"layernorm.weight' and what follows it are cut off\)"):
        load_for_inference(str(bad), inference_plan("cpu", "auto", None))
    tensors = {}
    with safe_open(os.path.join(written["untied", "int4"], "model.safetensors"), "pt") as f:
        for k in f.keys():
            if k != "model.layers.1.mlp.experts.5.up_proj.zeros":
                tensors[k] = f.get_tensor(k)
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"1 quantized tensor\(s\) missing, e.g. "
                                              r"\['model.layers.1.mlp.experts.5.up_proj.zeros'\]"):
        load_for_inference(str(bad), inference_plan("cpu", "auto", None))
    tensors["model.layers.1.mlp.experts.5.up_proj.zeros"] = torch.zeros(3, dtype=torch.bfloat16)
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"model.safetensors: 'model.layers.1.mlp.experts.5.up_proj.zeros' "
                                              r"is BF16 \(3,\), expected BF16 \(32, 1\)"):
        load_for_inference(str(bad), inference_plan("cpu", "auto", None))


# ---- memory ------------------------------------------------------------------------------------------------------
PEAK = """
import json, sys, threading, time
def anon():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))
import torch, dsv2.engine.quantized_checkpoint
from dsv2.cli import main
base, peak, done = anon(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon() - base)
        time.sleep(0.001)
threading.Thread(target=sample, daemon=True).start()
rc = main(sys.argv[1:])
done.set()
print(json.dumps({"rc": rc, "peak_anon_bytes": peak[0]}))
"""


@pytest.fixture(scope="module")
def half_gb(tmp_path_factory):
    """A ~0.5 GB bf16 checkpoint: hidden 1024, 8 layers (1 dense), 16 experts of width 704, vocab 8,192."""
    cfg = ModelConfig.from_dict(dict(
        vocab_size=8192, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=704, num_hidden_layers=8,
        num_attention_heads=8, n_shared_experts=2, n_routed_experts=16, num_experts_per_tok=4,
        first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, topk_method="greedy", n_group=1, topk_group=1, max_position_embeddings=1024))
    path = tmp_path_factory.mktemp("halfgb") / "model"
    save_model(build_model(cfg, dtype=torch.bfloat16, seed=0), path)
    return str(path), cfg


@pytest.mark.parametrize("quantization", ["int4"])
def test_quantize_streams(half_gb, quantization, tmp_path):
    path, cfg = half_gb
    out = str(tmp_path / "q")
    proc = subprocess.run([sys.executable, "-c", PEAK, "quantize", path, out, "--quantization", quantization],
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    stored = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    written_bytes = os.path.getsize(os.path.join(out, "model.safetensors"))
    H, V = cfg.hidden_size, cfg.vocab_size
    # what is held at once: the embedding and lm_head in bf16 with lm_head's int8 copy (the largest part here), or
    # a block's attention and dense weights with their quantized form, or one expert; plus what does not grow with
    # the model: ~75 MB torch spends once on building any model (also on the meta device), the quantizer's fp32
    # temporaries, the allocator's pages between trims. Seen: 184 MB. Holding the output would take 75 MB + all of
    # it (200 MB here), above the bound.
    top = 2 * V * H * 2 + V * H
    assert m["peak_anon_bytes"] <= top + (192 << 20) < (75 << 20) + written_bytes, m
    assert written_bytes < 0.35 * stored


# ---- int4 quantization: the fast path and its slow twin ------------------------------------------------------------
@pytest.mark.parametrize("chunk", [None, 3 * 128 + 64])  # the default; a block of 3.5 rows (a short last block)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantize_groups_equals_its_slow_twin(monkeypatch, chunk, group_size):
    import dsv2.model.int4 as int4
    if chunk is not None:
        monkeypatch.setattr(int4, "_GROUP_CHUNK", chunk)
    g = torch.Generator().manual_seed(group_size)
    w = torch.randn(203, 256, generator=g) * torch.logspace(-4, 2, 203)[:, None]  # rows of very different ranges
    w[3, :group_size] = 0.25  # a constant group: the scale's floor
    w[4] = 0
    w[5, 7] = 3e4  # one outlier in a group
    for x in (w, w.bfloat16(), w.T.contiguous().T, w.bfloat16().T.contiguous().T):  # fp32 / bf16, strided
        q, sz = int4.quantize_groups(x, group_size)
        rq, rsz = int4.quantize_groups_reference(x, group_size)
        assert q.dtype == rq.dtype == torch.uint8 and sz.dtype == rsz.dtype == torch.bfloat16
        assert torch.equal(q, rq) and torch.equal(sz, rsz)
    assert int4.quantize_groups(torch.empty(64, 128, device="meta"), 64)[0].is_meta


@pytest.mark.parametrize("shape", [(203, 256), (3, 5, 64), (7, 2)])
def test_nibbles_equal_their_slow_twins(monkeypatch, shape):
    import dsv2.model.int4 as int4
    monkeypatch.setattr(int4, "_GROUP_CHUNK", 1000)  # blocks of rows, a short last one
    q = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    p = int4.pack_nibbles(q)
    assert p.shape == (*shape[:-1], shape[-1] // 2) and torch.equal(p, int4.pack_nibbles_reference(q))
    assert torch.equal(int4.unpack_nibbles(p), q) and torch.equal(int4.unpack_nibbles_reference(p), q)
    every = torch.arange(256, dtype=torch.uint8).view(16, 16)  # every byte
    assert torch.equal(int4.unpack_nibbles(every), int4.unpack_nibbles_reference(every))


def test_the_engine_reports_the_stored_format(written):
    """LLM(OUT) without --quantization describes what it loaded: dsv2 bench and info read llm.quantization."""
    for (_, fmt), out in written.items():
        llm = LLM(out, kv_cache_memory="16MiB")
        assert llm.quantization == fmt and llm.plan.weights == fmt
