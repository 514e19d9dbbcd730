"""A GRPO run's before / after and its chart: `evaluate_rewards` (greedy completions of held-out prompts, mean
reward) and `plot_grpo` (RUN_DIR/plots/reward.png)."""
from __future__ import annotations

import os

import numpy as np

from ..checkpoint import resolve_model_path
from ..engine.llm import LLM
from ..engine.sampling_params import SamplingParams
from .checkpointing import read_metrics
from .grpo import compute_rewards
from .grpo_config import load_prompts
from .rewards import load_reward, required_fields


def evaluate_rewards(model: str, prompts_path: str, reward_spec: str, max_tokens: int = 256,
                     stop: tuple[str, ...] = (), progress: bool = False) -> dict:
    """Greedy completion of every prompt by the model in `model` (fp32, as trained) and its mean reward: the
    before/after measure of a GRPO run on held-out prompts."""
    directory = resolve_model_path(model)
    llm = LLM(directory, dtype="float32")
    if llm.tokenizer is None:
        raise FileNotFoundError(f"{model}: no tokenizer.json")
    reward = load_reward(reward_spec)
    prompts = load_prompts(prompts_path, llm.tokenizer, required_fields(reward_spec))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=list(stop) or None)
    outs = llm.generate(prompt_token_ids=[p.token_ids for p in prompts], sampling_params=params, use_tqdm=progress)
    rewards = compute_rewards(reward, reward_spec, prompts, [o.outputs for o in outs]).flatten()
    return {"model": model, "prompts": len(prompts), "reward_mean": round(rewards.mean().item(), 4),
            "solved": round((rewards >= 1.0).float().mean().item(), 4),
            "examples": [{"prompt": p.prompt, "completion": o.text, "reward": r}
                         for p, o, r in list(zip(prompts, outs, rewards.tolist()))[:5]]}


def plot_grpo(run_dir: str, out_dir: str | None = None) -> list[str]:
    """RUN_DIR/plots/reward.png: reward mean (+- std) per step, KL to the reference, completion length."""
    from .plot import _pyplot
    records = [r for r in read_metrics(run_dir) if r.get("kind") == "grpo"]
    if not records:
        raise ValueError(f"{run_dir}: no GRPO records in metrics.jsonl yet")
    plt = _pyplot()
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    steps = [r["step"] for r in records]
    mean = np.array([r["reward_mean"] for r in records])
    std = np.array([r["reward_std"] for r in records])
    k = max(1, len(records) // 10)  # a moving average over ~a tenth of the run
    smooth = np.convolve(mean, np.ones(k) / k, mode="valid")
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    axes[0].fill_between(steps, mean - std, mean + std, alpha=0.15, label="+- std over samples")
    axes[0].plot(steps, mean, lw=0.8, alpha=0.6, label="mean reward")
    axes[0].plot(steps[k - 1:], smooth, lw=2, label=f"moving average ({k} steps)")
    axes[0].set(ylabel="reward", title=f"GRPO -- {os.path.basename(os.path.abspath(run_dir))}")
    axes[0].legend(fontsize=8)
    kl = [(s, r["kl"]) for s, r in zip(steps, records) if r.get("kl") is not None]
    if kl:
        axes[1].plot(*zip(*kl))
    axes[1].set(ylabel="KL to reference (k3)")
    axes[2].plot(steps, [r["completion_len"] for r in records])
    axes[2].set(xlabel="step", ylabel="completion tokens")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, "reward.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
