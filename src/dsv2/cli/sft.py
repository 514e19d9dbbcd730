"""`dsv2 sft`: supervised fine-tuning on chat data, in full or with LoRA.

    dsv2 sft --data chats.jsonl --out runs/sft                        # the shipped model, full fine-tuning
    dsv2 sft --model DIR --data chats.jsonl --out runs/lora --lora-rank 16 --lora-targets q_a_proj,kv_b_proj,o_proj
    dsv2 sft --model DIR --data chats.jsonl --out runs/moe --lora-rank 8 --lora-targets experts --train-router
    dsv2 sft --resume --out runs/sft                                  # after a crash, Ctrl-C or kill: exactly
    dsv2 plot runs/sft                                                # loss, LR, tokens/s, expert load
    dsv2 export runs/lora models/merged                               # LoRA merged into the weights (HF layout)
    dsv2 export runs/lora adapters/lora --adapter-only                # PEFT's adapter layout
"""
from __future__ import annotations

import argparse
import json
import sys

from .train import optimizer_args, resumed_settings

_FORMATTER = argparse.RawDescriptionHelpFormatter
_FIELDS = ("data", "model", "val_data", "seq_len", "batch_size", "grad_accum", "steps", "epochs", "lr",
           "warmup_steps", "schedule", "decay_points", "decay_factor", "min_lr_ratio", "weight_decay", "beta1",
           "beta2", "grad_clip", "lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "train_router",
           "aux_expert", "packing", "strict", "bf16", "grad_checkpointing", "log_every", "eval_every", "save_every",
           "keep_checkpoints", "seed", "device", "threads")


def _targets(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def register(sub) -> None:
    from ..train.lora import DEFAULT_TARGETS, TARGETS
    p = sub.add_parser(
        "sft", formatter_class=_FORMATTER, help="supervised fine-tuning on chat data (full or LoRA)",
        description="Fine-tune a DeepSeek-V2 model on conversations, as the paper's SFT stage does: the chats are "
                    "rendered with the model's own chat template and the loss covers the assistant replies only "
                    "(each with its end-of-sentence token), averaged per assistant token over the whole step.\n\n"
                    "Data: JSONL, one conversation a line -- {\"messages\": [{\"role\": \"system\"|\"user\"|"
                    "\"assistant\", \"content\": ...}, ...]} or {\"prompt\": ..., \"completion\": ...}. Lines that "
                    "are not JSON, use another role, have no assistant reply or do not fit in --seq-len are skipped "
                    "and reported by line number (--strict: refused); a reply is never truncated.\n\n"
                    "Advice: LoRA (--lora-rank 16) trains ~1% of the weights and needs a higher --lr (the default "
                    "becomes 2e-4, full fine-tuning 2e-5); packing (the default) fills every row, so a step does "
                    "more work for the same cost. The routers stay frozen unless --train-router. Ctrl-C saves a "
                    "checkpoint; --resume continues exactly; options left out on --resume keep their value.\n\n"
                    + __doc__.split("\n\n", 1)[1])
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the run directory (config, metrics.jsonl, "
                                                                     "checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--resume-step", type=int, metavar="N",
                   help="continue from the checkpoint of step N instead (implies --resume), e.g. from before a loss "
                        "spike with a lower --lr; metrics and checkpoints past N are moved to RUN_DIR/superseded/")
    p.add_argument("--model", help="a Hugging Face DeepSeek-V2 directory with its tokenizer (default: the shipped "
                                   "dsv2-tiny-stdlib); loaded in fp32")
    p.add_argument("--data", metavar="JSONL", help="the training conversations (see above)")
    p.add_argument("--val-data", metavar="JSONL", help="held-out conversations: their loss every --eval-every "
                                                        "steps and at the end")
    p.add_argument("--strict", action="store_const", const=True, help="refuse the data if any line is bad "
                                                                      "(default: skip and report them)")
    p.add_argument("--no-packing", action="store_const", const=False, dest="packing",
                   help="one conversation per row, padded to the micro-batch's longest (default: pack several per "
                        "row, attention and positions reset at each boundary)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, metavar="R", help="train LoRA adapters of rank R instead of every weight "
                                                              "(default 0: full fine-tuning)")
    g.add_argument("--lora-alpha", type=float, help="the update is scaled by alpha / rank (default 2 x rank)")
    g.add_argument("--lora-targets", type=_targets, metavar="NAMES",
                   help=f"comma-separated, from {', '.join(TARGETS)}; `experts` adds a stacked A/B per routed "
                        f"expert (most of an MoE's weights) (default {','.join(DEFAULT_TARGETS)})")
    g.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (default 0)")
    g.add_argument("--train-router", action="store_const", const=True,
                   help="also train the routers (mlp.gate) in full, with the expert-balance loss at the model's "
                        "aux_loss_alpha (default: frozen, in full fine-tuning too)")
    g.add_argument("--aux-expert", type=float, help="expert-balance loss coefficient (default: aux_loss_alpha when "
                                                    "the routers train, else 0)")
    g = p.add_argument_group("batch and length")
    g.add_argument("--seq-len", type=int, help="tokens per row; longer conversations are skipped (default: the "
                                               "model's context, at most 2048)")
    g.add_argument("--batch-size", type=int, help="rows per micro-batch (default 8)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--steps", type=int, help="optimizer steps (default: --epochs over the data)")
    g.add_argument("--epochs", type=float, help="passes over the data when --steps is not given (default 1)")
    g = p.add_argument_group("optimizer and schedule")
    optimizer_args(g, lr="peak learning rate (default 2e-5; with LoRA 2e-4)", warmup=10, schedule="cosine",
                   weight_decay=0.0)
    g = p.add_argument_group("speed, memory and checkpoints")
    g.add_argument("--bf16", action="store_const", const=True, help="bf16 autocast (fp32 weights, optimizer and "
                                                                    "router); faster on GPUs and recent CPUs")
    g.add_argument("--grad-checkpointing", action="store_const", const=True,
                   help="recompute each layer in backward: much less activation memory, ~30%% slower")
    g.add_argument("--device", help="cpu or cuda (default cpu)")
    g.add_argument("--threads", type=int, help="CPU threads (default: torch's choice, one per core)")
    g.add_argument("--log-every", type=int, help="steps per metrics.jsonl record (default 10)")
    g.add_argument("--eval-every", type=int, help="steps between held-out losses with --val-data (default 200)")
    g.add_argument("--save-every", type=int, help="steps between checkpoints (default 200)")
    g.add_argument("--keep-checkpoints", type=int, help="newest checkpoints to keep (default 3)")
    g.add_argument("--seed", type=int, help="seed for the adapters' init and the data order (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_sft)


def run_sft(args) -> int:
    from ..assets import default_model_path
    from ..train.sft import SftConfig, sft
    given = {k: getattr(args, k) for k in _FIELDS if getattr(args, k, None) is not None}
    resume = args.resume or args.resume_step is not None
    if resume:
        cfg = resumed_settings(SftConfig.load(args.out), given)
    else:
        if "data" not in given:
            raise ValueError("--data is required for a new run (a chat JSONL file, see dsv2 sft --help)")
        given.setdefault("model", default_model_path())
        cfg = SftConfig(**given)
    try:
        summary = sft(cfg, args.out, resume=resume, progress=not args.quiet, resume_step=args.resume_step)
    except FloatingPointError as e:  # divergence: the message says which checkpoint to go back to
        print(f"dsv2 sft: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 130 if summary.get("stopped") else 0
