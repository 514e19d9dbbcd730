"""Throughput measurement behind `dsv2 bench`: B concurrent random prompts of C tokens, then N greedy tokens each.

Prefill time runs from submitting the batch until every sequence has its first token; decode time covers the
remaining N-1 tokens of every sequence. Both rates are aggregate over the batch, as hf_bench.py and
llama_cpp_bench.py in ../shared/bench report them.
"""
from __future__ import annotations

import resource
import time

import numpy as np
import torch

from ..capability import cpu_capability
from ..model.moe import ExpertGroup
from .llm import LLM
from .sampling_params import SamplingParams


def run_benchmark(llm: LLM, batch: int, context: int, new: int, repeat: int = 1, seed: int = 0) -> dict:
    if new < 2:
        raise ValueError("--new must be at least 2 (the first token comes from prefill)")
    if context + new > llm.max_model_len:
        raise ValueError(f"context {context} + new {new} exceeds max_model_len {llm.max_model_len}")
    vocab = llm.config.vocab_size
    greedy = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    llm.generate([list(range(2, 18))], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm-up
    best = None
    for r in range(repeat):
        rng = np.random.default_rng(seed + r)  # fresh prompts each round: no prefix-cache hits
        prompts = rng.integers(2, vocab, (batch, context)).tolist()
        ids = [llm.add_request(p, greedy) for p in prompts]
        started, done = set(), set()
        t0 = time.perf_counter()
        t_prefill = None
        while len(done) < batch:
            for out in llm.step():
                if out.request_id in ids:
                    if out.outputs[0].token_ids:
                        started.add(out.request_id)
                    if out.finished:
                        done.add(out.request_id)
            if t_prefill is None and len(started) == batch:
                t_prefill = time.perf_counter()
        t_end = time.perf_counter()
        prefill = batch * context / (t_prefill - t0)
        decode = batch * (new - 1) / (t_end - t_prefill)
        if best is None or decode > best[1]:
            best = (prefill, decode)
    return {
        "batch": batch, "context": context, "new": new, "dtype": str(llm.dtype).removeprefix("torch."),
        "quantization": llm.quantization, "compute_dtype": str(llm.plan.compute_dtype).removeprefix("torch."),
        "weights": llm.plan.weights,
        "device": str(llm.device),
        "system": {"plan": llm.plan.as_dict(),
                   **({"cpu": cpu_capability().as_dict()} if llm.device.type == "cpu" else {})},
        "prefill_tokens_per_s": best[0], "decode_tokens_per_s": best[1],
        "decode_compiled": llm.runner.compiled is not None,
        "kv_cache_dtype": llm.kv_cache_dtype, "kv_cache_bytes_per_token": llm.kv_cache_bytes_per_token,  # as stored
        # every rank of a tensor-parallel group keeps a whole copy of the latent cache (it cannot be split by heads)
        "tensor_parallel_size": llm.tensor_parallel_size, "kv_cache_bytes_per_rank": llm.kv_cache_bytes,
        "kv_cache_bytes_all_ranks": llm.kv_cache_bytes * llm.tensor_parallel_size,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # rank 0's process
        **weight_bytes(llm.model),
    }


def weight_bytes(model) -> dict:
    """Bytes of the weights as stored (this process's part under tensor parallelism), and how many of them one
    decode step reads per token: the bandwidth roof of single-sequence decode is read bandwidth / the latter.
    A decode step reads every matrix but the embedding (a row lookup), reads W_UK / W_UV^T instead of kv_b_proj
    (absorbed attention; prefill uses kv_b_proj), reads num_experts_per_tok of the n_routed_experts routed experts
    of each MoE layer, and reads int8's kernel scales instead of the fp32 ones."""
    cfg = model.config
    embedding = model.model.embed_tokens.weight
    unread = {id(embedding)} if embedding is not getattr(model.lm_head, "weight", None) else set()
    unread |= {id(m.kv_b_proj.weight) for m in model.modules() if hasattr(m, "w_uk")}  # absorbed decode
    total = active = 0
    seen: set[int] = set()
    routed_modules = {id(m) for group in model.modules() if isinstance(group, ExpertGroup) for m in group.modules()}
    for module in model.modules():
        tensors = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        for name, value in vars(module).items():  # prepacked weights (model/packed.py) are plain attributes
            if not name.startswith("_"):
                tensors.update((f"{name}.{i}", t) for i, t in enumerate(_tensors(value)))
        routed = cfg.num_experts_per_tok / cfg.n_routed_experts if id(module) in routed_modules else 1.0
        for name, t in tensors.items():
            key = id(t) if t.is_mkldnn else t.data_ptr()
            if key in seen:
                continue
            seen.add(key)
            size = t.numel() * t.element_size()
            total += size
            if id(t) in unread or (name.endswith("_scale") and name[:-6] + "_kernel_scale" in tensors):
                continue
            active += size * routed
    return {"weight_bytes": total, "decode_weight_bytes_per_token": int(active)}


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []
