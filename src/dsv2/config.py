"""ModelConfig: the checkpoint's config.json as one frozen dataclass, with the derived sizes as properties.

Reads both formats in the wild: the published files (`rope_theta` + `rope_scaling: {"type": "yarn", ...}`) and
files re-saved by transformers 5.x (`rope_parameters: {"rope_type": ..., "rope_theta": ...}`). Unknown keys are
ignored; impossible values fail at construction with a message that names the field.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from .fileio import atomic_write

ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
TOPK_METHODS = ("greedy", "group_limited_greedy")


class ConfigError(ValueError):
    """A config.json that cannot describe a DeepSeek-V2 model; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 102400
    hidden_size: int = 5120
    intermediate_size: int = 12288
    moe_intermediate_size: int = 1536
    num_hidden_layers: int = 60
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # meaningless for MLA (every head has its own K/V); kept for round trips
    # DeepSeekMoE
    n_routed_experts: int | None = 160  # None: every layer is a dense MLP
    n_shared_experts: int | None = 2
    num_experts_per_tok: int | None = 6
    routed_scaling_factor: float = 16.0
    topk_method: str = "group_limited_greedy"
    n_group: int | None = 8
    topk_group: int | None = 3
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    # MLA
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    # positions
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # normalised: {"type": ..., "factor": ..., ...} or None
    # the rest
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    def __post_init__(self):
        def need(cond: bool, name: str, why: str):
            if not cond:
                raise ConfigError(f"config field {name!r} = {getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive integer")
        need(isinstance(self.qk_nope_head_dim, int) and self.qk_nope_head_dim >= 0, "qk_nope_head_dim",
             "must be a non-negative integer")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "rotary pairs need an even number of dims")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             "q_lora_rank", "must be null (plain q_proj) or a positive integer")
        need(self.hidden_act == "silu", "hidden_act", "DeepSeek-V2 uses 'silu'")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        need(self.first_k_dense_replace >= 0, "first_k_dense_replace", "must be >= 0")
        need(self.moe_layer_freq >= 1, "moe_layer_freq", "must be >= 1")
        if self.n_routed_experts is not None:
            E = self.n_routed_experts
            need(isinstance(E, int) and E > 0, "n_routed_experts", "must be a positive integer or null")
            need(self.scoring_func == "softmax", "scoring_func",
                 "only 'softmax' gating exists in DeepSeek-V2 ('sigmoid' is DeepSeek-V3, a different model)")
            need(self.topk_method in TOPK_METHODS, "topk_method",
                 f"must be one of {TOPK_METHODS} ('noaux_tc' belongs to DeepSeek-V3)")
            K = self.num_experts_per_tok
            need(isinstance(K, int) and 0 < K <= E, "num_experts_per_tok", f"must be between 1 and n_routed_experts={E}")
            need(isinstance(self.moe_intermediate_size, int) and self.moe_intermediate_size > 0,
                 "moe_intermediate_size", "must be a positive integer")
            need(self.n_shared_experts is None or self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
            need(self.num_groups >= 1, "n_group", "must be >= 1")
            need(E % self.num_groups == 0, "n_group", f"n_routed_experts={E} must split into n_group equal groups")
            need(1 <= self.groups_per_token <= self.num_groups, "topk_group", f"must be between 1 and n_group={self.num_groups}")
            if self.topk_method == "group_limited_greedy":
                need(K <= self.groups_per_token * (E // self.num_groups), "num_experts_per_tok",
                     "more experts per token than the kept groups hold")
        need(isinstance(self.intermediate_size, int) and self.intermediate_size > 0, "intermediate_size",
             "must be a positive integer")
        need(self.rope_theta > 0, "rope_theta", "must be positive")
        rs = self.rope_scaling
        if rs is not None:
            need(rs.get("type") in ROPE_TYPES, "rope_scaling", f"unknown rope type; known: {ROPE_TYPES}")
            if rs["type"] != "default":
                need(isinstance(rs.get("factor"), (int, float)) and rs["factor"] >= 1, "rope_scaling",
                     "'factor' must be a number >= 1")
            if rs["type"] == "yarn":
                need(isinstance(rs.get("original_max_position_embeddings"), int), "rope_scaling",
                     "yarn needs an integer 'original_max_position_embeddings'")

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:  # d_q = d_nope + d_rope
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:  # what the cache holds per token per layer: [c_kv | k_pe]
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def num_groups(self) -> int:
        return self.n_group or 1

    @property
    def groups_per_token(self) -> int:
        return self.topk_group or 1

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else list(e) if isinstance(e, (list, tuple)) else [e]

    def is_moe_layer(self, i: int) -> bool:
        return (self.n_routed_experts is not None and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["type"]

    @property
    def mscale(self) -> float:
        """YaRN's attention temperature m: the softmax scale is d_q^-0.5 * m^2 (MODEL_SPEC section 2). Applied
        whenever rope_scaling carries a non-zero mscale_all_dim, whatever its type, as the reference does."""
        rs = self.rope_scaling
        if rs is None or not rs.get("mscale_all_dim") or not rs.get("factor"):
            return 1.0
        return yarn_get_mscale(rs["factor"], rs["mscale_all_dim"])

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim ** -0.5 * self.mscale ** 2

    # ---- sizes a user asks about ---------------------------------------------------------------------------
    def _mla_params(self) -> int:
        H, n = self.hidden_size, self.num_attention_heads
        q = H * n * self.qk_head_dim if self.q_lora_rank is None else \
            H * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * n * self.qk_head_dim
        kv = H * self.latent_dim + self.kv_lora_rank + self.kv_lora_rank * n * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + n * self.v_head_dim * H

    def _expert_params(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size

    def param_counts(self) -> dict[str, int]:
        """Total parameters, and those one token touches (embedding row and chosen experts only)."""
        H, V, L = self.hidden_size, self.vocab_size, self.num_hidden_layers
        embed = V * H
        head = 0 if self.tie_word_embeddings else V * H
        total, active = embed + head + H, H + H + head  # (final norm) + one embedding row + lm_head
        for i in range(L):
            layer = self._mla_params() + 2 * H
            if self.is_moe_layer(i):
                shared = 3 * H * self.moe_intermediate_size * (self.n_shared_experts or 0)
                gate = self.n_routed_experts * H
                total += layer + shared + gate + self.n_routed_experts * self._expert_params()
                active += layer + shared + gate + self.num_experts_per_tok * self._expert_params()
            else:
                total += layer + 3 * H * self.intermediate_size
                active += layer + 3 * H * self.intermediate_size
        return {"total": total, "activated": active}

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        return self.num_hidden_layers * self.latent_dim * bytes_per_value

    def full_kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """What a per-head K/V cache (the official HF code, transformers) holds per token."""
        n = self.num_attention_heads
        return self.num_hidden_layers * n * (self.qk_head_dim + self.v_head_dim) * bytes_per_value

    # ---- (de)serialisation -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        rope = _normalise_rope(d)
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw.update(rope)
        for k in ("rope_theta", "routed_scaling_factor", "rms_norm_eps"):
            if isinstance(kw.get(k), int):
                kw[k] = float(kw[k])
        if kw.get("num_experts_per_tok") is None and kw.get("n_routed_experts") is not None:
            raise ConfigError("config field 'num_experts_per_tok' is missing: a MoE model must say how many "
                              "experts each token uses")
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read a model directory's config.json, or the file itself."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json at {file!r}: pass a Hugging Face model directory or its config.json")
        try:
            with open(file, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{file} must hold a JSON object")
        mt = d.get("model_type")
        if mt == "deepseek_v2_dsv2_quantized":  # `dsv2 quantize` output (engine/quantized_checkpoint.py)
            d = {**d, "model_type": "deepseek_v2"}
        elif mt is not None and mt != "deepseek_v2":
            raise ConfigError(f"{file}: model_type is {mt!r}; dsv2 runs 'deepseek_v2' models only")
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The published config.json layout (rope_theta + rope_scaling with "type"), loadable by transformers."""
        d = dataclasses.asdict(self)
        if d["num_key_value_heads"] is None:
            d["num_key_value_heads"] = self.num_attention_heads
        if d["torch_dtype"] is None:
            d.pop("torch_dtype")
        d = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", **d}
        return d

    def save(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with atomic_write(os.path.join(directory, "config.json")) as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _normalise_rope(d: dict) -> dict:
    """Both rope formats -> rope_theta + rope_scaling {"type": ...} (None when plain rope)."""
    out: dict[str, Any] = {}
    params = d.pop("rope_parameters", None)
    scaling = d.get("rope_scaling")
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError("config field 'rope_parameters' must be an object")
        params = dict(params)
        if "rope_theta" in params:
            out["rope_theta"] = params.pop("rope_theta")
        kind = params.pop("rope_type", params.pop("type", "default"))
        scaling = None if kind == "default" and not params.get("factor") else {"type": kind, **params}
    elif scaling is not None:
        if not isinstance(scaling, dict):
            raise ConfigError("config field 'rope_scaling' must be an object or null")
        scaling = dict(scaling)
        kind = scaling.pop("type", scaling.pop("rope_type", None))
        if kind is None:
            raise ConfigError("config field 'rope_scaling' has no 'type'")
        scaling = {"type": kind, **scaling}
    if scaling is not None and scaling["type"] == "default":
        scaling = None
    if scaling is not None and "factor" in scaling and isinstance(scaling["factor"], int):
        scaling["factor"] = float(scaling["factor"])
    out["rope_scaling"] = scaling
    return out
