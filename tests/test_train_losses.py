"""MoE training internals: the three balance losses against hand-computed values, device-limited routing, and
token dropping (capacity, lowest-affinity first, exempt sequences, never at evaluation)."""
import math

import pytest
import torch

from dsv2.config import ModelConfig
from dsv2.model import build_model
from dsv2.model.moe import MoE, RouterOutput, TokenDropping
from dsv2.train.losses import BalanceCoefficients, LoadStats, balance_loss, balance_terms
from dsv2.train.optim import lr_at, param_groups
from dsv2.train.presets import PRESETS

# Two sequences of S=2 tokens, E=4 experts in D=2 devices {0,1} {2,3}, K=2 experts per token, M=1.
SCORES = torch.tensor([[[0.5, 0.3, 0.1, 0.1], [0.4, 0.1, 0.4, 0.1]],
                       [[0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]]])
IDX = torch.tensor([[[0, 1], [0, 2]],
                    [[2, 3], [2, 3]]])
# sequence 0: P = [.45 .2 .25 .1], counts [2 1 1 0] -> f = 4/(2*2) * counts = [2 1 1 0]
#   L1 = 2*.45 + .2 + .25 = 1.35;  f' = [1.5 .5], P' = [.65 .35] -> L2 = 1.15
#   tokens reach devices {0} and {0,1} -> f'' = 2/(1*2) * [2 1] -> L3 = 2*.65 + .35 = 1.65
# sequence 1: P uniform, f = [0 0 2 2] -> L1 = 1.0; f' = [0 2], P' = [.5 .5] -> L2 = 1.0; f'' = [0 2] -> L3 = 1.0
EXPECTED = {"expert": [1.35, 1.0], "device": [1.15, 1.0], "comm": [1.65, 1.0]}


def test_balance_terms_match_hand_computed_values():
    terms = balance_terms(SCORES, IDX, n_groups=2, groups_per_token=1)
    for name, want in EXPECTED.items():
        torch.testing.assert_close(terms[name], torch.tensor(want), msg=name)


def test_balance_loss_is_per_sequence_weighted_and_summed_over_layers():
    router_out = {l: RouterOutput(SCORES.reshape(4, 4), IDX.reshape(4, 2)) for l in (1, 2)}
    coef = BalanceCoefficients(0.1, 0.2, 0.3)
    total, parts = balance_loss(router_out, batch_size=2, n_groups=2, groups_per_token=1, coef=coef)
    # mean over the 2 sequences (not pooled over 4 tokens), summed over the 2 layers
    want = {k: 2 * a * sum(EXPECTED[k]) / 2 for k, a in (("expert", 0.1), ("device", 0.2), ("comm", 0.3))}
    for k in want:
        assert parts[k] == pytest.approx(want[k])
    assert float(total) == pytest.approx(sum(want.values()))
    only_expert, parts = balance_loss(router_out, 2, 2, 1, BalanceCoefficients(0.1))
    assert parts["device"] == parts["comm"] == 0.0 and float(only_expert) == pytest.approx(want["expert"])


def test_balance_loss_gradient_flows_through_mean_affinities_only():
    scores = SCORES.clone().requires_grad_(True)
    balance_terms(scores, IDX, 2, 1)["expert"].sum().backward()
    # d/ds_{i,t} sum_i f_i P_i = f_i / S
    f = torch.tensor([[2.0, 1, 1, 0], [0, 0, 2, 2]])
    torch.testing.assert_close(scores.grad, (f / 2).unsqueeze(1).expand(2, 2, 4))


def test_uniform_routing_gives_unit_terms():
    E, K, S = 8, 2, 8  # every expert chosen twice, every token on 2 of the 4 devices, flat affinities
    t = torch.arange(S)
    idx = torch.stack([t % E, (t + 2) % E], -1).view(1, S, K)
    terms = balance_terms(torch.full((1, S, E), 1 / E), idx, n_groups=4, groups_per_token=2)
    for v in terms.values():
        assert float(v) == pytest.approx(1.0)


def _moe_model(**over):
    cfg = ModelConfig.from_dict({**PRESETS["debug"], "n_routed_experts": 16, "n_group": 8, "topk_group": 3,
                                 "num_experts_per_tok": 4, **over})
    model = build_model(cfg, seed=0)
    with torch.no_grad():  # wide weights: peaked, varied routing
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.1)
    return model


def test_device_limited_routing_stays_in_the_top_groups():
    moe = _moe_model().model.layers[1].mlp
    x = torch.randn(2000, 64)
    _, idx, scores = moe.gate(x)
    groups = idx // 2  # 16 experts in 8 groups of 2
    best_groups = scores.view(-1, 8, 2).amax(-1).topk(3, dim=-1).indices  # [T, M]
    assert (groups.unsqueeze(-1) == best_groups.unsqueeze(1)).any(-1).all(), "an expert outside the chosen groups"
    assert max(len(set(g.tolist())) for g in groups) <= 3
    # and the chosen experts are the K best among the kept groups' experts
    masked = scores.clone()
    keep = torch.zeros(2000, 8, dtype=torch.bool).scatter_(1, best_groups, True).repeat_interleave(2, -1)
    masked[~keep] = -1
    assert torch.equal(idx.sort(-1).values, masked.topk(4, -1).indices.sort(-1).values)


def _dropping_layer(capacity=1.0, no_drop=None):
    return _moe_model().model.layers[1].mlp.train(), TokenDropping(capacity, no_drop)


def test_token_dropping_respects_device_capacity_and_drops_lowest_affinity_first():
    torch.manual_seed(0)
    B, S = 4, 64
    moe, drop = _dropping_layer(1.0)
    x = torch.randn(B, S, 64)
    router_out = {}
    moe(x, router_out, drop)
    r = router_out[1]
    T, K, D = B * S, 4, 8
    assert r.dropped is not None and r.dropped.any(), "peaked routing at capacity 1.0 should drop something"
    unit = (r.topk_idx // 2).flatten()
    kept = ~r.dropped.flatten()
    prio = r.scores.gather(1, r.topk_idx).flatten()
    cap = math.ceil(T * K / D)
    for d in range(D):
        mine = unit == d
        assert int((mine & kept).sum()) <= cap
        if (mine & ~kept).any():  # full unit: every dropped assignment ranks below every kept one
            assert int((mine & kept).sum()) == cap
            assert prio[mine & ~kept].max() <= prio[mine & kept].min()


def test_exempt_sequences_are_never_dropped_and_eval_never_drops():
    torch.manual_seed(1)
    no_drop = torch.tensor([True, False, False, True])
    moe, drop = _dropping_layer(0.5, no_drop)
    x = torch.randn(4, 32, 64)
    router_out = {}
    y_train = moe(x, router_out, drop)
    dropped = router_out[1].dropped.view(4, 32, 4)
    assert not dropped[no_drop].any() and dropped[~no_drop].any()

    moe.eval()  # evaluation: same module, dropping still passed, nothing dropped
    router_out = {}
    y_eval = moe(x, router_out, drop)
    assert router_out[1].dropped is None
    torch.testing.assert_close(y_eval, moe(x))
    assert not torch.allclose(y_train, y_eval)


def test_dropped_forward_equals_the_reference_with_dropped_weights_zeroed():
    torch.manual_seed(2)
    moe, drop = _dropping_layer(0.7)
    x = torch.randn(96, 64)
    w, idx, scores = moe.gate(x)
    keep = moe.capacity_keep(scores, idx, n_seq=1, drop=drop)
    with torch.no_grad():
        fast = moe.experts(x, w, idx, keep)
        slow = moe.experts.forward_reference(x, w * keep, idx)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_gives_the_same_gradients_with_balance_losses():
    def grads(ckpt: bool):
        model = _moe_model().train()
        model.gradient_checkpointing = ckpt
        ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
        router_out = {}
        logits = model(ids, router_out=router_out)
        aux, _ = balance_loss(router_out, 2, 8, 3, BalanceCoefficients(0.01, 0.02, 0.03))
        (logits.logsumexp(-1).mean() + aux).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert plain["model.layers.1.mlp.gate.weight"].abs().sum() > 0
    for n in plain:
        torch.testing.assert_close(plain[n], ckpt[n], rtol=1e-5, atol=1e-7, msg=n)


def test_load_stats_summary():
    stats = LoadStats()
    idx = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1]])  # expert 0 has 4 of 8 assignments, 3 unused... of 4
    stats.add({1: RouterOutput(torch.full((4, 4), 0.25), idx, torch.tensor([[False, False]] * 3 + [[True, False]]))})
    s = stats.summary()["1"]
    assert s["load"] == [2.0, 1.0, 0.5, 0.5] and s["max_over_mean"] == 2.0
    assert s["dropped"] == pytest.approx(1 / 8)
    assert s["cv"] == pytest.approx(float(torch.tensor([2.0, 1, 0.5, 0.5]).std(unbiased=False)), abs=1e-4)


# ---- optimizer groups and LR schedules ----------------------------------------------------------------------
def test_lr_schedules():
    kw = dict(total=1000, lr=1.0, warmup=100)
    assert lr_at(0, **kw) == pytest.approx(0.01) and lr_at(49, **kw) == pytest.approx(0.5)
    assert lr_at(99, **kw) == 1.0 and lr_at(599, **kw) == 1.0
    assert lr_at(600, **kw) == pytest.approx(0.316) and lr_at(899, **kw) == pytest.approx(0.316)
    assert lr_at(900, **kw) == pytest.approx(0.316 ** 2) and lr_at(999, **kw) == pytest.approx(0.099856)
    lite = lr_at(799, decay_points=(0.8, 0.9), **kw), lr_at(800, decay_points=(0.8, 0.9), **kw)
    assert lite == (1.0, pytest.approx(0.316))
    cos = dict(schedule="cosine", min_lr_ratio=0.1, **kw)
    assert lr_at(100, **cos) == pytest.approx(1.0) and lr_at(999, **cos) == pytest.approx(0.1)
    assert lr_at(549, **cos) == pytest.approx(0.55, abs=1e-3)
    assert lr_at(500, schedule="constant", **kw) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, schedule="linear", **kw)


def test_weight_decay_groups():
    model = _moe_model()
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, 0.1)}
    named = dict(model.named_parameters())
    no_decay = {n for n, p in named.items() if id(p) in groups["no_decay"]}
    assert "model.embed_tokens.weight" in no_decay and "model.layers.1.mlp.gate.weight" in no_decay
    assert all(n in no_decay for n in named if n.endswith("norm.weight"))
    assert "lm_head.weight" not in no_decay and "model.layers.1.mlp.experts.gate_up_proj" not in no_decay
    assert "model.layers.0.self_attn.kv_b_proj.weight" not in no_decay
    groups = param_groups(model, 0.1, decay_embeddings=True, decay_router=True)
    assert {n for n, p in named.items() if any(p is q for q in groups[1]["params"])} == \
           {n for n in named if n.endswith("norm.weight")}
