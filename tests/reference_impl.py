"""An independent, deliberately naive DeepSeek-V2 forward written straight from MODEL_SPEC (loops over tokens,
heads and experts, float64). It is the oracle for what transformers does not implement (norm_topk_prob,
moe_layer_freq) and is itself checked against transformers where both apply."""
from __future__ import annotations

import math

import torch


def _rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _mscale(factor, m):
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def _inv_freq(cfg):
    d, theta, rs = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling
    base = [theta ** (-2 * i / d) for i in range(d // 2)]
    if rs is None:
        return base, 1.0
    f, orig = rs["factor"], rs["original_max_position_embeddings"]
    corr = lambda r: d * math.log(orig / (2 * math.pi * r)) / (2 * math.log(theta))
    low, high = max(math.floor(corr(rs.get("beta_fast", 32))), 0), min(math.ceil(corr(rs.get("beta_slow", 1))), d - 1)
    out = []
    for i, fe in enumerate(base):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        mask = 1 - ramp
        out.append(fe / f * (1 - mask) + fe * mask)
    return out, _mscale(f, rs.get("mscale", 1)) / _mscale(f, rs.get("mscale_all_dim", 0))


def _rope(v, pos, inv, amp):  # interleaved pairs
    out = v.clone()
    for j, fr in enumerate(inv):
        c, s = math.cos(pos * fr) * amp, math.sin(pos * fr) * amp
        a, b = v[..., 2 * j].clone(), v[..., 2 * j + 1].clone()
        out[..., 2 * j], out[..., 2 * j + 1] = a * c - b * s, a * s + b * c
    return out


def _mlp(x, sd, p):
    g, u = x @ sd[p + "gate_proj.weight"].T, x @ sd[p + "up_proj.weight"].T
    return (g * torch.sigmoid(g) * u) @ sd[p + "down_proj.weight"].T


def reference_logits(cfg, sd: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """sd: the published checkpoint tensors (per-expert keys). Returns [T, V] float64 logits."""
    sd = {k: v.double() for k, v in sd.items()}
    n, dn, dr, dv, r = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                        cfg.kv_lora_rank)
    inv, amp = _inv_freq(cfg)
    scale = (dn + dr) ** -0.5
    rs = cfg.rope_scaling
    if rs and rs.get("mscale_all_dim"):
        scale *= _mscale(rs["factor"], rs["mscale_all_dim"]) ** 2
    x = sd["model.embed_tokens.weight"][ids]  # [T, H]
    T = len(ids)
    for L in range(cfg.num_hidden_layers):
        p = f"model.layers.{L}."
        h = _rms(x, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        a = p + "self_attn."
        if cfg.q_lora_rank is None:
            q = h @ sd[a + "q_proj.weight"].T
        else:
            q = _rms(h @ sd[a + "q_a_proj.weight"].T, sd[a + "q_a_layernorm.weight"], 1e-6) @ sd[a + "q_b_proj.weight"].T
        q = q.view(T, n, dn + dr)
        ckv = h @ sd[a + "kv_a_proj_with_mqa.weight"].T
        c, kpe = _rms(ckv[:, :r], sd[a + "kv_a_layernorm.weight"], 1e-6), ckv[:, r:]
        kv = (c @ sd[a + "kv_b_proj.weight"].T).view(T, n, dn + dv)
        out = torch.zeros(T, n, dv, dtype=torch.float64)
        kpe_r = torch.stack([_rope(kpe[t], t, inv, amp) for t in range(T)])
        for t in range(T):
            for i in range(n):
                qn, qp = q[t, i, :dn], _rope(q[t, i, dn:], t, inv, amp)
                s = torch.tensor([(qn @ kv[j, i, :dn] + qp @ kpe_r[j]) * scale for j in range(t + 1)])
                pr = torch.softmax(s, 0)
                out[t, i] = sum(pr[j] * kv[j, i, dn:] for j in range(t + 1))
        x = x + out.reshape(T, n * dv) @ sd[a + "o_proj.weight"].T
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        moe = (cfg.n_routed_experts is not None and L >= cfg.first_k_dense_replace and L % cfg.moe_layer_freq == 0)
        if not moe:
            x = x + _mlp(h, sd, p + "mlp.")
            continue
        E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
        y = torch.zeros_like(h)
        for t in range(T):
            s = torch.softmax(sd[p + "mlp.gate.weight"] @ h[t], 0)
            choose = s.clone()
            if cfg.topk_method == "group_limited_greedy":
                G = cfg.n_group
                best = [max(s[g * E // G:(g + 1) * E // G]) for g in range(G)]
                keep = sorted(range(G), key=lambda g: -best[g])[:cfg.topk_group]
                for e in range(E):
                    if e // (E // G) not in keep:
                        choose[e] = 0
            top = sorted(range(E), key=lambda e: -choose[e])[:K]
            w = [choose[e] for e in top]
            if K > 1 and cfg.norm_topk_prob:
                w = [v / (sum(w) + 1e-20) for v in w]
            else:
                w = [v * cfg.routed_scaling_factor for v in w]
            for e, we in zip(top, w):
                y[t] += we * _mlp(h[t], sd, p + f"mlp.experts.{e}.")
        if cfg.n_shared_experts:
            y = y + _mlp(h, sd, p + "mlp.shared_experts.")
        x = x + y
    x = _rms(x, sd["model.norm.weight"], cfg.rms_norm_eps)
    return x @ sd["lm_head.weight"].T
