"""`dsv2 plot RUN_DIR`: PNG charts of a run's metrics.jsonl.

    loss.png         train loss (per logging interval) and validation loss, by tokens seen
    lr.png           learning rate
    throughput.png   training tokens/s
    expert_load.png  per MoE layer: load of each expert relative to the mean (1.0 = balanced) over time
"""
from __future__ import annotations

import os

from .checkpointing import read_metrics


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("dsv2 plot needs matplotlib: pip install 'dsv2[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write the charts for `run_dir` into `out_dir` (default RUN_DIR/plots); returns the files written."""
    records = read_metrics(run_dir)
    if any(r.get("kind") == "grpo" for r in records):  # a `dsv2 grpo` run: reward, KL, completion length
        from .grpo_eval import plot_grpo
        return plot_grpo(run_dir, out_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        raise ValueError(f"{run_dir}: no training records in metrics.jsonl yet; plot after the first --log-every steps")
    plt = _pyplot()
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    tokens = [r["tokens"] / 1e6 for r in train]

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(tokens, [r["ce"] for r in train], lw=1, label="train (cross-entropy)")
    if evals:
        ax.plot([r["tokens"] / 1e6 for r in evals], [r["val_loss"] for r in evals], "o-", ms=3, label="validation")
    finals = [r for r in records if r.get("kind") == "final"]
    if finals:
        ax.axhline(finals[-1]["val_loss"], ls=":", c="gray",
                   label=f"held-out {finals[-1]['val_loss']:.3f} ({finals[-1]['val_bits_per_byte']:.3f} bits/byte)")
    ax.set(xlabel="tokens (M)", ylabel="loss (nats/token)", title=f"loss -- {os.path.basename(os.path.abspath(run_dir))}")
    lo = min(r["ce"] for r in train[len(train) // 10:]) if len(train) > 10 else None
    if lo is not None:  # the first steps' loss (~ln V) would flatten everything else
        ax.set_ylim(lo * 0.95, max(r["ce"] for r in train[len(train) // 20:]) * 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax.grid(alpha=0.3)
    save(fig, "lr.png")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(tokens, [r["tokens_per_s"] for r in train])
    ax.set(xlabel="tokens (M)", ylabel="tokens/s", title="training throughput")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    save(fig, "throughput.png")

    with_moe = [r for r in train if r.get("moe")]
    if with_moe:
        import numpy as np
        layers = sorted(with_moe[-1]["moe"], key=int)
        fig, axes = plt.subplots(len(layers), 1, figsize=(10, 1.2 + 1.6 * len(layers)), squeeze=False)
        for ax, layer in zip(axes[:, 0], layers):
            rows = [r for r in with_moe if layer in r["moe"]]
            load = np.array([r["moe"][layer]["load"] for r in rows]).T  # [E, time]
            im = ax.imshow(load, aspect="auto", cmap="coolwarm", vmin=0, vmax=2, interpolation="nearest",
                           extent=[rows[0]["tokens"] / 1e6, rows[-1]["tokens"] / 1e6, load.shape[0] - 0.5, -0.5])
            ax.set_ylabel(f"layer {layer}\nexpert")
        axes[-1, 0].set_xlabel("tokens (M)")
        axes[0, 0].set_title("expert load relative to the mean (1.0 = balanced)")
        fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=0.8)
        path = os.path.join(out_dir, "expert_load.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
