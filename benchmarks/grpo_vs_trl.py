"""One GRPO step, dsv2 vs TRL's GRPOTrainer, on the same model and settings, split into rollout and update.

    pip install trl      # not a dsv2 dependency
    python benchmarks/grpo_vs_trl.py --steps 3 --threads 2 --out benchmarks/results/grpo_vs_trl.json

The model dsv2 ships (dsv2-tiny-stdlib; transformers loads the same directory as DeepseekV2ForCausalLM), fp32 on
CPU. One step = 8 prompts x G = 8 samples x exactly 64 new tokens (eos suppressed on both sides, so both generate
the same number of tokens), temperature 1.0, then one update: rewards, group advantages, the reference model's
log-probs (beta 0.04), the GRPO loss (grpo normalization, epsilon 0.2), backward, AdamW. No gradient
checkpointing, no vLLM (TRL's default generation is transformers' generate, with its KV cache).

dsv2: `LLM.from_model` rollouts (paged latent cache, continuous batching) on the policy's own parameters, then
train/grpo.py's `optimize`. TRL: GRPOTrainer.train() for --steps steps; "rollout" is the time inside the model's
generate(), "update" the rest of the step (its reward call, reference and policy forwards, backward, optimizer).
Each side runs in its own process (this script with --only), one after the other; every number is the mean over
the steps after the first (a warm-up). Prints a markdown table; --out also writes JSON (and .md beside it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

PROMPTS = ["subprocess.run(", "self.assertEqual(len(", "return os.path.join(", "parser.add_argument(",
           "result = dict(", "raise ValueError(", "data = struct.pack(", "with open("]


def reward(prompts, completions, **kw):  # TRL's signature; dsv2 calls it per sample
    return [float(sum(ch in "()" for ch in c) % 2 == 0) for c in completions]


def run_dsv2(args) -> dict:
    import torch
    from dsv2 import load_model
    from dsv2.engine.llm import LLM
    from dsv2.engine.sampling_params import SamplingParams
    from dsv2.tokenizer import Tokenizer
    from dsv2.train.grpo import group_advantages, optimize
    from dsv2.train.grpo_config import GRPOConfig
    from dsv2.train.optim import build_optimizer
    torch.set_num_threads(args.threads)
    tok = Tokenizer.from_pretrained(args.model)
    policy, reference = load_model(args.model), load_model(args.model).requires_grad_(False)
    cfg = GRPOConfig(prompts="-", reward="-", model=args.model, batch_size=len(PROMPTS), group_size=args.group,
                     max_tokens=args.tokens, lr=1e-6, beta=0.04)
    opt = build_optimizer(policy, cfg.lr, 0.0, (0.9, 0.99))
    ids = [tok.encode(p) for p in PROMPTS]
    llm = LLM.from_model(policy, tok, max_num_seqs=len(PROMPTS) * args.group,
                         max_model_len=max(map(len, ids)) + args.tokens)
    steps = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        policy.eval()
        outs = llm.generate(prompt_token_ids=ids, sampling_params=[
            SamplingParams(n=args.group, temperature=1.0, max_tokens=args.tokens, ignore_eos=True, seed=step * 100 + i)
            for i in range(len(ids))])
        t1 = time.perf_counter()
        comps = [c for o in outs for c in o.outputs]
        assert all(len(c.token_ids) == args.tokens for c in comps)
        r = torch.tensor(reward(None, [c.text for c in comps])).view(len(ids), args.group)
        adv = group_advantages(r).flatten().tolist()
        policy.train()
        optimize(policy, reference, opt, [p for p in ids for _ in range(args.group)], [c.token_ids for c in comps],
                 adv, cfg, cfg.lr)
        llm.refresh()
        t2 = time.perf_counter()
        steps.append({"rollout_s": t1 - t0, "update_s": t2 - t1, "step_s": t2 - t0})
    return {"steps": steps}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    gen_time = [0.0]
    generate = model.generate

    def timed_generate(*a, **k):
        t = time.perf_counter()
        out = generate(*a, **k)
        gen_time[0] += time.perf_counter() - t
        return out
    model.generate = timed_generate
    steps = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0, gen_time[0] = time.perf_counter(), 0.0

        def on_step_end(self, *a, **k):
            total = time.perf_counter() - self.t0
            steps.append({"rollout_s": gen_time[0], "update_s": total - gen_time[0], "step_s": total})

    n = len(PROMPTS) * args.group
    cfg = GRPOConfig(output_dir=os.path.join(args.tmp, "trl"), per_device_train_batch_size=n,
                     num_generations=args.group, max_completion_length=args.tokens, max_steps=args.steps,
                     temperature=1.0, beta=0.04, epsilon=0.2, loss_type="grpo", learning_rate=1e-6,
                     gradient_checkpointing=False, use_cpu=True, bf16=False, logging_steps=1, save_strategy="no",
                     report_to=[], generation_kwargs={"min_new_tokens": args.tokens}, seed=0,
                     dataloader_num_workers=0)
    data = Dataset.from_dict({"prompt": PROMPTS * args.steps})
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                          callbacks=[Timer()])
    trainer.train()
    return {"steps": steps, "trl": __import__("trl").__version__}


def summarize(name: str, result: dict) -> dict:
    warm = result["steps"][1:] or result["steps"]
    mean = {k: sum(s[k] for s in warm) / len(warm) for k in ("rollout_s", "update_s", "step_s")}
    return {"name": name, **{k: round(v, 3) for k, v in mean.items()}, "steps_measured": len(warm),
            **{k: v for k, v in result.items() if k != "steps"}}


def main() -> None:
    from dsv2.assets import default_model_path
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="steps per side; the first is a warm-up (default 3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--only", choices=("dsv2", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default="/tmp/grpo_vs_trl", help=argparse.SUPPRESS)
    ap.add_argument("--out", help="write the results as JSON here (and a .md beside it)")
    args = ap.parse_args()
    if args.only:
        print(json.dumps((run_dsv2 if args.only == "dsv2" else run_trl)(args)))
        return
    rows = []
    for side in ("dsv2", "trl"):
        cmd = [sys.executable, __file__, "--only", side, "--model", args.model, "--group", str(args.group),
               "--tokens", str(args.tokens), "--steps", str(args.steps), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
        rows.append(summarize(side, json.loads(out.stdout.strip().splitlines()[-1])))
    d, t = rows
    ratios = {k: round(t[k] / d[k], 2) for k in ("rollout_s", "update_s", "step_s")}
    setting = (f"{len(PROMPTS)} prompts x G={args.group} x {args.tokens} new tokens, fp32, {args.threads} threads, "
               f"{platform.processor() or platform.machine()}")
    md = [f"GRPO step ({setting}); seconds, mean of {d['steps_measured']} steps after a warm-up", "",
          "| | rollout (s) | update (s) | step (s) |", "|---|---:|---:|---:|",
          f"| dsv2 | {d['rollout_s']} | {d['update_s']} | {d['step_s']} |",
          f"| TRL {t.get('trl', '')} GRPOTrainer | {t['rollout_s']} | {t['update_s']} | {t['step_s']} |",
          f"| TRL / dsv2 | {ratios['rollout_s']}x | {ratios['update_s']}x | {ratios['step_s']}x |"]
    print("\n".join(md))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"setting": setting, "results": rows, "ratios_trl_over_dsv2": ratios}, f, indent=2)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
