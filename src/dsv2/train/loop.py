"""The pretraining loop: `train(TrainConfig, run_dir)`.

One optimizer step = grad_accum micro-batches of batch_size windows of seq_len tokens, each: forward (optionally
under bf16 autocast and with activation checkpointing) -> cross-entropy + balance losses -> backward; then the
global gradient norm is clipped, the scheduled learning rate set, and AdamW steps.

Everything a step depends on is either a function of (seed, step) -- the batch, the sequences exempt from token
dropping -- or saved in the checkpoint (weights, optimizer moments, RNG states, the logging interval's running
sums), so on CPU a run killed at any moment and resumed logs bit-identical losses to an uninterrupted one.

Data parallel (`world`, parallel/data_parallel.py; launched by torchrun): batch_size stays the global batch and rank
r computes on its contiguous part [r B/N, (r+1) B/N) of every micro-batch, on an FSDP-sharded model. The per-rank
means of the losses (cross-entropy over equal token counts, balance losses per sequence) average to the global
batch's, and the expert-load counts add up, with one all-reduce per step; so the logged losses, gradient norms and
loads are the one-process run's up to the order of the sums. Only rank 0 writes metrics.jsonl and prints.
Token dropping is the exception: capacity is computed over the tokens a forward sees, and a rank sees its part, so
it is per device, as in the paper (section 2.2.4). A DP=N run with --capacity-factor therefore drops differently
from one process with the same global batch (which ranks the whole batch; a smaller part fluctuates more, so more
is dropped); it drops as one process with batch B/N and N times the grad_accum would, except that the sequences
exempt from dropping are drawn for the global batch. Without dropping the runs are equal.

Expert parallel (`tc.expert_parallel` = K > 1, parallel/expert_parallel.py): the same, with each MoE layer's routed
experts split over groups of K ranks and tokens dispatched to them by all-to-all; the balance losses' devices are
those K ranks, capacity is per rank over the group's tokens, and each record logs the all-to-all bytes per step and
the fraction of tokens that crossed ranks.
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
from ..parallel.data_parallel import RouterLog, World, apply_fsdp, check_batch, clip_grad_norm_
from ..parallel.expert_parallel import (ExpertParallel, apply_expert_parallel, check_expert_parallel,
                                        clip_grad_norm_ as clip_expert_parallel_grad_norm_, expert_parallel_group,
                                        reduce_expert_grads)
from .allocator import keep_freed_memory
from .checkpointing import (append_metrics, checkpoint_path, list_checkpoints, load_latest, prune_checkpoints,
                            rng_state, save_checkpoint, set_aside_after, set_rng_state)
from .data import TokenShards, TrainBatches, file_sha256, read_manifest
from .evaluate import evaluate
from .losses import BalanceCoefficients, LoadStats, balance_loss
from .optim import build_optimizer, lr_at
from .presets import PRESETS, preset_config
from .sharded_checkpoint import load_full, load_sharded, save_sharded
from .train_config import RUN_KINDS, TRAIN_CONFIG, TrainConfig

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


def _check_new_run_dir(run_dir: str) -> None:
    if os.path.exists(os.path.join(run_dir, TRAIN_CONFIG)):
        raise ValueError(f"{run_dir} already holds a run; continue it with --resume, or choose another --out")


def _init_run_dir(tc: TrainConfig, cfg: ModelConfig, run_dir: str, manifest: dict) -> None:
    _check_new_run_dir(run_dir)
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


def init_finetune_run_dir(settings, run_dir: str, model_dir: str) -> None:
    """A new fine-tuning run (dsv2 sft / grpo) from the model in `model_dir`: refuses a directory that holds any
    run, then writes the run's settings, the model's config and its tokenizer files (what `dsv2 export` copies)."""
    for name in RUN_KINDS:
        if os.path.exists(os.path.join(run_dir, name)):
            raise ValueError(f"{run_dir} already holds a run; continue it with --resume, or choose another --out")
    os.makedirs(os.path.join(run_dir, "tokenizer"), exist_ok=True)
    settings.save(run_dir)
    ModelConfig.from_pretrained(model_dir).save(run_dir)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(model_dir, name)):
            shutil.copyfile(os.path.join(model_dir, name), os.path.join(run_dir, "tokenizer", name))


def catch_stop_signals() -> tuple[list[int], dict]:
    """SIGINT / SIGTERM append to the returned list instead of stopping the process, so the loop finishes its step,
    saves and exits; restore_signals(handlers) puts the previous handlers back. Only the main thread can."""
    stop: list[int] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda signum, frame: stop.append(signum))
    return stop, handlers


def restore_signals(handlers: dict) -> None:
    for sig, h in handlers.items():
        signal.signal(sig, h)


def diverged(e: FloatingPointError, run_dir: str, lr: float, command: str) -> FloatingPointError:
    """The error for a non-finite loss: resuming from the newest checkpoint would diverge again exactly, so it says
    which checkpoint to go back to and with what `command` (dsv2 train, dsv2 sft)."""
    saved = [s for s, _ in list_checkpoints(run_dir)]
    lower = f"--lr {lr / 2:g}"
    if saved:
        back = saved[-2] if len(saved) > 1 else saved[-1]
        how = (f"Go back to a checkpoint from before the loss rose (metrics.jsonl or `dsv2 plot` shows when) "
               f"and continue with a lower learning rate, e.g.\n"
               f"    {command} --resume --out {run_dir} --resume-step {back} {lower}\n"
               f"(checkpoints at steps {', '.join(map(str, saved))}; what was recorded after the step you "
               f"choose is moved to {os.path.join(run_dir, 'superseded')}).")
    else:
        how = (f"No checkpoint was written yet: start again with a lower learning rate,\n"
               f"    {command} --resume --out {run_dir} {lower}")
    return FloatingPointError(f"{e}: training diverged, and resuming as it is would repeat this exactly. {how}\n"
                              "A longer --warmup-steps also helps when it happens early.")


class Interval:
    """Running sums over one logging interval; saved in checkpoints so a resumed interval averages the same."""
    KEYS = ("loss", "ce", "expert", "device", "comm", "grad_norm", "steps", "seconds", "tokens")
    EP_KEYS = ("a2a_bytes", "crossed")  # expert-parallel runs only

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
        if "a2a_bytes" in self.sums:
            rec["expert_parallel"] = {"a2a_bytes_per_step": round(self.sums["a2a_bytes"] / n),
                                      "crossed": round(self.sums["crossed"] / n, 4)}
        if self.stats.counts:
            rec["moe"] = self.stats.summary()
        return rec


def train(tc: TrainConfig, run_dir: str, resume: bool = False, progress: bool = True,
          resume_step: int | None = None, world: World | None = None) -> dict:
    """Train (or with resume=True continue) the run in `run_dir`; returns the final summary. resume_step: continue
    from that checkpoint rather than the newest (implies resume). world: this process's place in a data-parallel
    run (every rank calls train with the same arguments); None for one process."""
    if tc.threads:
        torch.set_num_threads(tc.threads)
    keep_freed_memory()
    main = world is None or world.main  # logs, prints, writes the run directory
    if world is not None:
        check_batch(tc.batch_size, world.size)
    elif tc.expert_parallel > 1:
        raise ValueError(f"--expert-parallel {tc.expert_parallel} splits the experts over processes: launch "
                         f"`torchrun --nproc-per-node {tc.expert_parallel} $(which dsv2) train ...` (or a multiple "
                         "of it), or leave --expert-parallel out to train in one process")
    manifest = read_manifest(tc.data)
    state, resume = None, resume or resume_step is not None
    if resume:
        if not os.path.isfile(os.path.join(run_dir, TRAIN_CONFIG)):
            raise FileNotFoundError(f"--resume: {run_dir} is not a run directory (no {TRAIN_CONFIG})")
        # before anything is written: a run whose checkpoints are all damaged fails here, untouched
        state = load_latest(run_dir, resume_step, world)
        cfg = ModelConfig.from_pretrained(run_dir)
        if main:
            tc.save(run_dir)  # the settings this continuation runs with
    else:
        cfg = model_config_for(tc, manifest)
        if world is not None:  # every rank looks before rank 0 writes
            _check_new_run_dir(run_dir)
            world.barrier()
        if main:
            _init_run_dir(tc, cfg, run_dir, manifest)
    if cfg.vocab_size < manifest["tokenizer"]["vocab_size"]:
        raise ValueError(f"the model's vocab_size {cfg.vocab_size} is smaller than the data's tokenizer "
                         f"({manifest['tokenizer']['vocab_size']}); the data in {tc.data} is for another tokenizer")

    ep: ExpertParallel | None = None
    if tc.expert_parallel > 1:
        check_expert_parallel(cfg, tc.expert_parallel, world.size)  # before anything collective
        ep = expert_parallel_group(world, tc.expert_parallel, cfg)
    device = world.device if world is not None else torch.device(tc.device)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    model = build_model(cfg, device=device, init=False)
    model.init_weights(tc.init_std)  # on every rank the same, the one-process model
    model.gradient_checkpointing = tc.grad_checkpointing
    if ep is not None:
        apply_expert_parallel(model, ep)  # each rank keeps its E/K experts of every layer
    if world is not None:
        apply_fsdp(model, world.mesh, tc.bf16)  # each rank keeps its 1/N of the rest
    model.train()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    opt = build_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps, tc.decay_embeddings,
                          tc.decay_router)
    coef = BalanceCoefficients(cfg.aux_loss_alpha if tc.aux_expert is None else tc.aux_expert,
                               tc.aux_device, tc.aux_comm)

    batches = TrainBatches(TokenShards(tc.data, "train"), tc.seq_len, tc.seed)
    val = TokenShards(tc.data, "validation")
    val = val if val.tokens > tc.seq_len else None
    step, elapsed, wall, interval = 0, 0.0, 0.0, Interval()  # elapsed: training steps only; wall: everything
    if state is not None:
        state, path = state
        if "model" not in state:  # a step-N/ directory: DCP reads the shards each rank needs
            load_sharded(path, model, opt)
        elif world is not None:  # a one-process step-N.pt: every rank keeps its shards of the whole tensors
            load_full(model, opt, state)
        else:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        step, elapsed, wall = state["step"], state["elapsed_s"], state.get("wall_s", state["elapsed_s"])
        interval.sums = dict(state["interval"]["sums"])
        interval.stats.load_state_dict(state["interval"]["stats"])
        set_rng_state(state["rng"])
        aside = set_aside_after(run_dir, step) if main else None
        saved_by, now = state.get("world_size", 1), world.size if world is not None else 1
        if main:
            print(f"resuming {run_dir} from {os.path.basename(path)} (step {step}/{tc.steps})"
                  + (f"; written by {saved_by} process(es), resharded to {now}" if saved_by != now else "")
                  + (f"; what was recorded after step {step} moved to {aside}" if aside else ""), file=sys.stderr)
    elif resume and main:
        aside = set_aside_after(run_dir, 0)
        print(f"no checkpoint in {run_dir} yet: starting from step 0"
              + (f"; the records logged so far moved to {aside}" if aside else ""), file=sys.stderr)
    if step == 0 and main:
        counts = cfg.param_counts()
        print(f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['activated'] / 1e6:.2f}M per token); "
              f"data: {batches.shards.tokens:,} training tokens in {batches.windows:,} windows of {tc.seq_len}; "
              f"{tc.tokens_per_step:,} tokens per step"
              + (f" over {world.size} processes" if world is not None else "")
              + (f"; routed experts split over groups of {ep.size} ranks ({cfg.n_routed_experts // ep.size} per rank, "
                 f"a token reaches at most {ep.reach})" if ep is not None else ""), file=sys.stderr)

    stop, handlers = catch_stop_signals()

    def checkpoint() -> None:
        run = {"format": "dsv2-train-checkpoint", "version": 1, "step": step, "elapsed_s": elapsed, "wall_s": wall}
        rest = {"data": {"seed": tc.seed, "samples": step * tc.grad_accum * tc.batch_size,
                         "epoch": batches.epoch_of(step * tc.grad_accum * tc.batch_size)},
                "interval": {"sums": interval.sums, "stats": interval.stats.state_dict()}}
        if world is None:
            save_checkpoint(run_dir, step, {**run, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                            "rng": rng_state(), **rest}, tc.keep_checkpoints)
            return
        save_sharded(checkpoint_path(run_dir, step, sharded=True), model, opt,
                     {**run, "world_size": world.size, **rest}, rng_state(), world)
        if main:
            prune_checkpoints(run_dir, tc.keep_checkpoints)

    bar = Progress(tc.steps * tc.tokens_per_step, "train", unit="tok", enabled=progress and main)
    bar.total -= step * tc.tokens_per_step
    last_val = None
    stopping = False  # the ranks' agreed answer to `stop`
    eval_batch = tc.batch_size // (world.size if world is not None else 1)
    try:
        while step < tc.steps and not stopping:
            t0 = time.perf_counter()
            lr = lr_at(step, tc.steps, tc.lr, tc.warmup_steps, tc.schedule, tc.decay_points, tc.decay_factor,
                       tc.min_lr_ratio)
            out = train_step(model, opt, moes, batches, tc, coef, cfg, step, lr, interval.stats, device, world, ep)
            step += 1
            dt = time.perf_counter() - t0
            elapsed += dt
            s = interval.sums
            for k in ("loss", "ce", "expert", "device", "comm", "grad_norm"):
                s[k] += out[k]
            s["steps"] += 1
            s["seconds"] += dt
            s["tokens"] += tc.tokens_per_step
            for k in Interval.EP_KEYS:
                if k in out:
                    s[k] = s.get(k, 0.0) + out[k]
            if step % tc.log_every == 0 or step == tc.steps:
                samples = step * tc.grad_accum * tc.batch_size
                rec = interval.record(step, lr, step * tc.tokens_per_step, batches.epoch_of(samples), elapsed)
                if main:
                    append_metrics(run_dir, rec)
                bar.update(int(s["steps"]) * tc.tokens_per_step,
                           postfix=f"step {step}/{tc.steps} loss {rec['loss']:.3f} lr {lr:.2e}"
                                   + (f" val {last_val:.3f}" if last_val is not None else ""))
                interval = Interval()
            if val is not None and (step % tc.eval_every == 0 or step == tc.steps):
                ev = evaluate(model, val, tc.seq_len, eval_batch, limit=tc.eval_batches * tc.batch_size,
                              bf16=tc.bf16, world=world)
                last_val = ev["loss"]
                if main:
                    append_metrics(run_dir, {"kind": "eval", "step": step, "tokens": step * tc.tokens_per_step,
                                             "val_loss": ev["loss"], "val_tokens": ev["tokens"]})
            wall += time.perf_counter() - t0
            stopping = bool(stop) if world is None else bool(world.all_reduce_sum(torch.tensor([len(stop)])))
            if step % tc.save_every == 0 or step == tc.steps or stopping:
                checkpoint()
    except FloatingPointError as e:  # an exact resume from the newest checkpoint would diverge again, just as here
        raise diverged(e, run_dir, tc.lr, "dsv2 train") from None
    finally:
        bar.close()
        restore_signals(handlers)
    if stopping:
        if main:
            print(f"stopped at step {step}; continue with `dsv2 train --resume --out {run_dir}`"
                  + (" (under torchrun, with any number of processes)" if world is not None else ""), file=sys.stderr)
        return {"step": step, "stopped": True}

    summary = {"step": step, "tokens": step * tc.tokens_per_step, "elapsed_s": round(elapsed, 1),
               "wall_s": round(wall, 1),
               "tokens_per_s": round(step * tc.tokens_per_step / max(elapsed, 1e-9), 1)}
    if val is not None and tc.final_eval:
        ev = evaluate(model, val, tc.seq_len, eval_batch, bf16=tc.bf16, world=world,
                      progress=Progress(val.tokens, "held-out eval", unit="tok", enabled=progress and main))
        summary.update(val_loss=ev["loss"], val_bits_per_byte=ev["bits_per_byte"], val_tokens=ev["tokens"],
                       val_bytes=ev["bytes"])
        if main:
            append_metrics(run_dir, {"kind": "final", **summary})
    return summary


def train_step(model, opt, moes, batches, tc: TrainConfig, coef, cfg, step: int, lr: float, stats: LoadStats,
               device, world: World | None = None, ep: ExpertParallel | None = None) -> dict:
    """One optimizer step (step is 0-based); `batches.get(first_sample, batch_size)` supplies the data.
    Returns the step's mean loss, cross-entropy, weighted balance losses and pre-clip gradient norm -- over the
    global batch also with a data-parallel `world`, where this rank computes on its part (collective); with `ep`,
    also the all-to-all bytes of the step over all ranks and the fraction of tokens that crossed ranks."""
    first, B = world.part(tc.batch_size) if world is not None else (0, tc.batch_size)
    # the balance losses' devices: the expert-parallel ranks, or the routing groups standing in for them
    devices, reach = (ep.size, ep.reach) if ep is not None else (cfg.num_groups, cfg.groups_per_token)
    opt.zero_grad(set_to_none=True)
    out = dict.fromkeys(("loss", "ce", "expert", "device", "comm"), 0.0)
    traffic = torch.zeros(3, dtype=torch.float64)  # tokens, tokens that crossed ranks, bytes sent
    step_stats = LoadStats()
    for micro in range(tc.grad_accum):
        x, y = batches.get((step * tc.grad_accum + micro) * tc.batch_size + first, B)
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)  # [B, T]
        drop = None
        if tc.capacity_factor is not None and moes:
            # ~no_drop_fraction of sequences are never dropped (paper 2.2.4); drawn from (seed, step, micro) for
            # the global batch, of which this rank takes its part
            rng = np.random.default_rng([tc.seed, step, micro, 1])
            exempt = rng.random(tc.batch_size)[first:first + B] < tc.no_drop_fraction
            drop = TokenDropping(tc.capacity_factor, torch.from_numpy(exempt).to(device))
        router_out = RouterLog() if moes else None  # see RouterLog: FSDP would copy a plain dict
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.bf16):
            ce = model(x, router_out=router_out, drop=drop, targets=y)  # lm_head and the mean loss fused
        loss = ce
        if moes:
            if coef.any:
                aux, parts = balance_loss(router_out, B, devices, reach, coef)
                loss = loss + aux
                for k, v in parts.items():
                    out[k] += v / tc.grad_accum
            step_stats.add(router_out)
            for r in router_out.values():
                if r.traffic is not None:
                    traffic += torch.tensor([r.traffic.tokens, r.traffic.crossed, r.traffic.bytes], dtype=torch.float64)
        (loss / tc.grad_accum).backward()  # FSDP: the gradient's mean over ranks, reduce-scattered to the shards
        out["ce"] += ce.item() / tc.grad_accum
        out["loss"] += loss.item() / tc.grad_accum
        del router_out
    if world is not None:
        out = _global_step(out, step_stats, world)
    stats.merge(step_stats)
    if not math.isfinite(out["loss"]):
        raise FloatingPointError(f"the loss is {out['loss']} at step {step + 1}")  # train() says what to do
    if ep is not None:
        tokens, crossed, sent = world.all_reduce_sum(traffic).tolist()
        out.update(a2a_bytes=sent, crossed=crossed / max(tokens, 1.0))
        reduce_expert_grads(model, ep)
        out["grad_norm"] = clip_expert_parallel_grad_norm_(model, tc.grad_clip, ep)
    else:
        out["grad_norm"] = clip_grad_norm_(list(model.parameters()), tc.grad_clip)  # the global norm under FSDP
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    return out


def _global_step(out: dict, stats: LoadStats, world: World) -> dict:
    """The global batch's step record from every rank's (one all-reduce): the losses are means over equal parts,
    so they average; the expert loads add up (`stats` is updated in place)."""
    keys, layers = list(out), sorted(stats.counts)
    flat = torch.cat([torch.tensor([out[k] for k in keys], dtype=torch.float64),
                      *(stats.counts[layer] for layer in layers),
                      torch.tensor([stats.assignments[layer] for layer in layers]
                                   + [stats.dropped.get(layer, 0.0) for layer in layers], dtype=torch.float64)])
    flat = world.all_reduce_sum(flat)
    head, counts, tail = flat.split([len(keys), flat.numel() - len(keys) - 2 * len(layers), 2 * len(layers)])
    for layer, c in zip(layers, counts.split([stats.counts[layer].numel() for layer in layers])):
        stats.counts[layer] = c
    for i, layer in enumerate(layers):
        stats.assignments[layer] = float(tail[i])
        if layer in stats.dropped:  # every rank drops, or none does
            stats.dropped[layer] = float(tail[len(layers) + i])
    return {k: float(v) / world.size for k, v in zip(keys, head)}
