"""`dsv2 grpo`: reinforcement learning with GRPO (DeepSeekMath's objective, DeepSeek-V2's RL stage).

    dsv2 grpo --prompts train.jsonl --reward exact_match --out runs/grpo --steps 200 --lr 1e-5
    dsv2 grpo --model DIR --prompts code.jsonl --reward python_asserts --out runs/code --max-tokens 128
    dsv2 grpo --prompts p.jsonl --reward my_rewards.py:score --out runs/mine --loss-normalization dapo
    dsv2 grpo --resume --out runs/grpo                     # after a crash, Ctrl-C or kill: continues exactly
    dsv2 grpo --evaluate --model models/grpo --prompts held_out.jsonl --reward exact_match   # greedy, mean reward
    dsv2 export runs/grpo models/grpo                      # the policy as a Hugging Face model
"""
from __future__ import annotations

import argparse
import json

from .train import resumed_settings

_FIELDS = ("prompts", "reward", "model", "steps", "batch_size", "group_size", "max_tokens", "temperature", "stop",
           "lr", "warmup_steps", "weight_decay", "grad_clip", "beta", "epsilon", "epsilon_high", "loss_normalization",
           "updates_per_rollout", "replay_routing", "skip_zero_spread", "micro_batch", "bf16", "grad_checkpointing",
           "lora_rank", "lora_alpha", "lora_targets", "save_every", "keep_checkpoints", "seed", "device", "threads")


def register(sub) -> None:
    from ..train.grpo_config import NORMALIZATIONS
    p = sub.add_parser(
        "grpo", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="reinforcement learning with GRPO: sample groups, reward them, push up what beat its group",
        description=(
            "GRPO as DeepSeekMath defines it and DeepSeek-V2 used it: for each prompt, --group-size samples from "
            "the current policy (dsv2's own engine, in this process, on the weights being trained); each is "
            "scored by --reward; its advantage is how much better it did than its group, (r - mean) / (std + "
            "eps); every token of it is pushed by the clipped ratio objective (--epsilon), with a KL penalty to "
            "the starting model (--beta, k3 estimator). No value network.\n\n"
            "Prompts: JSONL lines {\"prompt\": \"...\"} (raw completion) or {\"messages\": [...]} (rendered with "
            "the model's chat template), plus any fields the reward reads, e.g. {\"prompt\": \"2+3=\", "
            "\"answer\": \"5\"}.\n\n"
            "Rewards: exact_match (reads \"answer\"; compares the completion's last \\boxed{...} or first line, "
            "numerically when both are numbers), python_asserts (reads \"tests\", a list of asserts; runs the "
            "completion's code -- its ```python block, or prompt + completion for raw prompts -- in a sandboxed "
            "subprocess with time and memory limits; reward = fraction passed), or your own function "
            "(prompt, completion, **fields) -> float as FILE.py:FUNCTION or module:function.\n\n"
            "Advice: a reward is only a signal if some samples of a group succeed and some fail; check the "
            "zero_spread fraction in metrics.jsonl (1.0 = nothing to learn from: make the task easier or the "
            "group bigger). Small models take --lr 1e-5 to 1e-4; watch the KL and the reward curve "
            "(dsv2 grpo --plot RUN). Ctrl-C saves a checkpoint; --resume continues exactly; `dsv2 export RUN OUT` "
            "writes the policy as a Hugging Face model."))
    p.add_argument("--out", metavar="RUN_DIR", help="the run directory (config, metrics.jsonl, checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--resume-step", type=int, metavar="N", help="continue from the checkpoint of step N (implies "
                                                                "--resume); later records move to RUN/superseded/")
    p.add_argument("--model", help="the starting policy (and the KL reference): a Hugging Face DeepSeek-V2 "
                                   "directory (default: the model shipped with dsv2)")
    p.add_argument("--prompts", metavar="JSONL", help="the training prompts (see above)")
    p.add_argument("--reward", metavar="REWARD", help="exact_match, python_asserts, FILE.py:FUNCTION or "
                                                      "module:function")
    p.add_argument("--evaluate", action="store_true",
                   help="score --model on --prompts and exit: one greedy completion per prompt, the mean reward "
                        "and the fraction solved (reward 1) as JSON -- e.g. on held-out prompts before and after")
    p.add_argument("--plot", metavar="RUN_DIR", help="write RUN_DIR/plots/reward.png (reward, KL, completion "
                                                     "length per step) and exit; needs matplotlib")
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, help="rollouts, each followed by its updates (default 100)")
    g.add_argument("--batch-size", type=int, help="prompts per step (default 8)")
    g.add_argument("--group-size", type=int, help="samples per prompt, G (default 8; DeepSeekMath 64)")
    g.add_argument("--max-tokens", type=int, help="new tokens per sample (default 256)")
    g.add_argument("--temperature", type=float, help="sampling temperature, > 0 (default 1.0); the loss uses the "
                                                     "log-probs of this distribution (logits / temperature)")
    g.add_argument("--stop", action="append", metavar="TEXT", help="end a sample at this text (repeatable), "
                                                                   "besides the end-of-sentence token")
    g = p.add_argument_group("objective")
    g.add_argument("--beta", type=float, help="KL coefficient to the starting model (default 0.04, DeepSeekMath; "
                                              "0 drops the reference model and its forward)")
    g.add_argument("--epsilon", type=float, help="ratio clip: 1 - epsilon .. 1 + epsilon (default 0.2)")
    g.add_argument("--epsilon-high", type=float, help="a separate upper clip (DAPO's clip-higher uses 0.28; "
                                                      "default --epsilon)")
    g.add_argument("--loss-normalization", choices=tuple(NORMALIZATIONS),
                   help="how token losses add up to the step's loss (default grpo): "
                        + "; ".join(f"{k}: {v}" for k, v in NORMALIZATIONS.items()))
    g.add_argument("--updates-per-rollout", type=int,
                   help="optimizer updates on each rollout (DeepSeekMath's mu, TRL's num_iterations; default 1: "
                        "ratio 1, the clip never binds). Above 1 the old policy's log-probs come from a no-grad "
                        "forward before the first update")
    g.add_argument("--replay-routing", action="store_const", const=True,
                   help="with --updates-per-rollout > 1: every update runs the experts the old policy's forward "
                        "chose for each token (the router still sets their weights and is trained), so the ratio "
                        "compares the same experts")
    g.add_argument("--skip-zero-spread", action="store_const", const=True,
                   help="leave out groups whose samples all got the same reward (advantage 0: only the KL term "
                        "would act on them)")
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, help="AdamW learning rate, constant after warm-up (default 1e-6, "
                                            "DeepSeekMath; tiny models take 1e-5 .. 1e-4)")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up, in steps (default 0)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0)")
    g.add_argument("--grad-clip", type=float, help="global gradient-norm clip (default 1.0)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, metavar="R",
                   help="train LoRA adapters of rank R instead of every weight (8-64 is usual); the engine samples "
                        "through them, checkpoints hold the adapters, and `dsv2 export` writes the merged model")
    g.add_argument("--lora-alpha", type=float, help="the update's scale is alpha / rank (default 2 x rank)")
    g.add_argument("--lora-targets", type=lambda s: tuple(t.strip() for t in s.split(",") if t.strip()),
                   metavar="NAMES", help="comma-separated module names (default: q_proj / q_a_proj, q_b_proj, "
                                         "kv_a_proj_with_mqa, o_proj, gate_proj, up_proj, down_proj; add "
                                         "experts for the routed experts). kv_b_proj cannot be adapted here: the "
                                         "engine's absorbed decode reads its weight directly")
    g = p.add_argument_group("speed, memory, run")
    g.add_argument("--micro-batch", type=int, help="sequences per forward/backward (default: the whole step, "
                                                   "batch-size x group-size); the loss is the same either way")
    g.add_argument("--bf16", action="store_const", const=True, help="bf16 autocast in the training forwards "
                                                                    "(fp32 weights; sampling stays fp32)")
    g.add_argument("--grad-checkpointing", action="store_const", const=True,
                   help="recompute each layer in backward: less activation memory, ~30%% slower")
    g.add_argument("--save-every", type=int, help="steps between checkpoints (default 50)")
    g.add_argument("--keep-checkpoints", type=int, help="newest checkpoints to keep (default 3)")
    g.add_argument("--seed", type=int, help="seed for the prompt order and the samples (default 0)")
    g.add_argument("--device", help="cpu or cuda (default cpu)")
    g.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_grpo)


def run_grpo(args) -> int:
    from ..train.grpo import grpo
    from ..train.grpo_config import GRPOConfig
    from ..train.grpo_eval import evaluate_rewards, plot_grpo
    if args.plot:
        for path in plot_grpo(args.plot):
            print(path)
        return 0
    given = {k: getattr(args, k) for k in _FIELDS if getattr(args, k) is not None}
    if "stop" in given:
        given["stop"] = tuple(given["stop"])
    if args.evaluate:
        from ..assets import default_model_path
        for name in ("prompts", "reward"):
            if name not in given:
                raise ValueError(f"--evaluate needs --{name}")
        out = evaluate_rewards(given.get("model") or default_model_path(), given["prompts"], given["reward"],
                               given.get("max_tokens", 256), given.get("stop", ()), progress=not args.quiet)
        print(json.dumps(out))
        return 0
    if not args.out:
        raise ValueError("--out RUN_DIR is required: the directory for the run's config, metrics and checkpoints")
    resume = args.resume or args.resume_step is not None
    if resume:
        cfg = resumed_settings(GRPOConfig.load(args.out), given)
    else:
        missing = [f"--{k}" for k in ("prompts", "reward") if k not in given]
        if missing:
            raise ValueError(f"{' and '.join(missing)} required for a new run (see dsv2 grpo --help)")
        if "model" not in given:
            from ..assets import default_model_path
            given["model"] = default_model_path()
        cfg = GRPOConfig(**given)
    summary = grpo(cfg, args.out, resume=resume, progress=not args.quiet, resume_step=args.resume_step)
    print(json.dumps(summary))
    return 130 if summary.get("stopped") else 0
