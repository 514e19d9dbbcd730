"""LLM: the one engine API. Continuous batching over the paged latent cache, with vLLM's names.

    llm = LLM("path/to/DeepSeek-V2-Lite-Chat")                 # or LLM() for the model dsv2 ships
    outs = llm.generate(["def fib(n):"], SamplingParams(temperature=0, max_tokens=64))
    print(outs[0].text)
    for delta in llm.stream("Once upon a time", SamplingParams(max_tokens=50)): print(delta, end="")

Lower level (the server's engine loop): add_request() from any thread, step() in one thread, abort() anywhere.

Training (GRPO, train/grpo.py): LLM.from_model(model, tokenizer) runs a model being trained, in place, sharing its
parameters; llm.refresh() after each optimizer step.

Several devices: LLM(path, tensor_parallel_size=N) splits the model over N processes (engine/workers.py); rank 0,
this process, schedules, samples and detokenizes. `with LLM(...) as llm:` or llm.shutdown() stops the workers
(exit does too).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import threading
import time
from collections.abc import Iterator

import torch

from ..capability import InferencePlan, inference_plan
from ..checkpoint import resolve_model_path
from ..model import MLA, Transformer
from ..progress import Progress
from ..tokenizer import Tokenizer
from ..units import parse_bytes
from .config import EngineConfig
from .kv_cache import BlockAllocator, size_kv_cache
from .outputs import PositionLogprobs, RequestOutput, position_logprobs
from .prepare import load_for_inference
from .quantized_checkpoint import checkpoint_plan
from .request import Completion, Request
from .runner import ModelRunner, measure_activation_bytes
from .sampler import Sampler, TokenLogprobs, make_generator, prompt_logprobs
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence
from .workers import start_workers


class LLM:
    """A DeepSeek-V2 model behind a continuous-batching engine on the paged latent cache.

    path (or vLLM's `model`): a Hugging Face directory or repo id; None = the small model shipped with dsv2.
    dtype: "auto" (default) picks by device and CPU: bf16 weights everywhere, computed in bf16 on CUDA and on CPUs
    with fast bf16 matrix products, in fp32 on the others (AVX2, most ARM) -- `dsv2 info --system` shows the choice.
    "bfloat16", "float16", "float32" mean weights and compute in that dtype. device: "cuda" when present, else "cpu".
    kv_cache_memory: bytes (or "4GiB") for the latent cache; default: after setting one step's activations aside,
    90% of free GPU memory, or on CPU a quarter of the available RAM (at most 8 GiB), and never more than
    max_num_seqs full-length sequences need.
    tensor_parallel_size: split the model over this many processes (heads, MLP widths, experts and vocabulary; see
    parallel/tensor_parallel.py): on CUDA one GPU per rank (cuda:0 .. cuda:N-1, nccl), on CPU N processes sharing
    the cores (gloo). This process is rank 0 and starts the other N-1; every rank keeps a whole copy of the latent
    cache (kv_cache_memory is per rank; the CPU default is shared by the ranks of the host). Under torchrun with
    WORLD_SIZE = N (several hosts), every rank runs the same program: on ranks other than 0, LLM() serves rank 0
    and then exits the process instead of returning.
    enforce_eager: on CUDA, decode-only steps replay CUDA graphs captured per batch-size bucket (at a bucket's
    first use) unless True; CPU and tensor-parallel runs are eager unless compile_decode.
    compile_decode (CPU): decode-only steps run as one torch.compile'd graph (engine/compiled.py): fused operators
    around the matrix kernels, which stay the plan's own (oneDNN-packed, int8, int4, upcast). With plain weights
    (cpu_weight_packing=False, or a plan without packing) a single-sequence step also multiplies by the matrices in
    code the compiler generates -- the fastest single-sequence decode -- while prefill and batched decode are faster
    on packed weights: choose by workload (BENCHMARKS.md). The first decode step of one sequence and the first of
    several each compile (tens of seconds to minutes; warm_up() does both up front). Needs a C++ compiler: without
    one, or with enforce_eager=True, decode stays eager (a notice says why).
    vLLM arguments accepted for compatibility: trust_remote_code (ignored: dsv2 never runs code from a model
    directory), gpu_memory_utilization (a fraction of free GPU memory for the cache), swap_space, tokenizer (a
    directory), seed.
    cpu_weight_packing: reorder bf16 weights into oneDNN's blocked layout (default: wherever oneDNN's bf16 path
    works on this CPU; ~1.7x faster matrix-vector products, results equal to bf16 rounding).
    kv_cache_dtype: "auto" (default) keeps latents in the plan's cache dtype (bf16; fp32 for fp32 models); "fp8"
    stores them in DeepSeek's FP8 layout (e4m3 with a fp32 scale per 128 values, rope part bf16: 656 bytes per
    token and layer instead of 1,152), so the same kv_cache_memory holds ~1.75x the tokens. Decode and prefix hits
    dequantize on the fly; logits move by about e4m3's rounding (benchmarks/fp8_cache.py measures it).
    quantization: None (weights in `dtype`), "int8" (a scale per output row, model/quant.py; half the bf16 bytes) or
    "int4" (groups of 64 with a bf16 scale and zero each, model/int4.py; ~0.28x the bf16 bytes, lm_head int8). Both
    weight-only, applied while the checkpoint streams in (engine/prepare.py), kv_b_proj, the embedding and the norms
    kept in bf16; `dsv2 info --system --quantization int4` says which kernel each matmul gets here.
    """

    def __init__(self, path: str | None = None, *, model: str | None = None, tokenizer: str | None = None,
                 dtype: str | torch.dtype = "auto", device: str | torch.device | None = None,
                 max_num_seqs: int = 256, max_model_len: int | None = None, max_num_batched_tokens: int = 2048,
                 kv_cache_memory: int | str | None = None, block_size: int = 16, kv_cache_dtype: str = "auto",
                 enable_prefix_caching: bool = True, seed: int = 0, tensor_parallel_size: int = 1,
                 trust_remote_code: bool = False, enforce_eager: bool = False,
                 gpu_memory_utilization: float | None = None, swap_space: float | None = None,
                 cpu_weight_packing: bool | None = None, quantization: str | None = None,
                 compile_decode: bool = False, **unknown):
        self.workers = None  # first: shutdown() works whatever fails below
        if unknown:
            raise TypeError(f"LLM() got unknown argument(s) {sorted(unknown)}")
        if path is not None and model is not None and path != model:
            raise ValueError("pass the model once: LLM(path) or LLM(model=path)")
        path = path or model
        if path is None:
            from ..assets import default_model_path
            path = default_model_path()
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        plan = inference_plan(device, dtype, quantization, cpu_weight_packing)
        engine = EngineConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                              max_num_batched_tokens=max(max_num_batched_tokens, block_size),
                              kv_cache_memory=None if kv_cache_memory is None else parse_bytes(kv_cache_memory),
                              gpu_memory_utilization=gpu_memory_utilization, block_size=block_size,
                              kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=enable_prefix_caching, seed=seed)
        directory = resolve_model_path(path)
        plan = checkpoint_plan(directory, plan)  # a `dsv2 quantize` directory: its own format
        self.workers = start_workers(tensor_parallel_size, directory, device)  # None: this process alone
        self.tensor_parallel_size = tensor_parallel_size
        self.enforce_eager = enforce_eager or device.type != "cuda" or self.workers is not None
        self.compile_decode = compile_decode and not enforce_eager and self.workers is None
        try:
            if self.workers is None:
                self.plan = plan
                self.model = load_for_inference(directory, plan)
            else:
                self.plan = dataclasses.replace(plan, device=str(self.workers.device))
                self.model = self.workers.load(directory, self.plan)
            tok_dir = tokenizer or directory
            self.tokenizer = (Tokenizer.from_pretrained(tok_dir)
                              if os.path.isfile(os.path.join(tok_dir, "tokenizer.json")) else None)
            self.generation_defaults = _generation_config(directory)
            self._assemble(engine)
        except BaseException:
            self.shutdown()
            raise

    @classmethod
    def from_model(cls, model: Transformer, tokenizer: Tokenizer | None = None, *, max_num_seqs: int = 256,
                   max_model_len: int | None = None, max_num_batched_tokens: int = 2048,
                   kv_cache_memory: int | str | None = None, block_size: int = 16,
                   enable_prefix_caching: bool = True, seed: int = 0,
                   generation_defaults: dict | None = None) -> LLM:
        """An engine over a model in memory -- one being trained -- that computes with its parameters as they are
        (the same storage, in their dtype: no copy, packing or quantization), on their device, in this process.

        The model keeps the training layout: MLA's absorbed decode reads W_UK and W_UV^T as views of kv_b_proj's
        weight at every step (MLA.absorbed_weights), so nothing is derived from the weights ahead of time and an
        optimizer step is seen at once. Only the prefix cache goes stale (latents the old weights computed): call
        refresh() after every update. The engine runs the model in whatever mode it is in (eval() is the one to
        sample in: no activation checkpointing)."""
        if any(isinstance(m, MLA) and m.fused_input for m in model.modules()):
            raise ValueError("LLM.from_model takes a model in the training layout; this one was prepared for "
                             "inference (fused MLA input projection): use LLM(path) for it")
        weight = model.model.embed_tokens.weight
        self = cls.__new__(cls)
        self.workers, self.tensor_parallel_size = None, 1
        self.enforce_eager = True  # the weights change between calls: nothing captured over them
        self.compile_decode = False
        self.plan = InferencePlan(str(weight.device), weight.dtype, weight.dtype, weight.dtype, "plain", None, False)
        self.model, self.tokenizer = model, tokenizer
        self.generation_defaults = dict(generation_defaults or {})
        self._assemble(EngineConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                    max_num_batched_tokens=max(max_num_batched_tokens, block_size),
                                    kv_cache_memory=None if kv_cache_memory is None else parse_bytes(kv_cache_memory),
                                    block_size=block_size, enable_prefix_caching=enable_prefix_caching, seed=seed))
        return self

    def refresh(self) -> None:
        """After the weights changed in place (an optimizer step on a from_model engine): drop the prefix cache,
        whose latents the old weights computed. Nothing else is derived from the weights (see from_model). Call it
        between generate() calls, with no request in flight."""
        if self.has_unfinished_requests():
            raise RuntimeError("refresh() with requests in flight: finish or abort them first")
        self._new_scheduler()

    def _new_scheduler(self) -> None:
        """An empty allocator (no cached prefixes) and the scheduler over it."""
        layout, engine = self.cache_layout, self.engine_config
        self.allocator = BlockAllocator(layout.num_blocks, layout.block_size,
                                        enable_prefix_caching=engine.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=engine.max_num_seqs,
                                                   max_num_batched_tokens=engine.max_num_batched_tokens,
                                                   max_model_len=layout.max_model_len), self.allocator)

    def _assemble(self, engine: EngineConfig) -> None:
        """The engine around the prepared model: cache sized after a profile of one step, runner, allocator,
        scheduler, sampler."""
        cfg = self.config = self.model.config
        if self.workers is None:
            chunk = min(engine.max_num_batched_tokens, engine.max_model_len or cfg.max_position_embeddings)
            layout = size_kv_cache(cfg, self.plan, engine, measure_activation_bytes(self.model, chunk))
        else:
            layout = self.workers.size_cache(self.model, self.plan, engine)
        self.engine_config, self.cache_layout = engine, layout
        self.max_model_len = layout.max_model_len
        self.block_size, self.num_blocks = layout.block_size, layout.num_blocks
        self.cache_capacity_tokens = layout.num_blocks * layout.block_size
        self.kv_cache_bytes = layout.bytes  # per rank: each rank of a tensor-parallel group holds a copy
        self.kv_cache_bytes_per_token = layout.bytes_per_token  # all layers, as stored
        self.runner = ModelRunner(self.model, layout.num_blocks, layout.block_size, self.plan.cache_dtype,
                                  engine.kv_cache_dtype, enforce_eager=self.enforce_eager,
                                  max_model_len=layout.max_model_len, max_num_seqs=engine.max_num_seqs,
                                  compile_decode=self.compile_decode)
        self._new_scheduler()
        eos = set(cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = sorted(eos)
        self.sampler = Sampler(eos_token_ids=self.eos_token_ids, seed=engine.seed)
        self._requests: dict[str, Request] = {}
        self._pending: list[Request] = []
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "preemptions": 0}

    @property
    def device(self) -> torch.device:
        return torch.device(self.plan.device)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in (compute may be wider: see plan.compute_dtype)."""
        return self.plan.weight_dtype

    @property
    def quantization(self) -> str | None:
        return self.plan.quantization

    @property
    def kv_cache_dtype(self) -> str:
        """How the latent cache stores latents: "auto" or "fp8" (see the class docstring)."""
        return self.engine_config.kv_cache_dtype

    @property
    def failure(self) -> RuntimeError | None:
        """Why this LLM can no longer run (a tensor-parallel worker died, ...); None while it can."""
        return None if self.workers is None else self.workers.failure

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (a no-op for one process). Idempotent; the LLM cannot step afterwards.
        Also runs on `with LLM(...) as llm:` exit and at interpreter exit."""
        if self.workers is not None:
            self.workers.shutdown()

    close = shutdown

    def warm_up(self) -> float:
        """Run what a first request would otherwise wait for -- with compile_decode, the compilation of the decode
        step for one sequence and for several -- on a few dummy tokens; returns the seconds it took. Call it with
        no request in flight; the prefix cache is emptied afterwards (it held only the dummy prompts)."""
        if self.has_unfinished_requests():
            raise RuntimeError("warm_up() with requests in flight: call it before adding requests")
        t0 = time.perf_counter()
        greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        self.generate(prompt_token_ids=[[2, 3, 4, 5]], sampling_params=greedy)
        self.generate(prompt_token_ids=[[2, 3, 4, 5], [6, 7, 8, 9]], sampling_params=greedy)
        self._new_scheduler()
        return time.perf_counter() - t0

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- requests --------------------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int] | None = None, params: SamplingParams | None = None,
                    request_id: str | None = None, prompt_token_ids: list[int] | None = None) -> str:
        """Queue a request (thread-safe); it joins the running batch at the next step. Returns its id."""
        params = params or SamplingParams()
        text = prompt if isinstance(prompt, str) else None
        ids = prompt_token_ids if prompt_token_ids is not None else prompt
        if isinstance(ids, str):
            if self.tokenizer is None:
                raise ValueError("this model directory has no tokenizer.json: pass token ids instead of text")
            ids = self.tokenizer.encode(ids)
        ids = _as_token_ids(ids)
        self._validate(ids, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids)
        if max_tokens != params.max_tokens:
            params = _replace(params, max_tokens=max_tokens)
        completions = []
        for i in range(params.n):
            gen = make_generator(params.seed, i, self.device) if params.seed is not None else None
            seq = Sequence(ids, params, request_id=request_id, index=i, generator=gen)
            completions.append(Completion(seq, self.tokenizer))
        req = Request(request_id, text, ids, params, completions)
        with self._lock:
            if request_id in self._requests or any(r.request_id == request_id for r in self._pending):
                raise ValueError(f"request id {request_id!r} is already in use")
            self._pending.append(req)
        return request_id

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        n = len(ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        if n >= self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens, but the maximum context length is {self.max_model_len}")
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens and max_tokens is {params.max_tokens}: {n + params.max_tokens} "
                             f"exceeds the maximum context length {self.max_model_len}")

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is; its cache blocks are freed at the next step (thread-safe)."""
        with self._lock:
            self._aborts.add(request_id)

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self._requests or self._pending)

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for admission: a request with n completions counts n."""
        with self._lock:
            pending = sum(r.params.n for r in self._pending)
        return self.scheduler.num_waiting + pending

    # ---- one engine step -------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Admit new requests, run one batch (prefill chunks + decodes), sample, detokenize. Returns the outputs of
        every request that changed, finished ones last time they appear."""
        with self._lock:
            pending, self._pending = self._pending, []
            aborts, self._aborts = self._aborts, set()
        changed: dict[str, Request] = {}
        for req in pending:
            self._requests[req.request_id] = req
            for c in req.completions:
                self.scheduler.add(c.seq)
        for rid in aborts:
            req = self._requests.get(rid) or next((r for r in pending if r.request_id == rid), None)
            if req is not None and not req.finished:
                self.scheduler.abort(rid)
                for c in req.completions:
                    if c.seq.finish_reason is None:
                        c.seq.finish_reason = "abort"
                changed[rid] = req

        out = self.scheduler.schedule()
        self.stats["preemptions"] += len(out.preempted)
        for seq in getattr(out, "failed", []):
            changed[seq.request_id] = self._requests[seq.request_id]
        if out.scheduled:
            try:
                self._run(out, changed)
            except RuntimeError:
                if self.failure is not None:  # the tensor-parallel group broke: nothing will run again
                    self._abandon()
                raise
        self.stats["steps"] += 1

        results = []
        for rid, req in changed.items():
            results.append(req.output())
            if req.finished:
                self._requests.pop(rid, None)
        return results

    def _abandon(self) -> None:
        """Drop every request (finished as "abort"), so callers waiting on them stop waiting."""
        with self._lock:
            pending, self._pending = self._pending, []
            self._aborts.clear()
        for req in [*self._requests.values(), *pending]:
            self.scheduler.abort(req.request_id)
            for c in req.completions:
                if c.seq.finish_reason is None:
                    c.seq.finish_reason = "abort"
        self._requests.clear()

    def _run(self, out, changed: dict[str, Request]) -> None:
        inputs = self.runner.prepare(out.scheduled)
        logits = self.runner.execute(inputs) if self.workers is None else self.workers.step(self.runner, inputs)
        sampling = [item.seq for item in out.scheduled if item.sample]
        for item in out.scheduled:  # prompt logprobs, chunk by chunk, before the positions advance
            seq = item.seq
            if seq.seq_id in logits.prompt and seq.index == 0:
                entries = prompt_logprobs(logits.prompt[seq.seq_id], seq.prompt_token_ids,
                                          seq.params.prompt_logprobs, start=item.start)
                collected = self._requests[seq.request_id].prompt_logprobs
                first = 0 if item.start == 0 else item.start + 1  # the position entries[0] scores
                # a preempted request replays its prompt from the start: keep what was collected once
                collected.extend(None if e is None else self._position_logprobs(e)
                                 for e in entries[max(0, len(collected) - first):])
            self.stats["prompt_tokens"] += min(item.num_new_tokens, max(0, seq.num_prompt_tokens - item.start))
        sampled = self.sampler(logits.sample, sampling) if sampling else None
        self.scheduler.postprocess(out)
        for i, seq in enumerate(sampling):
            token = sampled.token_ids[i]
            req = self._requests[seq.request_id]
            comp = req.completions[seq.index]
            seq.append_token(token)
            self.stats["generation_tokens"] += 1
            if comp.logprobs is not None:
                lp = sampled.logprobs[i]
                comp.logprobs.append(self._position_logprobs(lp))
                comp.cumulative_logprob += lp.logprob
            self._check_finish(seq, comp, token)
            changed[seq.request_id] = req

    def _check_finish(self, seq: Sequence, comp: Completion, token: int) -> None:
        """Stop token, stop string, max_tokens or a full context ends a sequence (the sampler already kept eos and
        stop tokens out until min_tokens, so they can be taken at face value here)."""
        p = seq.params
        reason = stop = None
        if token in p.stop_token_ids:
            reason, stop = "stop", token
        elif not p.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        else:
            hit = comp.add_text(token, match_stop=seq.num_output_tokens >= p.min_tokens)
            if hit is not None:
                reason, stop = "stop", hit
            elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
                reason = "length"
        if reason is not None:
            seq.stop_reason = stop
            self.scheduler.finish(seq, reason)
            if not isinstance(stop, str):
                comp.finish_text()

    def _position_logprobs(self, lp: TokenLogprobs) -> PositionLogprobs:
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        return position_logprobs(lp.token_id, lp.logprob, lp.rank, lp.top, decode)

    # ---- convenience -----------------------------------------------------------------------------------------
    def generate(self, prompts=None, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 prompt_token_ids: list[list[int]] | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion; one RequestOutput per prompt, in order."""
        if prompts is None and prompt_token_ids is None:
            raise ValueError("generate() needs prompts or prompt_token_ids")
        if prompts is not None and prompt_token_ids is not None:
            raise ValueError("pass prompts or prompt_token_ids, not both")
        items = prompt_token_ids if prompts is None else prompts
        if isinstance(items, str) or (isinstance(items, list) and items and isinstance(items[0], int)):
            items = [items]
        items = list(items)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(items)
        if len(params) != len(items):
            raise ValueError(f"{len(params)} sampling_params for {len(items)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(items, params)]
        return self._run_until_done(ids, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them, through the chat template."""
        if self.tokenizer is None:
            raise ValueError("this model directory has no tokenizer: chat needs tokenizer.json and a chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tokenize=True)
                   for c in conversations]
        return self.generate(prompt_token_ids=prompts, sampling_params=sampling_params, use_tqdm=use_tqdm)

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text deltas of one completion as they are generated (n must be 1)."""
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError("stream() follows one completion: use n=1")
        rid = self.add_request(prompt, params)
        try:
            while True:
                for out in self.step():
                    if out.request_id == rid:
                        if out.outputs[0].delta_text:
                            yield out.outputs[0].delta_text
                        if out.finished:
                            return
        finally:
            if rid in self._requests or any(r.request_id == rid for r in self._pending):
                self.abort(rid)
                self.step()

    def _run_until_done(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = Progress(len(ids), "generating", unit="req", enabled=use_tqdm)
        wanted = set(ids)
        while len(done) < len(ids):
            for out in self.step():
                if out.finished and out.request_id in wanted and out.request_id not in done:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[i] for i in ids]


def _as_token_ids(ids) -> list[int]:
    if hasattr(ids, "keys") and "input_ids" in ids:  # a tokenizer's BatchEncoding
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
        raise ValueError("a prompt must be a string or a list of token ids")
    return list(ids)


def _replace(params: SamplingParams, **changes) -> SamplingParams:
    return dataclasses.replace(params, **changes)


def _generation_config(directory: str) -> dict:
    path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
