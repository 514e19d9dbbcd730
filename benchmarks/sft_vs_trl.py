"""SFT throughput: `dsv2 sft` vs TRL's SFTTrainer (with PEFT for LoRA) on the shipped model (dsv2-tiny-stdlib,
10.4M parameters, which transformers loads), same conversations, seq-len, batch and learning rate, fp32 on CPU.

    pip install trl        # not a dsv2 dependency: into an environment that has dsv2[dev] (transformers, peft)
    python benchmarks/sft_vs_trl.py --threads 1 --rounds 3 --steps 3 \
        --json benchmarks/results/sft_vs_trl.json --markdown benchmarks/results/sft_vs_trl.md

Both sides run in this one process, interleaved: TRL's own loop (SFTTrainer.train) runs, and after every --steps of
its optimizer steps a callback runs as many dsv2 steps -- `train/sft.py sft_step`, the step `dsv2 sft`'s loop runs
(batch building, forward, per-token loss, backward, clipping, AdamW). A machine shared with other work slows both
sides alike within a round; each round's ratio is reported, and their median. The first step of each side is a
warm-up and not counted.

tokens/s counts the real tokens (no padding) a step trains on. The data: prompt/completion conversations (user asks
for a part of a stdlib module, the assistant answers with its source; 60-450 tokens), loss on the completion only
on both sides. Setups:
  full-packed     every weight but the routers (dsv2's default; TRL trains them too), conversations packed into
                  rows of seq-len: dsv2 into seq-len rows with a block-diagonal mask; TRL's default "bfd" packing is
                  padding-free -- each batch is one flattened sequence whose position_ids restart per conversation
  full-padded     one conversation per row, padded to the batch's longest (dsv2 --no-packing, TRL packing=False)
  lora-attention  LoRA r=16 alpha=32 on q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj (packed)
  lora-experts    the same plus the routed experts (dsv2 `experts`: stacked A/B per expert; PEFT on transformers 5
                  maps gate_proj/up_proj/down_proj to the fused experts, a ParamWrapper per stacked weight) (packed)
  lora-attention-padded   lora-attention without packing
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import sys
import sysconfig
import tempfile
import time

import torch

ATTENTION = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
SETUPS = {
    "full-packed": dict(lora=None, packing=True),
    "full-padded": dict(lora=None, packing=False),
    "lora-attention": dict(lora=ATTENTION, packing=True),
    "lora-experts": dict(lora=ATTENTION + ("experts",), packing=True),
    "lora-attention-padded": dict(lora=ATTENTION, packing=False),
}


def conversations(n: int, seed: int = 0) -> list[dict]:
    """Prompt/completion chats from the stdlib's source: deterministic, 60-450 tokens each with the shipped
    tokenizer."""
    import random
    rng = random.Random(seed)
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    out = []
    while len(out) < n:
        path = rng.choice(files)
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if len(text) < 2000:
            continue
        size = rng.randint(200, 1400)
        at = rng.randrange(0, len(text) - size)
        name = os.path.basename(path)
        out.append({"prompt": [{"role": "user", "content": f"Show me {name} from character {at}."}],
                    "completion": [{"role": "assistant", "content": text[at:at + size]}]})
    return out


class Dsv2Side:
    """What `dsv2 sft` sets up before its loop, then its step."""

    def __init__(self, model_dir: str, data_path: str, setup: dict, args):
        from dsv2 import load_model
        from dsv2.model.moe import Gate, MoE
        from dsv2.tokenizer import Tokenizer
        from dsv2.train.chat_data import SftBatches, load_chat_jsonl
        from dsv2.train.lora import apply_lora
        from dsv2.train.losses import BalanceCoefficients
        from dsv2.train.optim import build_optimizer
        from dsv2.train.sft import SftConfig
        tok = Tokenizer.from_pretrained(model_dir)
        data = load_chat_jsonl(data_path, tok, args.seq_len)
        self.batches = SftBatches(data.conversations, args.seq_len, 0, setup["packing"], tok.pad_token_id)
        lora = setup["lora"]
        self.cfg = SftConfig(data=data_path, model=model_dir, seq_len=args.seq_len, batch_size=args.batch_size,
                             packing=setup["packing"], lora_rank=args.rank if lora else 0, lora_alpha=2.0 * args.rank,
                             lora_targets=lora or ATTENTION, lr=args.lr_lora if lora else args.lr_full)
        torch.manual_seed(0)
        self.model = load_model(model_dir)
        if lora:
            apply_lora(self.model, self.cfg.lora_config())
        else:
            for m in self.model.modules():
                if isinstance(m, Gate):
                    m.weight.requires_grad_(False)
        self.model.train()
        self.moes = [m for m in self.model.modules() if isinstance(m, MoE)]
        self.opt = build_optimizer(self.model, self.cfg.lr, 0.0, (0.9, 0.999))
        self.coef = BalanceCoefficients(0.0)
        self.step = 0
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def run(self, n: int) -> tuple[int, float]:
        from dsv2.train.losses import LoadStats
        from dsv2.train.sft import sft_step
        tokens, seconds = 0, 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            out = sft_step(self.model, self.opt, self.batches, self.cfg, self.step, self.cfg.lr, self.coef,
                           self.moes, LoadStats(), torch.device("cpu"))
            seconds += time.perf_counter() - t0
            tokens += out["tokens"]
            self.step += 1
        return tokens, seconds


def trl_trainer(model_dir: str, rows: list[dict], setup: dict, args, out_dir: str, callback):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    class TimedSFTTrainer(SFTTrainer):
        """Counts each optimizer step's real tokens and times it (training_step .. the optimizer step)."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            if "attention_mask" in inputs and not self.padding_free:
                callback.step_tokens += int(inputs["attention_mask"].sum())
            else:
                callback.step_tokens += int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    lora = setup["lora"]
    peft_config = None
    if lora:
        from peft import LoraConfig
        modules = [t for t in lora if t != "experts"] + (["gate_proj", "up_proj", "down_proj"] if "experts" in lora
                                                         else [])
        peft_config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=modules,
                                 task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = SFTConfig(output_dir=out_dir, max_steps=1 + args.rounds * args.steps, per_device_train_batch_size=args.batch_size,
                       gradient_accumulation_steps=1, learning_rate=args.lr_lora if lora else args.lr_full,
                       lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                       max_length=args.seq_len, packing=setup["packing"], logging_steps=10_000, save_strategy="no",
                       report_to="none", use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
                       completion_only_loss=True)
    trainer = TimedSFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                              processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=peft_config,
                              callbacks=[callback])
    callback.trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return trainer


def make_callback(dsv2: Dsv2Side, args):
    from transformers import TrainerCallback

    class Interleave(TrainerCallback):
        """Times TRL's steps; after step 1 (warm-up, with one dsv2 warm-up step) and then every --steps steps,
        runs as many dsv2 steps. rounds[i] = {trl: (tokens, s), dsv2: (tokens, s)}."""

        def __init__(self):
            self.rounds, self.step_tokens, self.t0, self.trl = [], 0, 0.0, [0, 0.0]
            self.trainable = 0

        def on_step_begin(self, targs, state, control, **kw):
            self.step_tokens, self.t0 = 0, time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            dt = time.perf_counter() - self.t0
            if state.global_step == 1:
                dsv2.run(1)  # warm-up
                return
            self.trl[0] += self.step_tokens
            self.trl[1] += dt
            if (state.global_step - 1) % args.steps == 0:
                d_tokens, d_s = dsv2.run(args.steps)
                self.rounds.append({"trl": tuple(self.trl), "dsv2": (d_tokens, d_s)})
                print(f"  round {len(self.rounds)}: trl {self.trl[0] / self.trl[1]:.0f} tok/s, "
                      f"dsv2 {d_tokens / d_s:.0f} tok/s", file=sys.stderr)
                self.trl = [0, 0.0]

    return Interleave()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, from {', '.join(SETUPS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per side per round")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr-full", type=float, default=2e-5)
    ap.add_argument("--lr-lora", type=float, default=2e-4)
    ap.add_argument("--conversations", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--markdown", metavar="FILE")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    import trl
    from dsv2.assets import default_model_path
    model_dir = default_model_path()
    rows = conversations(args.conversations)
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                           "torch": torch.__version__, "transformers": transformers.__version__,
                           "trl": trl.__version__, "peft": __import__("peft").__version__},
               "settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")}, "setups": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "chats.jsonl")
        with open(data_path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        for name in args.setups.split(","):
            setup = SETUPS[name]
            print(f"{name}:", file=sys.stderr)
            side = Dsv2Side(model_dir, data_path, setup, args)
            cb = make_callback(side, args)
            trainer = trl_trainer(model_dir, rows, setup, args, os.path.join(tmp, name), cb)
            trainer.train()
            ratios = [(d[0] / d[1]) / (t[0] / t[1]) for d, t in ((r["dsv2"], r["trl"]) for r in cb.rounds)]
            results["setups"][name] = {
                "dsv2_tokens_per_s": [round(r["dsv2"][0] / r["dsv2"][1], 1) for r in cb.rounds],
                "trl_tokens_per_s": [round(r["trl"][0] / r["trl"][1], 1) for r in cb.rounds],
                "ratio_per_round": [round(x, 3) for x in ratios], "ratio_median": round(statistics.median(ratios), 3),
                "dsv2_tokens_per_step": round(sum(r["dsv2"][0] for r in cb.rounds) / (args.rounds * args.steps)),
                "trl_tokens_per_step": round(sum(r["trl"][0] for r in cb.rounds) / (args.rounds * args.steps)),
                "trainable_params": {"dsv2": side.trainable, "trl": cb.trainable}}
            del trainer, side
    lines = [f"SFT on dsv2-tiny-stdlib, batch {args.batch_size} x seq-len {args.seq_len}, fp32, "
             f"{args.threads} thread(s), {args.rounds} rounds x {args.steps} steps per side, interleaved "
             f"(torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__})", "",
             "| setup | dsv2 tok/s | TRL tok/s | dsv2 / TRL (median of rounds) | per round | trainable (dsv2 / TRL) |",
             "|---|---|---|---|---|---|"]
    for name, r in results["setups"].items():
        lines.append(f"| {name} | {statistics.median(r['dsv2_tokens_per_s']):.0f} | "
                     f"{statistics.median(r['trl_tokens_per_s']):.0f} | {r['ratio_median']:.2f}x | "
                     f"{', '.join(f'{x:.2f}' for x in r['ratio_per_round'])} | "
                     f"{r['trainable_params']['dsv2'] / 1e6:.2f}M / {r['trainable_params']['trl'] / 1e6:.2f}M |")
    md = "\n".join(lines)
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
