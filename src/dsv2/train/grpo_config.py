"""What a GRPO run is given (train/grpo.py runs it): its settings, GRPOConfig, saved as RUN_DIR/grpo_config.json
and read back on --resume; and its prompts, a JSONL file, with the seeded order the steps take them in."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from ..fileio import atomic_write
from ..tokenizer import Tokenizer
from .lora import DEFAULT_TARGETS, LoraConfig

GRPO_CONFIG = "grpo_config.json"
# LoRA targets: LoRA's defaults but kv_b_proj, whose weight the engine's absorbed decode reads directly
GRPO_LORA_TARGETS = tuple(t for t in DEFAULT_TARGETS if t != "kv_b_proj")

NORMALIZATIONS = {
    "grpo": "DeepSeekMath: each completion's token losses averaged over its own length, then averaged over the "
            "completions (long completions weigh as much as short ones, so each of their tokens weighs less)",
    "dr_grpo": "Dr. GRPO (Liu et al. 2025): token losses summed and divided by a constant, completions x "
               "--max-tokens, and advantages not divided by the group's std -- removes the length and difficulty "
               "biases of the two divisions",
    "dapo": "DAPO (Yu et al. 2025): one mean over every completion token of the step, so each token weighs the "
            "same whatever the length of its completion",
}

# ---- settings ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GRPOConfig:
    prompts: str  # JSONL: {"prompt": str} or {"messages": [...]}, plus the fields the reward reads
    reward: str  # a built-in, FILE.py:FUNCTION or module:function (train/rewards.py)
    model: str  # the starting policy and the frozen reference: a Hugging Face directory
    steps: int = 100  # rollouts
    batch_size: int = 8  # prompts per step
    group_size: int = 8  # samples per prompt (G)
    max_tokens: int = 256  # new tokens per sample
    temperature: float = 1.0
    stop: tuple[str, ...] = ()
    lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    beta: float = 0.04  # KL coefficient (DeepSeekMath); 0 drops the reference model
    epsilon: float = 0.2
    epsilon_high: float | None = None  # upper clip (DAPO's clip-higher: 0.28); None = epsilon
    loss_normalization: str = "grpo"
    updates_per_rollout: int = 1  # DeepSeekMath's mu (TRL's num_iterations)
    replay_routing: bool = False
    skip_zero_spread: bool = False  # leave out groups whose samples all scored the same (their advantages are 0)
    micro_batch: int | None = None  # sequences per forward/backward; None = the whole step
    lora_rank: int | None = None  # train LoRA adapters (train/lora.py) instead of every weight
    lora_alpha: float | None = None  # None: 2 x rank
    lora_targets: tuple[str, ...] | None = None  # None: GRPO_LORA_TARGETS
    bf16: bool = False
    grad_checkpointing: bool = False
    save_every: int = 50
    keep_checkpoints: int = 3
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None

    def __post_init__(self):
        def need(cond: bool, name: str, why: str):
            if not cond:
                raise ValueError(f"GRPO setting {name} = {getattr(self, name)!r}: {why}")

        for name in ("steps", "batch_size", "max_tokens", "updates_per_rollout", "save_every", "keep_checkpoints"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        need(self.group_size >= 2, "group_size", "must be >= 2: advantages compare the samples of a group")
        need(self.temperature > 0, "temperature", "must be > 0: greedy samples of a group are all the same")
        need(self.lr > 0, "lr", "must be positive")
        need(self.beta >= 0, "beta", "must be >= 0")
        need(0 < self.epsilon < 1, "epsilon", "must be in (0, 1)")
        need(self.epsilon_high is None or self.epsilon_high > 0, "epsilon_high", "must be positive")
        need(self.loss_normalization in NORMALIZATIONS, "loss_normalization", f"choose one of {list(NORMALIZATIONS)}")
        need(self.micro_batch is None or self.micro_batch >= 1, "micro_batch", "must be >= 1")
        need(self.grad_clip > 0, "grad_clip", "must be positive")
        need(self.lora_rank is None or self.lora_rank >= 1, "lora_rank", "must be >= 1")
        need(self.lora_targets is None or "kv_b_proj" not in self.lora_targets, "lora_targets",
             "kv_b_proj cannot be adapted in GRPO: the engine's absorbed decode multiplies by its weight directly "
             "(W_UK, W_UV^T), which would leave the adapter out of the samples")

    @property
    def lora(self) -> LoraConfig | None:
        if self.lora_rank is None:
            return None
        return LoraConfig(self.lora_rank, self.lora_alpha or 2.0 * self.lora_rank,
                          self.lora_targets or GRPO_LORA_TARGETS)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GRPOConfig:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown GRPO settings {unknown}")
        targets = d.get("lora_targets")
        return cls(**{**d, "stop": tuple(d.get("stop", ())), "lora_targets": targets and tuple(targets)})

    def save(self, run_dir: str) -> None:
        with atomic_write(os.path.join(run_dir, GRPO_CONFIG)) as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, run_dir: str) -> GRPOConfig:
        path = os.path.join(run_dir, GRPO_CONFIG)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{run_dir} is not a GRPO run directory (no {GRPO_CONFIG})")
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def replace(self, **changes) -> GRPOConfig:
        return dataclasses.replace(self, **changes)


# ---- prompts -------------------------------------------------------------------------------------------------
@dataclass
class Prompt:
    prompt: str | list  # the line's "prompt" string or "messages" list, as the reward receives it
    token_ids: list[int]
    fields: dict  # the line's other fields: the reward's keyword arguments


def load_prompts(path: str, tokenizer: Tokenizer, needs: tuple[str, ...] = ()) -> list[Prompt]:
    """Read a prompts JSONL file: each line {"prompt": "..."} (raw completion, tokenized with bos) or
    {"messages": [...]} (rendered with the tokenizer's chat template, ending "Assistant:"), plus fields. Every bad
    line is reported, with its number; `needs` are fields every line must have (what a built-in reward reads)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts {path}: no such file")
    prompts, bad = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                if not isinstance(d, dict):
                    raise ValueError("not a JSON object")
                if ("prompt" in d) == ("messages" in d):
                    raise ValueError('needs exactly one of "prompt" (a string) or "messages" (a chat)')
                missing = [k for k in needs if k not in d]
                if missing:
                    raise ValueError(f"has no {', '.join(repr(k) for k in missing)} field, which the reward reads")
                if "prompt" in d:
                    if not isinstance(d["prompt"], str) or not d["prompt"]:
                        raise ValueError('"prompt" must be a non-empty string')
                    prompt = d.pop("prompt")
                    ids = tokenizer.encode(prompt)
                else:
                    prompt = d.pop("messages")
                    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
                bad.append(f"line {n}: {e}")
                continue
            prompts.append(Prompt(prompt, ids, d))
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(f"--prompts {path}: {len(bad)} bad line(s){more}:\n  " + "\n  ".join(bad[:5]))
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompts")
    return prompts


def prompt_order(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Which prompts step `step` takes: the steps walk through a seeded shuffle of all n, a new one each epoch."""
    out = []
    for k in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(k, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[i]))
    return out


def rollout_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of prompt `index` of step `step`: samples depend on (seed, step, weights) only."""
    return int.from_bytes(hashlib.sha256(f"grpo:{seed}:{step}:{index}".encode()).digest()[:8], "little") >> 1
