"""lm_head + cross-entropy fused chunk by chunk (kernels/linear_ce.py) against its two-step twin, and the training
forward that uses it (Transformer.forward with targets) against the logits path and against transformers' own loss."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TINY, make_hf_model
import dsv2
from dsv2.config import ModelConfig
from dsv2.kernels.linear_ce import IGNORE, cross_entropy_of, cross_entropy_reference, linear_cross_entropy
from dsv2.model import build_model


def _case(N=53, H=24, V=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    t = torch.randint(0, V, (N,), generator=g)
    t[::5] = IGNORE
    return h, w, t


def _loss_and_grads(fn, h, w, t, weights=None, scale=1.0, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(h, w, t, weights, **kw)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("chunk_rows", [7, 16, 1000])  # ragged last chunk, even chunks, one chunk
def test_fused_equals_the_two_step_form_in_fp32(weighted, chunk_rows):
    h, w, t = _case()
    weights = torch.rand(h.shape[0], generator=torch.Generator().manual_seed(3)) if weighted else None
    ref = _loss_and_grads(cross_entropy_reference, h, w, t, weights, scale=2.5)
    got = _loss_and_grads(linear_cross_entropy, h, w, t, weights, scale=2.5, chunk_rows=chunk_rows)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ref[1][::5].abs().max() == 0 and got[1][::5].abs().max() == 0  # ignored positions get no gradient
    assert ref[0] > 1.0 and ref[2].abs().max() > 1e-3  # a loss and gradients far from trivial


def test_bf16_autocast_matches_autocast_of_the_two_step_form():
    h, w, t = _case(N=300, H=64, V=1000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _loss_and_grads(cross_entropy_reference, h, w, t)
        got = _loss_and_grads(linear_cross_entropy, h, w, t, chunk_rows=64)
    assert got[1].dtype == got[2].dtype == torch.float32  # gradients in the parameters' dtype
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4)  # same bf16 logits, fp32 softmax
    for a, b in zip(got[1:], ref[1:]):  # dh, dW: bf16 matmuls rounded in other places (dW per chunk)
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()


def test_without_gradients_only_the_loss_is_computed():
    h, w, t = _case()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, chunk_rows=10)
    torch.testing.assert_close(loss, cross_entropy_reference(h, w, t), rtol=1e-6, atol=1e-6)
    assert not loss.requires_grad


def test_all_targets_ignored_gives_zero_loss_and_gradients():
    h, w, t = _case(N=8)
    t[:] = IGNORE
    loss, dh, dw = _loss_and_grads(linear_cross_entropy, h, w, t)
    assert loss == 0 and dh.abs().max() == 0 and dw.abs().max() == 0


def _tiny(tie=False):
    cfg = ModelConfig.from_dict({**TINY, "tie_word_embeddings": tie})
    m = build_model(cfg, seed=0).train()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.08)
    return m


def _grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tie", [False, True])
def test_training_forward_with_targets_equals_the_logits_path(tie):
    model = _tiny(tie)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 128, (3, 40), generator=g), torch.randint(0, 128, (3, 40), generator=g)
    y[:, -3:] = IGNORE
    ref = _grads(model, lambda: cross_entropy_of(model(x).flatten(0, 1), y.flatten()))
    got = _grads(model, lambda: model(x, targets=y))
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    assert got[1].keys() == ref[1].keys()
    for name in ref[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], rtol=1e-4, atol=1e-6, msg=name)
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_wrapped_lm_head_is_called_as_a_module():
    """An lm_head that is not a plain nn.Linear (an FSDP unit, a LoRA or tensor-parallel head) must see its own
    forward: the loss then takes the two-step form."""
    class Head(nn.Linear):
        calls = 0

        def forward(self, x):
            Head.calls += 1
            return super().forward(x)

    model = _tiny()
    x, y = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    expected = model(x, targets=y)
    head = Head(64, 128, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    torch.testing.assert_close(model(x, targets=y), expected, rtol=1e-6, atol=1e-6)
    assert Head.calls == 1


def test_training_gradients_match_transformers_loss(tmp_path):
    """The oracle for training: dsv2's loss (next-token targets, fused lm_head + loss, grouped experts) and every
    parameter's gradient against transformers' DeepseekV2ForCausalLM(labels=...) on the same checkpoint, fp32."""
    path, hf = make_hf_model(tmp_path / "m", q_lora_rank=24, topk_method="group_limited_greedy", n_group=4,
                             topk_group=2)
    hf.train()
    model = dsv2.load_model(path).train()
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(2))
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE)], dim=1)  # transformers shifts labels itself
    hf_loss = hf(ids, labels=ids).loss
    hf_loss.backward()
    ours, grads = _grads(model, lambda: model(ids, targets=targets))
    torch.testing.assert_close(ours, hf_loss.detach(), rtol=1e-5, atol=1e-5)
    hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    assert grads.keys() == hf_grads.keys()  # the same names (routers included) and all of them trained
    assert any("experts.gate_up_proj" in n for n in grads) and "lm_head.weight" in grads
    for name in grads:
        scale = hf_grads[name].abs().max().clamp(min=1e-6)
        assert (grads[name] - hf_grads[name]).abs().max() <= 1e-4 * scale, name
