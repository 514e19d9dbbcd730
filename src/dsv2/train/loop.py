"""The pretraining loop: `train(TrainConfig, run_dir)`.

One optimizer step = grad_accum micro-batches of batch_size windows of seq_len tokens, each: forward (optionally
under bf16 autocast and with activation checkpointing) -> cross-entropy + balance losses -> backward; then the
global gradient norm is clipped, the scheduled learning rate set, and AdamW steps.

Everything a step depends on is either a function of (seed, step) -- the batch, the sequences exempt from token
dropping -- or saved in the checkpoint (weights, optimizer moments, RNG states, the logging interval's running
sums), so on CPU a run killed at any moment and resumed logs bit-identical losses to an uninterrupted one.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import signal
import sys
import threading
import time

import numpy as np
import torch

from ..config import ModelConfig
from ..model import build_model
from ..model.moe import MoE, TokenDropping
from ..progress import Progress
from .checkpointing import (append_metrics, list_checkpoints, load_latest, rng_state, save_checkpoint,
                            set_aside_after, set_rng_state)
from .data import TokenShards, TrainBatches, file_sha256, read_manifest
from .evaluate import evaluate
from .losses import BalanceCoefficients, LoadStats, balance_loss, cross_entropy
from .optim import build_optimizer, lr_at
from .presets import PRESETS, preset_config
from .train_config import TRAIN_CONFIG, TrainConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def model_config_for(tc: TrainConfig, manifest: dict) -> ModelConfig:
    """The preset (sized to the tokenizer and the training context) or the config.json `tc.model` names."""
    tok = manifest["tokenizer"]
    if tc.model in PRESETS:
        cfg = preset_config(tc.model).replace(vocab_size=tok["vocab_size"], bos_token_id=tok["bos_token_id"],
                                              eos_token_id=tok["eos_token_id"])
        rs = cfg.rope_scaling
        if rs and rs["type"] == "yarn" and rs["factor"] == 1.0:
            # identity YaRN: record the trained context as the one a later extension scales from
            cfg = cfg.replace(max_position_embeddings=tc.seq_len,
                              rope_scaling={**rs, "original_max_position_embeddings": tc.seq_len})
        elif cfg.max_position_embeddings < tc.seq_len:
            cfg = cfg.replace(max_position_embeddings=tc.seq_len)
        return cfg
    if not os.path.exists(tc.model):
        raise FileNotFoundError(f"--model {tc.model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json")
    cfg = ModelConfig.from_pretrained(tc.model)
    if cfg.vocab_size < tok["vocab_size"]:
        raise ValueError(f"{tc.model}: vocab_size {cfg.vocab_size} is smaller than the tokenizer's "
                         f"{tok['vocab_size']} tokens; raise it in the config")
    if cfg.max_position_embeddings < tc.seq_len:
        raise ValueError(f"{tc.model}: max_position_embeddings {cfg.max_position_embeddings} < --seq-len {tc.seq_len}")
    return cfg


def _init_run_dir(tc: TrainConfig, cfg: ModelConfig, run_dir: str, manifest: dict) -> None:
    if os.path.exists(os.path.join(run_dir, TRAIN_CONFIG)):
        raise ValueError(f"{run_dir} already holds a run; continue it with --resume, or choose another --out")
    os.makedirs(run_dir, exist_ok=True)
    tc.save(run_dir)
    cfg.save(run_dir)
    src = manifest["tokenizer"]["path"]
    if not os.path.isfile(os.path.join(src, "tokenizer.json")):
        print(f"warning: the data's tokenizer {src} is gone; `dsv2 export` will lack tokenizer files",
              file=sys.stderr)
        return
    if file_sha256(os.path.join(src, "tokenizer.json")) != manifest["tokenizer"]["sha256"]:
        raise ValueError(f"{src}/tokenizer.json changed since the data in {tc.data} was prepared; prepare it again")
    os.makedirs(os.path.join(run_dir, "tokenizer"), exist_ok=True)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(run_dir, "tokenizer", name))


class _Interval:
    """Running sums over one logging interval; saved in checkpoints so a resumed interval averages the same."""
    KEYS = ("loss", "ce", "expert", "device", "comm", "grad_norm", "steps", "seconds", "tokens")

    def __init__(self):
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.stats = LoadStats()

    def record(self, step: int, lr: float, tokens: int, epoch: float, elapsed: float) -> dict:
        n = max(self.sums["steps"], 1.0)
        rec = {"kind": "train", "step": step, "tokens": tokens, "epoch": round(epoch, 4),
               "loss": self.sums["loss"] / n, "ce": self.sums["ce"] / n,
               "balance": {k: self.sums[k] / n for k in ("expert", "device", "comm")},
               "lr": lr, "grad_norm": self.sums["grad_norm"] / n,
               "tokens_per_s": round(self.sums["tokens"] / max(self.sums["seconds"], 1e-9), 1),
               "elapsed_s": round(elapsed, 1)}
        if self.stats.counts:
            rec["moe"] = self.stats.summary()
        return rec


def train(tc: TrainConfig, run_dir: str, resume: bool = False, progress: bool = True,
          resume_step: int | None = None) -> dict:
    """Train (or with resume=True continue) the run in `run_dir`; returns the final summary. resume_step: continue
    from that checkpoint rather than the newest (implies resume)."""
    if tc.threads:
        torch.set_num_threads(tc.threads)
    manifest = read_manifest(tc.data)
    state, resume = None, resume or resume_step is not None
    if resume:
        if not os.path.isfile(os.path.join(run_dir, TRAIN_CONFIG)):
            raise FileNotFoundError(f"--resume: {run_dir} is not a run directory (no {TRAIN_CONFIG})")
        # before anything is written: a run whose checkpoints are all damaged fails here, untouched
        state = load_latest(run_dir, resume_step)
        cfg = ModelConfig.from_pretrained(run_dir)
        tc.save(run_dir)  # the settings this continuation runs with
    else:
        cfg = model_config_for(tc, manifest)
        _init_run_dir(tc, cfg, run_dir, manifest)
    if cfg.vocab_size < manifest["tokenizer"]["vocab_size"]:
        raise ValueError(f"the model's vocab_size {cfg.vocab_size} is smaller than the data's tokenizer "
                         f"({manifest['tokenizer']['vocab_size']}); the data in {tc.data} is for another tokenizer")

    device = torch.device(tc.device)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    model = build_model(cfg, device=device, init=False)
    model.init_weights(tc.init_std)
    model.gradient_checkpointing = tc.grad_checkpointing
    model.train()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    opt = build_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps, tc.decay_embeddings,
                          tc.decay_router)
    coef = BalanceCoefficients(cfg.aux_loss_alpha if tc.aux_expert is None else tc.aux_expert,
                               tc.aux_device, tc.aux_comm)

    batches = TrainBatches(TokenShards(tc.data, "train"), tc.seq_len, tc.seed)
    val = TokenShards(tc.data, "validation")
    val = val if val.tokens > tc.seq_len else None
    step, elapsed, wall, interval = 0, 0.0, 0.0, _Interval()  # elapsed: training steps only; wall: everything
    if state is not None:
        state, path = state
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed, wall = state["step"], state["elapsed_s"], state.get("wall_s", state["elapsed_s"])
        interval.sums = dict(state["interval"]["sums"])
        interval.stats.load_state_dict(state["interval"]["stats"])
        set_rng_state(state["rng"])
        aside = set_aside_after(run_dir, step)
        print(f"resuming {run_dir} from {os.path.basename(path)} (step {step}/{tc.steps})"
              + (f"; what was recorded after step {step} moved to {aside}" if aside else ""), file=sys.stderr)
    elif resume:
        aside = set_aside_after(run_dir, 0)
        print(f"no checkpoint in {run_dir} yet: starting from step 0"
              + (f"; the records logged so far moved to {aside}" if aside else ""), file=sys.stderr)
    if step == 0:
        counts = cfg.param_counts()
        print(f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['activated'] / 1e6:.2f}M per token); "
              f"data: {batches.shards.tokens:,} training tokens in {batches.windows:,} windows of {tc.seq_len}; "
              f"{tc.tokens_per_step:,} tokens per step", file=sys.stderr)

    stop: list[int] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):  # finish the step, save, exit
            handlers[sig] = signal.signal(sig, lambda signum, frame: stop.append(signum))

    def checkpoint() -> None:
        save_checkpoint(run_dir, step, {
            "format": "dsv2-train-checkpoint", "version": 1, "step": step, "elapsed_s": elapsed, "wall_s": wall,
            "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(),
            "data": {"seed": tc.seed, "samples": step * tc.grad_accum * tc.batch_size,
                     "epoch": batches.epoch_of(step * tc.grad_accum * tc.batch_size)},
            "interval": {"sums": interval.sums, "stats": interval.stats.state_dict()},
        }, tc.keep_checkpoints)

    bar = Progress(tc.steps * tc.tokens_per_step, "train", unit="tok", enabled=progress)
    bar.total -= step * tc.tokens_per_step
    last_val = None
    try:
        while step < tc.steps and not stop:
            t0 = time.perf_counter()
            lr = lr_at(step, tc.steps, tc.lr, tc.warmup_steps, tc.schedule, tc.decay_points, tc.decay_factor,
                       tc.min_lr_ratio)
            out = train_step(model, opt, moes, batches, tc, coef, cfg, step, lr, interval.stats, device)
            step += 1
            dt = time.perf_counter() - t0
            elapsed += dt
            s = interval.sums
            for k in ("loss", "ce", "expert", "device", "comm", "grad_norm"):
                s[k] += out[k]
            s["steps"] += 1
            s["seconds"] += dt
            s["tokens"] += tc.tokens_per_step
            if step % tc.log_every == 0 or step == tc.steps:
                samples = step * tc.grad_accum * tc.batch_size
                rec = interval.record(step, lr, step * tc.tokens_per_step, batches.epoch_of(samples), elapsed)
                append_metrics(run_dir, rec)
                bar.update(int(s["steps"]) * tc.tokens_per_step,
                           postfix=f"step {step}/{tc.steps} loss {rec['loss']:.3f} lr {lr:.2e}"
                                   + (f" val {last_val:.3f}" if last_val is not None else ""))
                interval = _Interval()
            if val is not None and (step % tc.eval_every == 0 or step == tc.steps):
                ev = evaluate(model, val, tc.seq_len, tc.batch_size, limit=tc.eval_batches * tc.batch_size,
                              bf16=tc.bf16)
                last_val = ev["loss"]
                append_metrics(run_dir, {"kind": "eval", "step": step, "tokens": step * tc.tokens_per_step,
                                         "val_loss": ev["loss"], "val_tokens": ev["tokens"]})
            wall += time.perf_counter() - t0
            if step % tc.save_every == 0 or step == tc.steps or stop:
                checkpoint()
    except FloatingPointError as e:  # an exact resume from the newest checkpoint would diverge again, just as here
        saved = [s for s, _ in list_checkpoints(run_dir)]
        lower = f"--lr {tc.lr / 2:g}"
        if saved:
            back = saved[-2] if len(saved) > 1 else saved[-1]
            how = (f"Go back to a checkpoint from before the loss rose (metrics.jsonl or `dsv2 plot` shows when) "
                   f"and continue with a lower learning rate, e.g.\n"
                   f"    dsv2 train --resume --out {run_dir} --resume-step {back} {lower}\n"
                   f"(checkpoints at steps {', '.join(map(str, saved))}; what was recorded after the step you "
                   f"choose is moved to {os.path.join(run_dir, 'superseded')}).")
        else:
            how = (f"No checkpoint was written yet: start again with a lower learning rate,\n"
                   f"    dsv2 train --resume --out {run_dir} {lower}")
        raise FloatingPointError(f"{e}: training diverged, and resuming as it is would repeat this exactly. {how}\n"
                                 "A longer --warmup-steps also helps when it happens early.") from None
    finally:
        bar.close()
        for sig, h in handlers.items():
            signal.signal(sig, h)
    if stop:
        print(f"stopped at step {step}; continue with `dsv2 train --resume --out {run_dir}`", file=sys.stderr)
        return {"step": step, "stopped": True}

    summary = {"step": step, "tokens": step * tc.tokens_per_step, "elapsed_s": round(elapsed, 1),
               "wall_s": round(wall, 1),
               "tokens_per_s": round(step * tc.tokens_per_step / max(elapsed, 1e-9), 1)}
    if val is not None and tc.final_eval:
        ev = evaluate(model, val, tc.seq_len, tc.batch_size, bf16=tc.bf16,
                      progress=Progress(val.tokens, "held-out eval", unit="tok", enabled=progress))
        summary.update(val_loss=ev["loss"], val_bits_per_byte=ev["bits_per_byte"], val_tokens=ev["tokens"],
                       val_bytes=ev["bytes"])
        append_metrics(run_dir, {"kind": "final", **summary})
    return summary


def train_step(model, opt, moes, batches, tc: TrainConfig, coef, cfg, step: int, lr: float, stats: LoadStats,
                device) -> dict:
    """One optimizer step (step is 0-based); `batches.get(first_sample, batch_size)` supplies the data.
    Returns the step's mean loss, cross-entropy, weighted balance losses and pre-clip gradient norm."""
    opt.zero_grad(set_to_none=True)
    out = dict.fromkeys(("loss", "ce", "expert", "device", "comm"), 0.0)
    for micro in range(tc.grad_accum):
        x, y = batches.get((step * tc.grad_accum + micro) * tc.batch_size, tc.batch_size)
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)  # [B, T]
        drop = None
        if tc.capacity_factor is not None and moes:
            # ~no_drop_fraction of sequences are never dropped (paper 2.2.4); drawn from (seed, step, micro)
            rng = np.random.default_rng([tc.seed, step, micro, 1])
            exempt = torch.from_numpy(rng.random(tc.batch_size) < tc.no_drop_fraction).to(device)
            drop = TokenDropping(tc.capacity_factor, exempt)
        router_out = {} if moes else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.bf16):
            logits = model(x, router_out=router_out, drop=drop)  # [B, T, V] fp32
        ce = cross_entropy(logits, y)
        loss = ce
        if moes:
            if coef.any:
                aux, parts = balance_loss(router_out, tc.batch_size, cfg.num_groups, cfg.groups_per_token, coef)
                loss = loss + aux
                for k, v in parts.items():
                    out[k] += v / tc.grad_accum
            stats.add(router_out)
        (loss / tc.grad_accum).backward()
        out["ce"] += ce.item() / tc.grad_accum
        out["loss"] += loss.item() / tc.grad_accum
        del logits, router_out
    if not math.isfinite(out["loss"]):
        raise FloatingPointError(f"the loss is {out['loss']} at step {step + 1}")  # train() says what to do
    out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    return out
