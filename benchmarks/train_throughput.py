"""Training throughput: dsv2's train step vs transformers' DeepseekV2ForCausalLM on the same "train-small" config
(14.2M parameters: hidden 256, 1 dense + 5 MoE layers, 16 routed experts top-2 of 4 groups + 1 shared, vocab 8192),
forward + backward + AdamW on random tokens, batch 8 x 512.

    python benchmarks/train_throughput.py --repeat 3 --out benchmarks/results/train_throughput.json

dsv2 runs its real `train_step` (router stats, gradient clipping and the LR schedule included) without and with
the three balance losses at the paper's coefficients (0.003 / 0.05 / 0.02), in fp32 and under bf16 autocast, with
the C heap set up as `dsv2 train` sets it (train/allocator.py: freed blocks kept for reuse).
transformers has no balance losses; it runs through ../shared/bench/hf_train_bench.py in its own process, as users
run it (glibc's default malloc), and with --hf-same-malloc also under the same glibc settings given as MALLOC_*
environment variables (what that setting alone is worth to transformers). Each
number is the mean of 5 steps after one warm-up step, as in hf_train_bench.py, with torch's default threads;
--repeat N runs every measurement N times (each in a fresh model) and keeps the best, which filters out other load.
Prints a markdown table; --out also writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
HF_BENCH = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "bench", "hf_train_bench.py"))


class RandomBatches:
    """Random token windows, reproducible per sample index (no data files needed)."""

    def __init__(self, vocab: int, seq: int):
        self.vocab, self.seq = vocab, seq

    def get(self, first: int, batch: int):
        ids = np.random.default_rng(first).integers(0, self.vocab, (batch, self.seq + 1))
        return ids[:, :-1], ids[:, 1:]


def dsv2_rate(batch: int, seq: int, bf16: bool, balance: bool, steps: int = 5) -> float:
    from dsv2.model import build_model
    from dsv2.model.moe import MoE
    from dsv2.train.losses import BalanceCoefficients, LoadStats
    from dsv2.train.loop import train_step
    from dsv2.train.optim import build_optimizer
    from dsv2.train.presets import preset_config
    from dsv2.train.train_config import TrainConfig

    cfg = preset_config("train-small")
    tc = TrainConfig(data="-", seq_len=seq, batch_size=batch, bf16=bf16, lr=3e-4, warmup_steps=0)
    coef = BalanceCoefficients(0.003, 0.05, 0.02) if balance else BalanceCoefficients()
    model = build_model(cfg, seed=0).train()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    opt = build_optimizer(model, tc.lr)
    data, stats = RandomBatches(cfg.vocab_size, seq), LoadStats()
    train_step(model, opt, moes, data, tc, coef, cfg, 0, tc.lr, stats, torch.device("cpu"))
    t = time.perf_counter()
    for s in range(1, steps + 1):
        train_step(model, opt, moes, data, tc, coef, cfg, s, tc.lr, stats, torch.device("cpu"))
    return batch * seq * steps / (time.perf_counter() - t)


def hf_rates(batch: int, seq: int, same_malloc: bool = False) -> dict[str, float]:
    env = dict(os.environ)
    if same_malloc:
        from dsv2.train import allocator
        env.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(allocator.TRIM_THRESHOLD),
                   MALLOC_TOP_PAD_=str(allocator.TOP_PAD))
    out = subprocess.run([sys.executable, HF_BENCH, "--batch", str(batch), "--seq", str(seq)],
                         capture_output=True, text=True, check=True, env=env).stdout
    rates = dict(re.findall(r"transformers train step (fp32|bf16 autocast): (\d+) tokens/s", out))
    return {"fp32": float(rates["fp32"]), "bf16": float(rates["bf16 autocast"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--skip-hf", action="store_true", help="dsv2 only (no transformers installed)")
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs of every measurement")
    ap.add_argument("--hf-same-malloc", action="store_true",
                    help="also time transformers under dsv2's glibc malloc settings (MALLOC_* variables)")
    a = ap.parse_args()
    from dsv2.train.allocator import keep_freed_memory
    keep_freed_memory()  # what `dsv2 train` does first

    hf_runs = [] if a.skip_hf else [hf_rates(a.batch, a.seq) for _ in range(a.repeat)]
    hf_same = [hf_rates(a.batch, a.seq, same_malloc=True) for _ in range(a.repeat)] if a.hf_same_malloc else []
    rows = []
    for precision, bf16 in (("fp32", False), ("bf16", True)):
        hf = max(r[precision] for r in hf_runs) if hf_runs else None
        plain = max(dsv2_rate(a.batch, a.seq, bf16, balance=False) for _ in range(a.repeat))
        bal = max(dsv2_rate(a.batch, a.seq, bf16, balance=True) for _ in range(a.repeat))
        rows.append({"precision": precision, "transformers": hf, "dsv2": round(plain, 1),
                     "dsv2_balance_losses": round(bal, 1)})
        if hf_same:
            rows[-1]["transformers_same_malloc"] = max(r[precision] for r in hf_same)
    result = {"config": "train-small (14.2M parameters)", "batch": a.batch, "seq": a.seq, "repeat": a.repeat,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor() or
              platform.machine(), "unit": "training tokens/s (forward + backward + AdamW)", "rows": rows}
    same = " | transformers, dsv2's malloc | dsv2 / that" if hf_same else ""
    print(f"| precision | transformers | dsv2 | dsv2 + balance losses | dsv2 / transformers{same} |")
    print("|---|---:|---:|---:|---:" + ("|---:|---:" if hf_same else "") + "|")
    for r in rows:
        ratio = f"{r['dsv2'] / r['transformers']:.2f}x" if r["transformers"] else "-"
        extra = ""
        if hf_same:
            extra = f" | {r['transformers_same_malloc']:.0f} | {r['dsv2'] / r['transformers_same_malloc']:.2f}x"
        print(f"| {r['precision']} | {r['transformers'] or '-'} | {r['dsv2']:.0f} | {r['dsv2_balance_losses']:.0f} | "
              f"{ratio}{extra} |")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
