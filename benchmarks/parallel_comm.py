"""Communication of tensor + expert parallel inference: bytes per token per layer, computed from the shapes and
counted on a real run, and how a decode step splits between compute and communication, TP=w against one process.

    python benchmarks/parallel_comm.py /tmp/bench-mini --world 2 [--context 256] [--steps 32] [--dtype auto]
    python benchmarks/parallel_comm.py /tmp/bench-mini --world 2 --out benchmarks/results/tp-comm-mini.json

Every rank runs the engine's scheduler, paged latent cache and runner on the same greedy sequence (gloo on CPU,
--threads cores per rank); torch.distributed's all_reduce / all_gather are wrapped to count bytes and time. The
computed column is what the plan implies: per layer, one all-reduce of the hidden state after attention and one
after the MLP / MoE (routed and shared experts summed together); per token, one for the vocab-parallel embedding
and an all-gather of V / w logits per sampled row. A ring all-reduce of S bytes sends 2 (w-1)/w S per rank.
For comparison it also prints what expert-parallel *training* would move with all-to-all dispatch and combine
(each token's hidden state to its K experts' ranks and back, forward and backward).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class Counter:
    """Wraps torch.distributed collectives: calls, payload bytes and seconds, per phase."""

    def __init__(self):
        self.phase = "load"
        self.stats: dict[str, dict] = {}
        self._all_reduce, self._all_gather = dist.all_reduce, dist.all_gather

        def timed(kind, fn, payload):
            def call(*args, **kwargs):
                t = time.perf_counter()
                out = fn(*args, **kwargs)
                s = self.stats.setdefault(self.phase, {"seconds": 0.0})
                s["seconds"] += time.perf_counter() - t
                s[kind + "_calls"] = s.get(kind + "_calls", 0) + 1
                s[kind + "_bytes"] = s.get(kind + "_bytes", 0) + payload(*args)
                return out
            return call

        dist.all_reduce = timed("all_reduce", self._all_reduce, lambda t, *a: t.numel() * t.element_size())
        dist.all_gather = timed("all_gather", self._all_gather, lambda parts, t, *a: t.numel() * t.element_size())


def _rank(rank: int, world: int, store: str, a: dict, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = str(a["threads"])
    torch.set_num_threads(a["threads"])
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    counter = Counter()
    from dsv2.capability import inference_plan
    from dsv2.engine.kv_cache import BlockAllocator
    from dsv2.engine.prepare import load_for_inference
    from dsv2.engine.runner import ModelRunner
    from dsv2.engine.sampling_params import SamplingParams
    from dsv2.engine.scheduler import Scheduler, SchedulerConfig
    from dsv2.engine.sequence import Sequence
    from dsv2.parallel.tensor_parallel import ParallelContext

    plan = inference_plan("cpu", a["dtype"])
    model = load_for_inference(a["model"], plan, ParallelContext.from_group() if world > 1 else None)
    cfg = model.config
    block = 16
    blocks = (a["context"] + a["steps"]) // block + 4
    alloc = BlockAllocator(blocks, block, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=a["context"],
                                      max_model_len=a["context"] + a["steps"] + 1), alloc)
    runner = ModelRunner(model, blocks, block, plan.cache_dtype)
    prompt = torch.randint(2, cfg.vocab_size, (a["context"],), generator=torch.Generator().manual_seed(0)).tolist()
    seq = Sequence(prompt, SamplingParams(max_tokens=a["steps"] + 1))
    sched.add(seq)
    times = {"prefill": 0.0, "decode": 0.0}
    while seq.num_output_tokens < a["steps"] + 1:
        counter.phase = "prefill" if seq.num_output_tokens == 0 else "decode"
        if world > 1:
            dist.barrier()  # steps start together, so one rank's wait for another is not counted as its compute
        t = time.perf_counter()
        batch = sched.schedule()
        logits = runner.run(batch.scheduled)
        seq.append_token(int(logits.sample[0].argmax()))
        sched.postprocess(batch)
        times[counter.phase] += time.perf_counter() - t
    if rank == 0:
        torch.save({"times": times, "comm": counter.stats}, out)
    if world > 1:
        dist.destroy_process_group()


def computed(cfg, world: int, bytes_per_value: int) -> dict:
    """Per token: bytes each rank sends for TP inference (ring all-reduce / all-gather), and EP training traffic."""
    H, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    ring = 2 * (world - 1) / world
    per_layer = 2 * H * bytes_per_value * ring  # attention + MLP/MoE all-reduce
    out = {"tp_bytes_per_token_per_layer": per_layer,
           "tp_bytes_per_token_embedding": H * bytes_per_value * ring,
           "tp_bytes_per_sampled_row_lm_head": V // world * bytes_per_value,  # each rank's logits, gathered
           "tp_bytes_per_token": L * per_layer + H * bytes_per_value * ring}
    if cfg.n_routed_experts:
        moe_layers = sum(cfg.is_moe_layer(i) for i in range(L))
        K = cfg.num_experts_per_tok
        crossing = (world - 1) / world  # with balanced routing, this share of a token's K copies leaves its rank
        # dispatch + combine, forward + backward: 4 transfers of K hidden states per token per MoE layer
        out["ep_training_bytes_per_token_per_moe_layer"] = 4 * K * H * bytes_per_value * crossing
        out["ep_training_bytes_per_token"] = moe_layers * out["ep_training_bytes_per_token_per_moe_layer"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="cores per rank (default 1: 2 ranks on 2 cores)")
    ap.add_argument("--out", default=None)
    a = vars(ap.parse_args())
    import tempfile
    from dsv2.config import ModelConfig
    cfg = ModelConfig.from_pretrained(a["model"])
    from dsv2.capability import inference_plan
    bpv = torch.tensor([], dtype=inference_plan("cpu", a["dtype"]).compute_dtype).element_size()
    result = {"model": a["model"], "dtype": a["dtype"], "context": a["context"], "steps": a["steps"],
              "threads_per_rank": a["threads"], "computed": computed(cfg, a["world"], bpv), "runs": {}}
    for world in (1, a["world"]):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "r0.pt")
            # the same cores in total: one process gets all of them
            run = {**a, "threads": a["threads"] * (a["world"] if world == 1 else 1)}
            mp.spawn(_rank, args=(world, os.path.join(d, "store"), run, out), nprocs=world, join=True)
            result["runs"][world] = torch.load(out)
    tokens = {"prefill": a["context"], "decode": a["steps"]}
    payload = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size * bpv  # all-reduce payload per token, computed
    lines = [f"TP={a['world']} ({a['threads']} thread(s) per rank) vs 1 process ({a['threads'] * a['world']} threads), "
             f"dtype {a['dtype']}, context {a['context']}, "
             f"{a['steps']} decode steps", "",
             "| phase | TP | ms / step | communication ms / step | share | all-reduce payload B / token, counted "
             "(computed) | all-gather B / step |", "|---|---|---|---|---|---|---|"]
    for phase in ("prefill", "decode"):
        steps = 1 if phase == "prefill" else a["steps"]
        for world, run in result["runs"].items():
            ms = run["times"][phase] / steps * 1e3
            c = run["comm"].get(phase, {"seconds": 0.0})
            comm_ms = c["seconds"] / steps * 1e3
            counted = c.get("all_reduce_bytes", 0) / tokens[phase]
            lines.append(f"| {phase} | {world} | {ms:.1f} | {comm_ms:.1f} | {100 * comm_ms / ms:.0f}% | "
                         + (f"{counted:,.0f} ({payload:,})" if world > 1 else "-") + " | "
                         + (f"{c.get('all_gather_bytes', 0) / steps:,.0f}" if world > 1 else "-") + " |")
    comp = result["computed"]
    lines += ["", f"Computed per token: per layer an all-reduce payload of {2 * cfg.hidden_size * bpv:,} B "
                  f"(attention + MLP/MoE; a ring at w={a['world']} sends {comp['tp_bytes_per_token_per_layer']:,.0f} B "
                  f"per rank), {comp['tp_bytes_per_token']:,.0f} B sent per rank over all layers and the embedding; "
                  f"lm_head all-gathers {comp['tp_bytes_per_sampled_row_lm_head']:,} B of logits per rank per sampled row"
                  + (f"; EP training all-to-all would move {comp['ep_training_bytes_per_token_per_moe_layer']:,.0f} "
                     f"B per token per MoE layer (dispatch + combine, forward + backward, balanced routing)"
                     if "ep_training_bytes_per_token" in comp else "") + "."]
    print("\n".join(lines))
    if a["out"]:
        with open(a["out"], "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    sys.exit(main())
