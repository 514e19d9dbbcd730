"""LoRA (dsv2/train/lora.py): the adapted model starts at the base, merged == unmerged logits, only the adapters
train, and the PEFT file layout round-trips through PEFT on transformers' DeepseekV2ForCausalLM."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_hf_model

import dsv2
from dsv2.model.moe import Experts, Gate
from dsv2.train.lora import (DEFAULT_TARGETS, TARGETS, LoraConfig, LoraExperts, LoraLinear, apply_lora,
                             load_adapter, lora_parameters, merge_lora, save_adapter)

ALL = TARGETS  # attention (both q layouts' names), dense + shared MLPs, routed experts


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ids(n=2, T=24, seed=1):
    return torch.randint(0, 128, (n, T), generator=torch.Generator().manual_seed(seed))


def _randomize(model, std=0.1, seed=3):
    """Non-zero B (fresh adapters start at zero) so the adapters change the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)
        for m in model.modules():
            if isinstance(m, Gate) and m.weight.requires_grad:
                m.weight.add_(torch.randn(m.weight.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("lora") / "tiny")


def test_fresh_adapters_leave_the_model_unchanged_and_only_they_train(tiny):
    path, _ = tiny
    base = dsv2.load_model(path)
    ids = _ids()
    with torch.no_grad():
        ref = base(ids)
    model = apply_lora(dsv2.load_model(path), LoraConfig(4, 8, ALL))
    with torch.no_grad():
        assert torch.equal(model(ids), ref)  # B = 0
    kinds = {type(m) for m in model.modules()}
    assert LoraLinear in kinds and LoraExperts in kinds
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert sum(p.numel() for p in lora_parameters(model)) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)
    model(ids).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in lora_parameters(model))
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    grads = {n: float(p.grad.abs().sum()) for n, p in model.named_parameters() if p.requires_grad}
    assert all(v > 0 for n, v in grads.items() if ".lora_B" in n)  # B = 0: only B moves on the first step
    assert all(v == 0 for n, v in grads.items() if ".lora_A" in n)

    routed = apply_lora(dsv2.load_model(path), LoraConfig(4, 8, ("o_proj",), train_router=True))
    gates = [m.weight for m in routed.modules() if isinstance(m, Gate)]
    assert gates and all(w.requires_grad for w in gates)
    assert not any(isinstance(m, LoraExperts) for m in routed.modules())


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_merged_equals_unmerged_at_every_position(tmp_path, q_lora_rank):
    path, _ = make_hf_model(tmp_path / "m", q_lora_rank=q_lora_rank)
    model = apply_lora(dsv2.load_model(path), LoraConfig(4, 16, ALL, train_router=True))
    _randomize(model)
    ids = _ids(T=40)
    with torch.no_grad():
        unmerged = model(ids)
        base = dsv2.load_model(path)(ids)
    assert (unmerged - base).abs().max() > 0.05  # the adapters matter
    merged = merge_lora(model)
    assert not any(isinstance(m, (LoraLinear, LoraExperts)) for m in merged.modules())
    assert any(isinstance(m, Experts) for m in merged.modules())
    assert set(merged.state_dict()) == set(dsv2.load_model(path).state_dict())  # the plain model again
    assert all(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        out = merged(ids)
    per_pos = (out - unmerged).abs().amax(dim=(0, 2))
    assert per_pos.max() < 2e-5, f"worst position {per_pos.argmax()}: {per_pos.max():.2e}"


def test_expert_adapters_match_a_per_expert_loop(tiny):
    """The stacked per-expert adapters against three plain LoRA Linears per expert, every token through every
    expert it chose (the slow twin of LoraExperts)."""
    path, _ = tiny
    model = apply_lora(dsv2.load_model(path), LoraConfig(3, 6, ("experts",)))
    _randomize(model, std=0.3)
    lx = next(m for m in model.modules() if isinstance(m, LoraExperts))
    x = torch.randn(10, lx.base_layer.down_proj.shape[1], generator=torch.Generator().manual_seed(0))
    idx = torch.stack([torch.randperm(lx.n_experts, generator=torch.Generator().manual_seed(i))[:3] for i in range(10)])
    w = torch.rand(10, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = lx(x, w, idx)
        want = torch.zeros_like(x, dtype=torch.float64)
        b, s, I = copy.deepcopy(lx).double().base_layer, lx.scaling, lx.base_layer.down_proj.shape[-1]
        lx, x = copy.deepcopy(lx).double(), x.double()
        for t in range(10):
            for k in range(3):
                e = int(idx[t, k])
                lin = lambda W, A, B, v: v @ W.T + s * (v @ A.T) @ B.T  # noqa: E731
                g = lin(b.gate_up_proj[e, :I], lx.lora_A_gate[e], lx.lora_B_gate[e], x[t])
                u = lin(b.gate_up_proj[e, I:], lx.lora_A_up[e], lx.lora_B_up[e], x[t])
                want[t] += w[t, k] * lin(b.down_proj[e], lx.lora_A_down[e], lx.lora_B_down[e],
                                         torch.nn.functional.silu(g) * u)
    # fp32 against fp64: outputs reach ~50, where one fp32 step is 3.8e-6, so the bound is relative (8 steps of
    # fp32's 6e-8) besides the absolute one; sums of the same products in another order differ by CPU (seen 2.8e-7
    # relative on an AMD Zen 4, under 1e-5 absolute on an Intel Xeon)
    torch.testing.assert_close(got.double(), want, rtol=5e-7, atol=1e-5)
    assert want.abs().max() > 0.5


@pytest.mark.parametrize("targets,router", [(ALL, True), (DEFAULT_TARGETS, False), (("kv_b_proj", "experts"), False)])
def test_peft_loads_the_adapter_with_equal_logits(tmp_path, targets, router):
    pytest.importorskip("peft")
    from peft import PeftModel
    path, hf = make_hf_model(tmp_path / "m")
    model = apply_lora(dsv2.load_model(path), LoraConfig(4, 8, targets, train_router=router))
    _randomize(model)
    save_adapter(model, str(tmp_path / "adapter"), path)
    ids = _ids(T=32)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ours, theirs, base = model(ids), peft_model(ids).logits.float(), hf(ids).logits.float()
    assert (theirs - base).abs().max() > 0.05  # PEFT applied the adapter
    assert (theirs - ours).abs().max() < 1e-4

    again = load_adapter(dsv2.load_model(path), str(tmp_path / "adapter"))  # and dsv2 reads it back
    got, want = again.lora_config, model.lora_config
    assert (got.rank, got.alpha, got.train_router) == (want.rank, want.alpha, want.train_router)
    with torch.no_grad():
        assert torch.equal(again(ids), ours)


def test_bad_targets_and_adapters_are_named(tmp_path, tiny):
    path, _ = tiny
    with pytest.raises(ValueError, match="choose from"):
        LoraConfig(4, 8, ("q_proj", "mlp"))
    with pytest.raises(ValueError, match="rank 0"):
        LoraConfig(0, 8)
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no module"):  # this model has q_a_proj / q_b_proj
        apply_lora(dsv2.load_model(path), LoraConfig(4, 8, ("q_proj",)))
    dense, _ = make_hf_model(tmp_path / "dense", first_k_dense_replace=3)
    with pytest.raises(ValueError, match="experts"):
        apply_lora(dsv2.load_model(dense), LoraConfig(4, 8, ("experts",)))
    model = apply_lora(dsv2.load_model(path), LoraConfig(4, 8))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoraConfig(4, 8))
    save_adapter(model, str(tmp_path / "a"))
    with pytest.raises(ValueError, match="does not cover"):  # an adapter for a model with another layer count
        load_adapter(dsv2.load_model(make_hf_model(tmp_path / "deeper", num_hidden_layers=4)[0]), str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(dsv2.load_model(path), str(tmp_path))
