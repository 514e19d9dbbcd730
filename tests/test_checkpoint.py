"""Loading the published layout, every loader error, and lossless round trips that transformers also loads."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REFERENCE, YARN, make_hf_model
import dsv2
from dsv2.checkpoint import CheckpointError, expected_keys
from dsv2.config import ModelConfig


@pytest.fixture
def ckpt(tmp_path):
    path, _ = make_hf_model(tmp_path / "m", rope=YARN)
    return path


def test_v2_lite_expects_exactly_the_published_weight_names():
    cfg = ModelConfig.from_pretrained(os.path.join(REFERENCE, "configs", "DeepSeek-Coder-V2-Lite"))
    with open(os.path.join(REFERENCE, "configs", "DeepSeek-Coder-V2-Lite", "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(expected_keys(cfg)) == set(index["weight_map"])
    total = sum(torch.Size(s).numel() for s in expected_keys(cfg).values())
    assert total * 2 == index["metadata"]["total_size"]  # bf16 bytes


def _roundtrip_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("shard_bytes", [5 << 30, 20_000])
def test_save_load_round_trip_is_exact_and_transformers_loads_it(tmp_path, ckpt, shard_bytes):
    from transformers import DeepseekV2ForCausalLM
    model = dsv2.load_model(ckpt)
    out = tmp_path / "out"
    dsv2.save_model(model, out, max_shard_bytes=shard_bytes)
    files = os.listdir(out)
    assert ("model.safetensors.index.json" in files) == (shard_bytes < 1 << 20)
    again = dsv2.load_model(out)
    assert _roundtrip_equal(model, again)
    hf = DeepseekV2ForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, 128, (1, 70))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() <= 1e-4


def test_any_stored_dtype_is_converted(tmp_path, ckpt):
    model = dsv2.load_model(ckpt)
    dsv2.save_model(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "bf16" / "model.safetensors").values())
    m32 = dsv2.load_model(tmp_path / "bf16", dtype=torch.float32)
    m16 = dsv2.load_model(ckpt, dtype=torch.bfloat16)
    ref = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    for k, v in m32.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert m16.lm_head.weight.dtype == torch.bfloat16


def _break(path, fn):
    file = os.path.join(path, "model.safetensors")
    sd = load_file(file)
    fn(sd)
    save_file(sd, file, metadata={"format": "pt"})


def test_missing_key_is_named(ckpt):
    _break(ckpt, lambda sd: sd.pop("model.layers.1.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*experts\.5\.up_proj"):
        dsv2.load_model(ckpt)


def test_unexpected_key_is_named(ckpt):
    _break(ckpt, lambda sd: sd.__setitem__("model.layers.9.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected.*layers\.9\.extra"):
        dsv2.load_model(ckpt)


def test_wrong_shape_names_key_and_both_shapes(ckpt):
    _break(ckpt, lambda sd: sd.__setitem__("model.layers.0.self_attn.kv_b_proj.weight", torch.zeros(3, 16)))
    with pytest.raises(CheckpointError, match=r"kv_b_proj.weight.*\(3, 16\).*expected \(112, 16\)"):
        dsv2.load_model(ckpt)


def test_missing_shard_is_named(tmp_path, ckpt):
    out = tmp_path / "sharded"
    dsv2.save_model(dsv2.load_model(ckpt), out, max_shard_bytes=20_000)
    victim = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))[1]
    os.remove(out / victim)
    with pytest.raises(CheckpointError, match=victim):
        dsv2.load_model(out)


def test_truncated_file_is_named(ckpt):
    file = os.path.join(ckpt, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        dsv2.load_model(ckpt)


def test_garbage_file_is_named(ckpt):
    file = os.path.join(ckpt, "model.safetensors")
    with open(file, "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        dsv2.load_model(ckpt)


def test_pickle_only_directory_is_refused(tmp_path, ckpt):
    d = tmp_path / "pickle"
    d.mkdir()
    shutil.copy(os.path.join(ckpt, "config.json"), d)
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        dsv2.load_model(d)


def test_missing_directory_and_offline_repo_id(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no model directory"):
        dsv2.load_model(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(CheckpointError, match="huggingface-cli download deepseek-ai/DeepSeek-V2-Lite-Chat"):
        dsv2.load_model("deepseek-ai/DeepSeek-V2-Lite-Chat")


def test_nothing_from_the_model_directory_is_executed(tmp_path, ckpt):
    marker = tmp_path / "executed"
    for name in ("modeling_deepseek.py", "configuration_deepseek.py"):
        (open(os.path.join(ckpt, name), "w")).write(f"open({str(marker)!r}, 'w').write('x')\n")
    with open(os.path.join(ckpt, "config.json")) as f:
        d = json.load(f)
    d["auto_map"] = {"AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"}
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(d, f)
    dsv2.load_model(ckpt)
    assert not marker.exists()


def _files(d) -> dict[str, bytes]:
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


def test_save_model_replaces_the_weights_and_keeps_the_users_other_files(tmp_path, ckpt):
    model = dsv2.load_model(ckpt)
    out = tmp_path / "out"
    dsv2.save_model(model, out, max_shard_bytes=20_000)  # shards + index
    (out / "tokenizer.json").write_text("{}")
    (out / "generation_config.json").write_text('{"temperature": 0.5}')
    dsv2.save_model(model, out, dtype=torch.bfloat16)  # now one file: no shard of the old layout may linger
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert (out / "generation_config.json").read_text() == '{"temperature": 0.5}'
    assert sorted(os.listdir(tmp_path)) == ["m", "out"]  # no staging left beside it
    assert dsv2.load_model(out).lm_head.weight.dtype == torch.float32


def test_a_crash_mid_save_leaves_the_previous_model_directory_intact(tmp_path, ckpt, monkeypatch):
    import dsv2.checkpoint
    model = dsv2.load_model(ckpt)
    out = tmp_path / "out"
    dsv2.save_model(model, out, max_shard_bytes=20_000)
    (out / "tokenizer.json").write_text("{}")
    before = _files(out)
    written = []

    def dying_save_file(tensors, filename, metadata=None):
        if written:  # the second shard: half of it, then the disk fills up
            open(filename, "wb").write(b"half a shard")
            raise OSError("disk full")
        written.append(filename)
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(dsv2.checkpoint, "save_file", dying_save_file)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        dsv2.save_model(model, out, max_shard_bytes=20_000)
    monkeypatch.undo()
    assert _files(out) == before and sorted(os.listdir(tmp_path)) == ["m", "out"]
    assert _roundtrip_equal(dsv2.load_model(out), dsv2.load_model(ckpt))


def test_a_save_interrupted_between_its_renames_is_named_and_finished_by_the_next(tmp_path, ckpt, monkeypatch):
    from dsv2.fileio import STAGING
    model = dsv2.load_model(ckpt)
    out = tmp_path / "out"
    dsv2.save_model(model, out)
    (out / "tokenizer.json").write_text("{}")
    real_rename = os.rename

    def rename(src, dst):  # the power fails after the old version is moved aside, before the new one moves in
        if str(src).endswith(STAGING):
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        dsv2.save_model(model, out, dtype=torch.bfloat16)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"interrupted.*`mv .*out\.dsv2-tmp .*out`"):
        dsv2.load_model(out)
    dsv2.save_model(model, out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(os.listdir(tmp_path)) == ["m", "out"]
    assert _roundtrip_equal(dsv2.load_model(out), model)


@pytest.mark.parametrize("in_config", [True, False])
def test_a_block_fp8_checkpoint_is_named_as_such_and_refused(ckpt, in_config):
    """DeepSeek-V3's layout: a matrix stored as F8_E4M3 in 128x128 blocks, each scaled by `*.weight_scale_inv`."""
    key = "model.layers.1.self_attn.kv_b_proj.weight"

    def to_fp8(sd):
        w = sd[key].float()
        scale = w.abs().amax().reshape(1, 1) / 448  # one block: the matrix is smaller than 128 x 128
        sd[key] = (w / scale).to(torch.float8_e4m3fn)
        sd[key.replace(".weight", ".weight_scale_inv")] = scale

    _break(ckpt, to_fp8)
    if in_config:
        with open(os.path.join(ckpt, "config.json")) as f:
            d = json.load(f)
        d["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                    "weight_block_size": [128, 128]}
        with open(os.path.join(ckpt, "config.json"), "w") as f:
            json.dump(d, f)
    with pytest.raises(CheckpointError) as e:
        dsv2.load_model(ckpt)
    msg = str(e.value)
    assert "block-FP8" in msg and "weight_scale_inv" in msg and "does not load" in msg and "bf16" in msg
    assert ("128 x 128" in msg) == in_config and "different model" not in msg
