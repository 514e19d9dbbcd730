"""LoRA as a transform over the unmodified model: `apply_lora` swaps each targeted projection for a module holding
the frozen base and a low-rank update, W x + (alpha / r) B A x (Hu et al. 2021), and `merge_lora` folds the update
back in, giving the plain model again (what `dsv2 export` writes).

Targets are the checkpoint's module names: q_proj (or q_a_proj / q_b_proj when q_lora_rank is set),
kv_a_proj_with_mqa, kv_b_proj, o_proj of MLA; gate_proj, up_proj, down_proj of the dense MLPs and the shared experts;
and `experts` for the routed experts, whose stacked weights get a stacked A/B per expert (gate, up and down each
their own, as if every expert were three Linear layers, so an adapter written per expert reads back unchanged).
Everything else is frozen; the router too unless train_router is set.

`save_adapter` writes PEFT's file layout (adapter_config.json + adapter_model.safetensors) with the published
per-expert names (`...mlp.experts.3.gate_proj.lora_A.weight`), which PEFT converts to transformers 5's fused expert
weights when it loads them. One wrinkle of that conversion: on DeepSeek-V2, PEFT maps the target names gate_proj /
up_proj / down_proj to the routed experts only, so the dense and shared MLPs are listed as target_parameters (their
`.weight`), which PEFT wraps with the same key names; tests/test_lora.py checks PEFT's logits against dsv2's.

Shape legend: E experts, H hidden, I expert intermediate, r rank, c tokens routed to one expert.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..fileio import atomic_directory
from ..model.layers import MLP
from ..model.mla import MLA
from ..model.moe import ExpertGroup, Experts, Gate

ATTENTION_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS + ("experts",)
DEFAULT_TARGETS = ATTENTION_TARGETS + MLP_TARGETS  # the routed experts are opt-in: they hold most of the weights
# q_proj exists only without q_lora_rank, q_a_proj / q_b_proj only with it: asking for the other layout's names
# is not an error (the defaults name both)
_Q_LAYOUT = {"q_proj", "q_a_proj", "q_b_proj"}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0
    train_router: bool = False  # unfreeze the routers (mlp.gate) too, trained in full

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 1:
            raise ValueError(f"LoRA rank {self.rank}: must be >= 1 (8-64 is usual)")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha {self.alpha}: must be positive (the update is scaled by alpha / rank)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout {self.dropout}: must be in [0, 1)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {list(unknown or self.targets)}: choose from {', '.join(TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "dropout": self.dropout,
                "train_router": self.train_router}


def _lora_pair(rows: tuple[int, ...], d_in: int, d_out: int, r: int) -> tuple[nn.Parameter, nn.Parameter]:
    """A [*rows, r, d_in] drawn as nn.Linear draws its weights (PEFT's default), B [*rows, d_out, r] zeros: the
    adapted model starts exactly at the base."""
    a = torch.empty(*rows, r, d_in)
    bound = 1 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on [r, d_in]
    a.uniform_(-bound, bound)
    return nn.Parameter(a), nn.Parameter(torch.zeros(*rows, d_out, r))


class LoraLinear(nn.Module):
    """base_layer(x) + scaling * B A dropout(x); base_layer is the frozen nn.Linear it replaced."""

    def __init__(self, base: nn.Linear, cfg: LoraConfig):
        super().__init__()
        self.base_layer = base
        self.lora_A, self.lora_B = _lora_pair((), base.in_features, base.out_features, cfg.rank)
        self.lora_A.data = self.lora_A.data.to(base.weight)
        self.lora_B.data = self.lora_B.data.to(base.weight)
        self.scaling = cfg.scaling
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # [out, in]


class LoraExperts(ExpertGroup):
    """Routed experts with a LoRA pair per expert on each of gate, up and down (stacked over E). The token grouping
    is ExpertGroup's; base_layer is the frozen stacked Experts."""

    def __init__(self, base: Experts, cfg: LoraConfig):
        super().__init__(base.n_experts)
        self.base_layer = base
        E, H, I, r = base.n_experts, base.down_proj.shape[1], base.down_proj.shape[2], cfg.rank
        self.lora_A_gate, self.lora_B_gate = _lora_pair((E,), H, I, r)  # [E, r, H], [E, I, r]
        self.lora_A_up, self.lora_B_up = _lora_pair((E,), H, I, r)
        self.lora_A_down, self.lora_B_down = _lora_pair((E,), I, H, r)  # [E, r, I], [E, H, r]
        for p in self.lora_parameters():
            p.data = p.data.to(base.down_proj)
        self.scaling = cfg.scaling
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def lora_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A_gate, self.lora_B_gate, self.lora_A_up, self.lora_B_up, self.lora_A_down, self.lora_B_down]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        s, b = self.scaling, self.base_layer
        gate, up = F.linear(x, b.gate_up_proj[e]).chunk(2, dim=-1)  # [c, I] each
        xd = self.dropout(x)
        gate = gate + F.linear(F.linear(xd, self.lora_A_gate[e]), self.lora_B_gate[e]) * s
        up = up + F.linear(F.linear(xd, self.lora_A_up[e]), self.lora_B_up[e]) * s
        h = F.silu(gate) * up
        return F.linear(h, b.down_proj[e]) + F.linear(F.linear(self.dropout(h), self.lora_A_down[e]),
                                                      self.lora_B_down[e]) * s

    def deltas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The updates of the stacked weights: gate_up [E, 2I, H] (rows [gate | up]), down [E, H, I]."""
        gate_up = torch.cat([self.lora_B_gate @ self.lora_A_gate, self.lora_B_up @ self.lora_A_up], dim=1)
        return gate_up * self.scaling, (self.lora_B_down @ self.lora_A_down) * self.scaling


def _targeted(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every module `targets` names; a target this model lacks is an error."""
    found, seen = [], set()
    for parent in model.modules():
        if isinstance(parent, MLA) and parent.fused_input:
            raise ValueError("LoRA applies to the training layout of the model (dsv2.load_model), not to a model "
                             "prepared for inference (fused input projections)")
        if isinstance(parent, MLA):
            names = ATTENTION_TARGETS
        elif isinstance(parent, MLP):
            names = MLP_TARGETS
        elif isinstance(parent, ExpertGroup) or not hasattr(parent, "experts"):
            continue
        else:
            names = ("experts",)
        for name in names:
            child = getattr(parent, name, None)
            if name in targets and child is not None:
                if name == "experts" and not isinstance(child, Experts):
                    raise ValueError(f"LoRA on the routed experts needs the stacked trainable Experts, not "
                                     f"{type(child).__name__} (a quantized or prepacked model)")
                if not isinstance(child, (nn.Linear, Experts)):
                    raise ValueError(f"cannot apply LoRA to {name}: it is a {type(child).__name__}, not nn.Linear "
                                     "(a quantized or prepacked model); load the model with dsv2.load_model")
                found.append((parent, name, child))
                seen.add(name)
    missing = [t for t in targets if t not in seen and t not in _Q_LAYOUT]
    if not seen & _Q_LAYOUT and set(targets) & _Q_LAYOUT:
        missing += [t for t in targets if t in _Q_LAYOUT]
    if missing:
        raise ValueError(f"LoRA targets {missing} match no module of this model (a dense model has no `experts`; "
                         f"one without MoE layers' shared experts or dense layers may lack the MLP names)")
    return found


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap every targeted projection of `model` (in place) in its LoRA module and freeze everything else (the
    router too unless cfg.train_router). The adapters are drawn from torch's global RNG: seed it first."""
    if any(isinstance(m, (LoraLinear, LoraExperts)) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; merge_lora it first to stack another")
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, name, child in _targeted(model, cfg.targets):
        setattr(parent, name, LoraExperts(child, cfg) if isinstance(child, Experts) else LoraLinear(child, cfg))
    if cfg.train_router:
        for m in model.modules():
            if isinstance(m, Gate):
                m.weight.requires_grad_(True)
    model.lora_config = cfg
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (A and B of every LoRA module), in module order."""
    out = []
    for m in model.modules():
        if isinstance(m, LoraLinear):
            out += [m.lora_A, m.lora_B]
        elif isinstance(m, LoraExperts):
            out += m.lora_parameters()
    return out


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA run's checkpoint holds: the parameters that train (adapters, routers if unfrozen), by name."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = set(trainable_state_dict(model))
    if set(state) != expected:
        raise ValueError(f"the checkpoint's trainable parameters do not match this LoRA setup: missing "
                         f"{sorted(expected - set(state))[:4]}, unexpected {sorted(set(state) - expected)[:4]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in state.items():
            params[name].copy_(t)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight (W + alpha/r B A, computed in fp32) and put the plain module back:
    the plain model, every parameter trainable again, as load_model returns it."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLinear):
                w = child.base_layer.weight
                w.copy_(w.float() + child.delta().float())
                setattr(parent, name, child.base_layer)
            elif isinstance(child, LoraExperts):
                b = child.base_layer
                gate_up, down = child.deltas()
                b.gate_up_proj.copy_(b.gate_up_proj.float() + gate_up.float())
                b.down_proj.copy_(b.down_proj.float() + down.float())
                setattr(parent, name, b)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# ---- PEFT's file layout -----------------------------------------------------------------------------------------
def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter under PEFT's key names for transformers' DeepseekV2ForCausalLM, routed experts per expert (the
    published layout), trained routers as PEFT's modules_to_save entries (`...mlp.gate.weight`)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            out[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A
            out[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B
        elif isinstance(m, LoraExperts):
            for e in range(m.n_experts):
                for proj, a, b in (("gate_proj", m.lora_A_gate, m.lora_B_gate), ("up_proj", m.lora_A_up, m.lora_B_up),
                                   ("down_proj", m.lora_A_down, m.lora_B_down)):
                    out[f"{_PEFT_PREFIX}{name}.{e}.{proj}.lora_A.weight"] = a[e]
                    out[f"{_PEFT_PREFIX}{name}.{e}.{proj}.lora_B.weight"] = b[e]
        elif isinstance(m, Gate) and m.weight.requires_grad:
            out[f"{_PEFT_PREFIX}{name}.weight"] = m.weight
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def _peft_targets(cfg: LoraConfig) -> tuple[str | None, list[str] | None]:
    """adapter_config.json's target_modules (a regex over the published module names) and target_parameters (the
    dense and shared MLPs, see the module docstring)."""
    attention = [t for t in cfg.targets if t in ATTENTION_TARGETS]
    parts = [rf"self_attn\.({'|'.join(attention)})"] if attention else []
    if "experts" in cfg.targets:  # `experts.N.gate_proj` (the published names) or `experts.gate_proj` (PEFT's probe)
        parts.append(r"mlp\.experts\.(\d+\.)?(gate_proj|up_proj|down_proj)")
    mlp = [t for t in cfg.targets if t in MLP_TARGETS]
    params = [f"{owner}.{t}.weight" for owner in ("mlp", "shared_experts") for t in mlp]
    return (rf".*\.({'|'.join(parts)})" if parts else None), (params or None)


def save_adapter(model: nn.Module, out_dir: str, base_model_name_or_path: str | None = None) -> dict:
    """Write the adapters of `model` (after apply_lora and training) as a PEFT LoRA adapter directory:
    adapter_config.json + adapter_model.safetensors. Replaces out_dir as a whole; returns the config written."""
    from safetensors.torch import save_file
    cfg: LoraConfig | None = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("the model has no LoRA adapters (apply_lora first)")
    modules, params = _peft_targets(cfg)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "bias": "none",
              "target_modules": modules, "target_parameters": params, "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": ["gate"] if cfg.train_router else None,
              "rank_pattern": {}, "alpha_pattern": {}}
    with atomic_directory(out_dir) as staging:
        save_file(peft_state_dict(model), os.path.join(staging, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(staging, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
    return config


_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.lora_([AB])\.weight$")
_LINEAR_KEY = re.compile(r"^(.*)\.lora_([AB])\.weight$")


def load_adapter(model: nn.Module, adapter_dir: str) -> nn.Module:
    """Apply a PEFT LoRA adapter directory (as save_adapter writes it, or PEFT for a DeepSeek-V2 in the published
    per-expert layout) to the plain `model`: apply_lora with the targets its keys name, then its weights."""
    from safetensors.torch import load_file
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {adapter_dir}: not a PEFT adapter directory")
    with open(path, encoding="utf-8") as f:
        pc = json.load(f)
    if pc.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {pc.get('peft_type')!r}; only LoRA adapters load here")
    for key, plain in (("use_rslora", False), ("use_dora", False), ("rank_pattern", {}), ("alpha_pattern", {}),
                       ("bias", "none")):
        if pc.get(key) not in (None, plain):
            raise ValueError(f"{path}: {key} = {pc[key]!r} is not supported (only plain LoRA: one rank and alpha)")
    weights = {k.removeprefix(_PEFT_PREFIX): v for k, v in load_file(os.path.join(adapter_dir, ADAPTER_WEIGHTS)).items()}
    targets, router = set(), {}
    for k in weights:
        if m := _EXPERT_KEY.match(k):
            targets.add("experts")
        elif m := _LINEAR_KEY.match(k):
            targets.add(m.group(1).rsplit(".", 1)[-1])
        elif k.endswith("mlp.gate.weight"):
            router[k] = weights[k]
        else:
            raise ValueError(f"{adapter_dir}/{ADAPTER_WEIGHTS}: unexpected key {k!r} (not a LoRA A/B of a "
                             "DeepSeek-V2 projection in the published layout)")
    cfg = LoraConfig(int(pc["r"]), float(pc["lora_alpha"]), tuple(t for t in TARGETS if t in targets),
                     float(pc.get("lora_dropout") or 0.0), train_router=bool(router))
    apply_lora(model, cfg)
    modules = dict(model.named_modules())
    expected = set(peft_state_dict(model))
    given = {_PEFT_PREFIX + k for k in weights}
    if given != expected:
        raise ValueError(f"{adapter_dir}: the adapter does not cover what its targets {list(cfg.targets)} adapt in "
                         f"this model: missing {sorted(expected - given)[:4]}, unexpected "
                         f"{sorted(given - expected)[:4]} (an adapter for another model?)")
    with torch.no_grad():
        for k, v in weights.items():
            if m := _EXPERT_KEY.match(k):
                mod, e, proj, ab = modules[m.group(1)], int(m.group(2)), m.group(3).removesuffix("_proj"), m.group(4)
                dest = getattr(mod, f"lora_{ab}_{proj}")[e]
            elif k in router:
                dest = modules[k.removesuffix(".weight")].weight
            else:
                m = _LINEAR_KEY.match(k)
                dest = getattr(modules[m.group(1)], f"lora_{m.group(2)}")
            if dest.shape != v.shape:
                raise ValueError(f"{adapter_dir}: {k} has shape {list(v.shape)}, this model needs {list(dest.shape)}")
            dest.copy_(v)
    return model
