"""Supervised fine-tuning: `sft(SftConfig, run_dir)` -- chat data (train/chat_data.py) on a Hugging Face model,
in full or with LoRA adapters (train/lora.py).

One optimizer step = grad_accum micro-batches of batch_size rows, each row one conversation or several packed
(attention and positions reset at each boundary, model/mla.py PackedSequences). The loss is the cross-entropy of
the assistant tokens, summed over the whole step and divided by the step's count of them, so every assistant token
of the global batch weighs the same whatever row or micro-batch it landed in. Logits are computed only where there
is a target (Transformer.forward's logits_indices): prompts cost no lm_head.

The routers stay frozen unless train_router is set (a fine-tune on little data should not reshuffle which experts
see which tokens); then the expert-balance loss applies with the model's aux_loss_alpha.

The run directory is `dsv2 train`'s (train/checkpointing.py), with sft_config.json for the settings: metrics.jsonl
(`dsv2 plot`), atomic checkpoints, bit-exact --resume (rows are a function of (seed, row), RNG states are saved),
`dsv2 export`. A LoRA run's checkpoints hold only what trains (adapters, routers if unfrozen) and name the base
model, which export and resume read again (refusing it if its files changed).
"""
from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..checkpoint import checkpoint_files, load_model, resolve_model_path
from ..config import ModelConfig
from ..model.moe import Gate, MoE
from ..progress import Progress
from ..tokenizer import Tokenizer
from .allocator import keep_freed_memory
from .chat_data import IGNORE, Batch, SftBatches, load_chat_jsonl
from .checkpointing import (append_metrics, load_latest, rng_state, save_checkpoint, set_aside_after,
                            set_rng_state)
from .lora import DEFAULT_TARGETS, LoraConfig, apply_lora, load_trainable_state_dict, trainable_state_dict
from .loop import Interval, catch_stop_signals, diverged, init_finetune_run_dir, restore_signals
from .losses import BalanceCoefficients, LoadStats, balance_loss
from .optim import build_optimizer, lr_at
from .train_config import RunSettings, check_optimizer_settings, need

SFT_CONFIG = "sft_config.json"
GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class SftConfig(RunSettings):
    data: str  # chat JSONL
    model: str  # a Hugging Face DeepSeek-V2 directory
    val_data: str | None = None  # chat JSONL for a held-out loss
    seq_len: int | None = None  # tokens per row; None: the model's context, at most 2048
    batch_size: int = 8  # rows per micro-batch
    grad_accum: int = 1
    steps: int | None = None  # None: `epochs` passes over the data
    epochs: float = 1.0
    lr: float | None = None  # None: 2e-5 in full, 2e-4 with LoRA
    warmup_steps: int = 10
    schedule: str = "cosine"
    decay_points: tuple[float, ...] = (0.6, 0.9)
    decay_factor: float = 0.316
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float | None = None  # None: 2 x rank
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    lora_dropout: float = 0.0
    train_router: bool = False
    aux_expert: float | None = None  # None: the model's aux_loss_alpha when the routers train, else 0
    packing: bool = True
    strict: bool = False
    bf16: bool = False
    grad_checkpointing: bool = False
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 200
    keep_checkpoints: int = 3
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    base_fingerprint: str | None = None  # of the model's files, recorded when the run starts (LoRA runs)

    FILE = SFT_CONFIG

    def __post_init__(self):
        check_optimizer_settings(self)
        for name in ("batch_size", "grad_accum", "log_every", "save_every", "eval_every", "keep_checkpoints"):
            need(self, getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("seq_len", "steps"):
            need(self, getattr(self, name) is None or getattr(self, name) >= 1, name, "must be >= 1")
        need(self, self.epochs > 0, "epochs", "must be positive")
        need(self, self.lr is None or self.lr > 0, "lr", "must be positive")
        need(self, self.lora_rank >= 0, "lora_rank", "must be >= 0 (0: full fine-tuning)")
        if self.lora_rank:
            self.lora_config()  # names a bad alpha, dropout or target

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0

    def lora_config(self) -> LoraConfig:
        return LoraConfig(self.lora_rank, self.lora_alpha or 2.0 * self.lora_rank, self.lora_targets,
                          self.lora_dropout, self.train_router)


def model_fingerprint(model_dir: str) -> str:
    """config.json's bytes and the weight files' names and sizes: cheap, and enough to notice a different model in
    the same place (hashing a 30 GB model on every resume would not be)."""
    h = hashlib.sha256()
    with open(os.path.join(model_dir, "config.json"), "rb") as f:
        h.update(f.read())
    for name in sorted(set(checkpoint_files(model_dir).values())):
        h.update(f"{os.path.basename(name)}:{os.path.getsize(name)}".encode())
    return h.hexdigest()[:16]


def base_model_dir(cfg: SftConfig) -> str:
    """The run's base model, checked against the fingerprint recorded when the run started."""
    model_dir = resolve_model_path(cfg.model)
    if cfg.base_fingerprint and model_fingerprint(model_dir) != cfg.base_fingerprint:
        raise ValueError(f"the base model {model_dir} changed since this LoRA run started (its config or weight files "
                         "differ): the adapters were trained on other weights. Put the original model back there")
    return model_dir


def load_lora_run_model(run_dir: str, state: dict, device="cpu"):
    """A LoRA run's base model with its checkpoint's adapters (and routers, if they trained) applied."""
    cfg = SftConfig.load(run_dir)
    model = load_model(base_model_dir(cfg), device=device)
    apply_lora(model, LoraConfig(**state["lora_config"]))
    load_trainable_state_dict(model, state["model"])
    return model


def _init_run_dir(cfg: SftConfig, run_dir: str, model_dir: str) -> None:
    init_finetune_run_dir(cfg, run_dir, model_dir)
    if os.path.isfile(os.path.join(model_dir, GENERATION_CONFIG)):  # the base's sampling defaults, for export
        shutil.copyfile(os.path.join(model_dir, GENERATION_CONFIG), os.path.join(run_dir, GENERATION_CONFIG))


def _resolve(cfg: SftConfig, model_cfg: ModelConfig, model_dir: str) -> SftConfig:
    """A new run's defaults that depend on the model (saved resolved, so a resume never recomputes them)."""
    changes = {"model": os.path.abspath(model_dir)}
    if cfg.seq_len is None:
        changes["seq_len"] = min(2048, model_cfg.max_position_embeddings)
    if cfg.lr is None:
        changes["lr"] = 2e-4 if cfg.lora else 2e-5
    if cfg.lora:
        changes["lora_alpha"] = cfg.lora_config().alpha
        changes["base_fingerprint"] = model_fingerprint(model_dir)
    return cfg.replace(**changes)


def sft(cfg: SftConfig, run_dir: str, resume: bool = False, progress: bool = True,
        resume_step: int | None = None) -> dict:
    """Fine-tune (or with resume=True continue) the run in `run_dir`; returns the final summary."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()
    device = torch.device(cfg.device)
    resume = resume or resume_step is not None
    model_dir = base_model_dir(cfg)
    model_cfg = ModelConfig.from_pretrained(model_dir)
    if not resume:
        cfg = _resolve(cfg, model_cfg, model_dir)
    if cfg.seq_len > model_cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's context ({model_cfg.max_position_embeddings} "
                         "positions, max_position_embeddings)")
    if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        raise FileNotFoundError(f"--model {model_dir}: no tokenizer.json; SFT renders the chats with the model's own "
                                "tokenizer and chat template")
    tok = Tokenizer.from_pretrained(model_dir)
    data = load_chat_jsonl(cfg.data, tok, cfg.seq_len, cfg.strict)
    if data.problems:
        print(f"warning: {data.report()}; skipped (--strict makes them an error)", file=sys.stderr)
    pad = tok.pad_token_id if tok.pad_token_id is not None else model_cfg.eos_token_id
    batches = SftBatches(data.conversations, cfg.seq_len, cfg.seed, cfg.packing, pad)
    val = None
    if cfg.val_data:
        val_data = load_chat_jsonl(cfg.val_data, tok, cfg.seq_len, cfg.strict)
        val = SftBatches(val_data.conversations, cfg.seq_len, cfg.seed, cfg.packing, pad, shuffle=False)
    rows_per_step = cfg.batch_size * cfg.grad_accum
    if cfg.steps is None:
        cfg = cfg.replace(steps=batches.steps_for(cfg.epochs, rows_per_step))

    state = None
    if resume:
        if not os.path.isfile(os.path.join(run_dir, SFT_CONFIG)):
            raise FileNotFoundError(f"--resume: {run_dir} is not an SFT run directory (no {SFT_CONFIG})")
        state = load_latest(run_dir, resume_step)  # before anything is written
        cfg.save(run_dir)  # the settings this continuation runs with
    else:
        _init_run_dir(cfg, run_dir, model_dir)

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = load_model(model_dir, device=device)  # fp32: AdamW's updates are far below bf16's resolution
    model.gradient_checkpointing = cfg.grad_checkpointing
    if cfg.lora:
        apply_lora(model, cfg.lora_config())  # adapters drawn from the seeded RNG
    else:
        for m in model.modules():
            if isinstance(m, Gate):
                m.weight.requires_grad_(cfg.train_router)
    model.train()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
    alpha = cfg.aux_expert if cfg.aux_expert is not None else (model_cfg.aux_loss_alpha if cfg.train_router else 0.0)
    coef = BalanceCoefficients(alpha)

    step, elapsed, wall, tokens, interval = 0, 0.0, 0.0, 0, Interval()
    if state is not None:
        state, path = state
        if cfg.lora:
            load_trainable_state_dict(model, state["model"])
        else:
            model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed, wall, tokens = state["step"], state["elapsed_s"], state["wall_s"], state["tokens"]
        interval.sums = dict(state["interval"]["sums"])
        interval.stats.load_state_dict(state["interval"]["stats"])
        set_rng_state(state["rng"])
        aside = set_aside_after(run_dir, step)
        print(f"resuming {run_dir} from {os.path.basename(path)} (step {step}/{cfg.steps})"
              + (f"; what was recorded after step {step} moved to {aside}" if aside else ""), file=sys.stderr)
    elif resume:
        aside = set_aside_after(run_dir, 0)
        print(f"no checkpoint in {run_dir} yet: starting from step 0"
              + (f"; the records logged so far moved to {aside}" if aside else ""), file=sys.stderr)
    if step == 0:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_tokens = sum(len(c.ids) for c in data.conversations)
        print(f"{'LoRA r=' + str(cfg.lora_rank) if cfg.lora else 'full fine-tuning'}: {trained / 1e6:.2f}M of "
              f"{model.num_params() / 1e6:.2f}M parameters train; data: {len(data.conversations):,} conversations, "
              f"{n_tokens:,} tokens in {batches.rows_per_epoch:,} rows of <= {cfg.seq_len}"
              f"{' (packed)' if cfg.packing else ''}; {cfg.steps} steps of {rows_per_step} rows", file=sys.stderr)

    stop, handlers = catch_stop_signals()

    def checkpoint() -> None:
        weights = trainable_state_dict(model) if cfg.lora else model.state_dict()
        save_checkpoint(run_dir, step, {
            "format": "dsv2-sft-checkpoint", "version": 1, "step": step, "elapsed_s": elapsed, "wall_s": wall,
            "tokens": tokens, "model": weights, "optimizer": opt.state_dict(), "rng": rng_state(),
            **({"lora_config": cfg.lora_config().to_dict()} if cfg.lora else {}),
            "interval": {"sums": interval.sums, "stats": interval.stats.state_dict()}}, cfg.keep_checkpoints)

    bar = Progress(cfg.steps - step, "sft", unit="step", enabled=progress)
    last_val = None
    try:
        while step < cfg.steps and not stop:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.decay_points, cfg.decay_factor,
                       cfg.min_lr_ratio)
            out = sft_step(model, opt, batches, cfg, step, lr, coef, moes, interval.stats, device)
            step += 1
            dt = time.perf_counter() - t0
            elapsed += dt
            tokens += out["tokens"]
            s = interval.sums
            for k in ("loss", "ce", "expert", "grad_norm"):
                s[k] += out[k]
            s["steps"] += 1
            s["seconds"] += dt
            s["tokens"] += out["tokens"]
            s["targets"] = s.get("targets", 0.0) + out["targets"]
            if step % cfg.log_every == 0 or step == cfg.steps:
                rec = interval.record(step, lr, tokens, batches.epoch_of(step * rows_per_step), elapsed)
                rec["target_tokens"] = int(s["targets"])
                append_metrics(run_dir, rec)
                bar.update(int(s["steps"]), postfix=f"loss {rec['loss']:.3f} lr {lr:.2e}"
                                                    + (f" val {last_val:.3f}" if last_val is not None else ""))
                interval = Interval()
            if val is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                ev = evaluate_chat(model, val, cfg.batch_size, cfg.bf16, device)
                last_val = ev["loss"]
                append_metrics(run_dir, {"kind": "eval", "step": step, "tokens": tokens, "val_loss": ev["loss"],
                                         "val_tokens": ev["targets"]})
            wall += time.perf_counter() - t0
            if step % cfg.save_every == 0 or step == cfg.steps or stop:
                checkpoint()
    except FloatingPointError as e:
        raise diverged(e, run_dir, cfg.lr, "dsv2 sft") from None
    finally:
        bar.close()
        restore_signals(handlers)
    if stop:
        print(f"stopped at step {step}; continue with `dsv2 sft --resume --out {run_dir}`", file=sys.stderr)
        return {"step": step, "stopped": True}
    summary = {"step": step, "tokens": tokens, "elapsed_s": round(elapsed, 1), "wall_s": round(wall, 1),
               "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1)}
    if last_val is not None:
        summary["val_loss"] = last_val
    return summary


def _loss(model, b: Batch, bf16: bool, device, weight: float, router_out=None) -> torch.Tensor:
    """weight x the summed cross-entropy of the positions that have a target (only those go through lm_head, fused
    with the loss)."""
    flat = b.targets.flatten()
    where = (flat != IGNORE).nonzero().squeeze(-1)
    targets = flat.index_select(0, where)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(b.ids, attn=b.packed, logits_indices=where, router_out=router_out, targets=targets,
                     target_weights=torch.full(targets.shape, weight, device=targets.device))


def sft_step(model, opt, batches: SftBatches, cfg: SftConfig, step: int, lr: float, coef: BalanceCoefficients,
             moes: list, stats: LoadStats, device) -> dict:
    """One optimizer step (0-based `step`): the mean loss per assistant token of the whole step, its parts, the
    pre-clip gradient norm, and the real tokens and targets it trained on."""
    B = cfg.batch_size
    micro = [batches.get((step * cfg.grad_accum + m) * B, B).to(device) for m in range(cfg.grad_accum)]
    n_targets = sum(b.n_targets for b in micro)  # the whole step's: each token weighs 1 / n_targets
    opt.zero_grad(set_to_none=True)
    out = {"loss": 0.0, "ce": 0.0, "expert": 0.0, "tokens": sum(b.tokens for b in micro), "targets": n_targets}
    step_stats = LoadStats()
    for b in micro:
        router_out = {} if moes else None
        ce = _loss(model, b, cfg.bf16, device, 1.0 / max(n_targets, 1), router_out)
        loss = ce
        if moes:
            if coef.any:
                aux, parts = balance_loss(router_out, b.ids.shape[0], model.config.num_groups,
                                          model.config.groups_per_token, coef)
                loss = loss + aux / cfg.grad_accum
                out["expert"] += parts["expert"] / cfg.grad_accum
            step_stats.add(router_out)
        loss.backward()
        out["ce"] += ce.item()
        out["loss"] += loss.item()
        del router_out
    stats.merge(step_stats)
    if not math.isfinite(out["loss"]):
        raise FloatingPointError(f"the loss is {out['loss']} at step {step + 1}")
    params = [p for p in model.parameters() if p.requires_grad]
    out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    return out


@torch.no_grad()
def evaluate_chat(model, batches: SftBatches, batch_size: int, bf16: bool, device) -> dict:
    """Mean cross-entropy per assistant token over every row of `batches` (one pass, in order)."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for first in range(0, batches.rows_per_epoch, batch_size):
        b = batches.get(first, min(batch_size, batches.rows_per_epoch - first)).to(device)
        total += float(_loss(model, b, bf16, device, 1.0))
        n += b.n_targets
    model.train(was)
    return {"loss": total / max(n, 1), "targets": n}
