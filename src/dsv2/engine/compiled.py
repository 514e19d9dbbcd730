"""The compiled CPU decode step (`LLM(compile_decode=True)`, `--compile`): a decode-only engine step as one
torch.compile'd graph, with the matrix kernels left as they are.

Eager decode of a small model is mostly overhead: ~1,500 operator calls per token for the shipped 6-layer model, each
a few microseconds of dispatch around little arithmetic. Inductor fuses what lies between the matrix products
(norms, rope, the absorbed query, scores, softmax, the router, residuals) into a few C++ loops. The matrix products
themselves are already the right kernels for each weight format -- oneDNN-prepacked bf16, int8, int4, the AVX2
upcast -- and several of them hold tensors Inductor cannot take (oneDNN's opaque packed weights), so they stay
opaque: `seal(model)` wraps every matrix module (linears, dense/shared MLPs, routed experts) so that, while
compiling, it appears in the graph as one custom operator (`dsv2::matrix_module`, `dsv2::routed_experts`) that
calls the module eagerly. Outside compilation the wrappers call the module directly, so the eager paths (prefill,
mixed steps) are unchanged. A single-sequence step with plain weights multiplies its large matrices (lm_head, MLPs,
a layer's routed experts) in the CPU kernel of kernels/moe_cpu.cpp, as the opaque operators dsv2::cpu_linear /
cpu_mlp / cpu_experts, and the smaller ones in matrix-vector code Inductor generates (see one_row_kernel). The
routed experts keep their host-side grouping (one call per layer), so the graph has no break: the step's Python
work is one compiled call plus the opaque modules.

Shapes are dynamic (batch and block-table width), so one compilation serves every batch and context; Dynamo
specialises a batch of one, so the warm-up compiles twice. Compilation needs a C++ compiler at run time:
`compiler_unavailable_reason()` checks for it and the runner falls back to eager with a one-line notice; so does a
compilation that fails. Inductor caches the generated C++ on disk (TORCHINDUCTOR_CACHE_DIR, default
/tmp/torchinductor_$USER, in a subdirectory per vector ISA), which a second start reuses; tracing the model (most
of the warm-up) is redone at every start. The eager step is the slow twin (tests/test_compiled_decode.py).

Shape legend: S decode sequences of the step, W block-table width (blocks of its longest context), V vocab.
"""
from __future__ import annotations

import functools
import os
import sys
import time
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..model import PagedAttention, Transformer
from ..model.layers import MLP
from ..model.moe import ExpertGroup, Experts
from ..model.upcast import UpcastExperts, UpcastLinear, UpcastMLP

_MODULES: "weakref.WeakValueDictionary[int, nn.Module]" = weakref.WeakValueDictionary()  # handle -> module
_SEALED_MODELS = 0  # models sealed in this process (part of each handle, see seal)
_ENGINES = 0  # CompiledDecode objects made in this process


# Registered with torch.library.Library rather than the custom_op decorator: the decorator's wrapper costs ~30 us
# a call on the CPU against ~13 us here, and these run ~30 times a token.
_LIB = torch.library.Library("dsv2", "DEF")
_LIB.define("matrix_module(Tensor x, int handle, int out_features) -> Tensor")
_LIB.define("routed_experts(Tensor x, Tensor weights, Tensor idx, int handle) -> Tensor")


def _matrix_module(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """x [..., K] -> the sealed module's output [..., out_features], computed eagerly by the module."""
    return _MODULES[handle](x)


def _routed_experts(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, handle: int) -> torch.Tensor:
    """x [T, H], weights/idx [T, K] -> the sealed ExpertGroup's output [T, H] (its own grouping, eagerly)."""
    return _MODULES[handle](x, weights, idx)


_LIB.impl("matrix_module", _matrix_module, "CompositeExplicitAutograd")
_LIB.impl("routed_experts", _routed_experts, "CompositeExplicitAutograd")


@torch.library.register_fake("dsv2::matrix_module")
def _(x, handle, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.register_fake("dsv2::routed_experts")
def _(x, weights, idx, handle):
    return torch.empty_like(x)


class Sealed(nn.Module):
    """A matrix module that torch.compile sees as one opaque operator. Attributes not its own read through to the
    wrapped module (`sealed.weight`, `sealed.out_features`), so code that inspects the model still works."""

    def __init__(self, inner: nn.Module, handle: int, out_features: int | None):
        super().__init__()
        self.inner, self.handle, self.out_features_or_same = inner, handle, out_features
        self.cpu_kernel = ONE_ROW_KERNEL and one_row_kernel(inner)  # decided here, outside tracing
        _MODULES[handle] = inner

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return self.inner(x, *args)
        inner, one_row = self.inner, x.numel() == x.shape[-1]  # a single-sequence decode step (specialised)
        if isinstance(inner, ExpertGroup):
            weights, idx = args[:2]
            if len(args) > 2 and args[2] is not None:
                raise RuntimeError("token dropping is a training feature; a sealed model only runs inference")
            if one_row and self.cpu_kernel:
                return torch.ops.dsv2.cpu_experts(x, inner.gate_up_proj, inner.down_proj, weights, idx)
            if one_row and type(inner) in (Experts, UpcastExperts):
                return experts_one_row(inner, x, weights, idx)
            return torch.ops.dsv2.routed_experts(x, weights, idx, self.handle)
        if type(inner) in (nn.Linear, UpcastLinear):
            if one_row and self.cpu_kernel:
                y = torch.ops.dsv2.cpu_linear(x, inner.weight)
                return y if inner.bias is None else y + inner.bias.to(y.dtype)
            if one_row:
                return linear_one_row(x, inner.weight, inner.bias)
            if type(inner) is nn.Linear:
                return inner(x)  # traced: F.linear (an upcast one stays opaque: it picks its kernel by row count)
        if type(inner) in (MLP, UpcastMLP) and one_row:
            if self.cpu_kernel:
                return torch.ops.dsv2.cpu_mlp(x, *_mlp_weights(inner))
            return mlp_one_row(x, *_mlp_weights(inner))
        out = x.shape[-1] if self.out_features_or_same is None else self.out_features_or_same
        return torch.ops.dsv2.matrix_module(x, self.handle, out)


# ---- plain weights, one row: the CPU kernel for large matrices, else matrix-vector products Inductor generates ----
# A single-sequence step's matrices of at least ONE_ROW_KERNEL_ELEMENTS elements (the lm_head, MLPs, a MoE layer's
# routed experts) go to kernels/moe_cpu.cpp as opaque operators: one sequential weight stream per thread, measured
# faster than Inductor's generated loops from memory (BENCHMARKS.md); smaller ones stay generated, where a call's
# ~15 us would cost more than it saves. ONE_ROW_KERNEL = False keeps every product generated (the A/B switch).
ONE_ROW_KERNEL = True
ONE_ROW_KERNEL_ELEMENTS = 1 << 20


def one_row_kernel(module: nn.Module) -> bool:
    """Whether a sealed module's single-row product runs in the CPU kernel (plain or upcast frozen CPU weights, big
    enough)."""
    from ..kernels import cpu_moe
    if type(module) in (Experts, UpcastExperts):
        weight, elements = module.gate_up_proj, module.gate_up_proj[0].numel() * 3 // 2
    elif type(module) is UpcastMLP or (type(module) is MLP and all(
            type(m) is nn.Linear and m.bias is None for m in (module.gate_proj, module.up_proj, module.down_proj))):
        weight = _mlp_weights(module)[0]
        elements = weight.numel() * 3
    elif type(module) in (nn.Linear, UpcastLinear):
        weight, elements = module.weight, module.weight.numel()
    else:
        return False
    return (elements >= ONE_ROW_KERNEL_ELEMENTS and weight.device.type == "cpu" and not weight.requires_grad
            and weight.dtype in (torch.bfloat16, torch.float32) and cpu_moe.kernel() is not None)


# ---- plain weights, one row: matrix-vector products Inductor generates ------------------------------------------
# At one row a matmul is a matrix-vector product, bound by reading the weight; written as multiply-and-sum, Inductor
# fuses the bf16 -> fp32 conversion, the products and the sum into one pass over the weight (the routed experts'
# gather too: the chosen experts' rows are read in place, never copied), with no per-call library overhead. Measured
# here against oneDNN's prepacked bf16 GEMV: the 32000 x 1024 lm_head 26 vs 14 GB/s, four routed experts of the mini
# model 20.6 vs 12.1 GB/s (benchmarks in BENCHMARKS.md). Sums run in fp32, as the library kernels' do.
def _gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] (broadcast against w's leading dimensions) . w [..., N, K] -> [..., N] fp32."""
    return (w.float() * x.float().unsqueeze(-2)).sum(-1)


def linear_one_row(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = _gemv(x.reshape(-1), weight)  # [N]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], -1)


def _mlp_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A plain or upcast MLP's (gate [I, H], up [I, H], down [H, I]); the upcast one's are views of its fused
    gate_up [2I, H], contiguous rows either way."""
    if type(mlp) is UpcastMLP:
        I = mlp.down.shape[-1]
        return mlp.gate_up[:I], mlp.gate_up[I:], mlp.down
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight


def mlp_one_row(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    h = x.reshape(-1)
    act = F.silu(_gemv(h, gate)) * _gemv(h, up)
    return _gemv(act.to(x.dtype), down).to(x.dtype).view(x.shape)


def experts_one_row(experts: Experts, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """One token's K routed experts, x [1, H], weights/idx [1, K] -> [1, H]: the chosen experts' weights are read
    where they lie in the stacks (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    chosen = idx[0]  # [K]
    gate, up = _gemv(x.reshape(-1), experts.gate_up_proj[chosen]).chunk(2, dim=-1)  # [K, I] each
    act = (F.silu(gate) * up).to(x.dtype)  # [K, I]
    y = _gemv(act, experts.down_proj[chosen])  # [K, I] . [K, H, I] -> [K, H]
    return (y * weights[0].float().unsqueeze(-1)).sum(0, keepdim=True).to(x.dtype)  # combined in fp32


def _matrix_kind(module: nn.Module) -> tuple[bool, int | None] | None:
    """(True, out_features) for a linear-like module, (True, None) for one whose output is as wide as its input
    (an MLP, routed experts); None for a module that is not a matrix module."""
    if isinstance(module, ExpertGroup):
        return True, None
    if isinstance(module, MLP) or type(module).__name__.endswith("MLP"):  # MLP, PackedMLP, Int8MLP, Int4MLP, ...
        return True, None
    out = getattr(module, "out_features", None)
    if isinstance(module, nn.Linear) or (isinstance(out, int) and type(module).__name__.endswith("Linear")):
        return True, out
    return None


def seal(model: Transformer) -> Transformer:
    """Wrap, in place, every matrix module of `model` (the outermost one where they nest) in Sealed; returns the
    model. Handles are (model number in this process, module index): the same model gets the same handles in every
    process, so Inductor's on-disk cache recognises its graph."""
    global _SEALED_MODELS
    if any(isinstance(m, Sealed) for m in model.modules()):
        return model
    base, index = _SEALED_MODELS << 20, 0
    _SEALED_MODELS += 1

    def visit(parent: nn.Module) -> None:
        nonlocal index
        for name, child in list(parent.named_children()):
            kind = _matrix_kind(child)
            if kind is None:
                visit(child)
                continue
            setattr(parent, name, Sealed(child, base + index, kind[1]))
            index += 1
    visit(model)
    return model


def use_isa_cache_dir() -> str:
    """Point Inductor's on-disk cache at a subdirectory for this process's vector ISA (and return it). Its cache key
    missed the CPU capability torch runs with: kernels compiled under AVX-512 were reused by a process restricted to
    AVX2 (ATEN_CPU_CAPABILITY=avx2) and produced NaNs. One directory per ISA keeps them apart."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    base = cache_dir()
    isa = "isa-" + (str(pick_vec_isa()).replace(" ", "-") or "none")
    if os.path.basename(base) != isa:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, isa)
    return cache_dir()


def compiler_unavailable_reason() -> str | None:
    """Why torch.compile cannot build CPU code here (Inductor compiles C++ at run time); None when it can."""
    from ..kernels.cpu_build import compiler
    if compiler() is None:
        return f"no C++ compiler found ({os.environ.get('CXX') or 'g++'}, c++ or clang++ on PATH); install g++ or set CXX"
    try:
        import torch._inductor  # noqa: F401
    except Exception as e:  # a torch build without Inductor
        return f"torch.compile's Inductor is unavailable ({type(e).__name__}: {e})"
    return None


class CompiledDecode:
    """Decode-only steps of a runner through one compiled forward over exact shapes: rows [S, 3 + W] int32 hold
    each sequence's [token | position | context length | block table], W the blocks of the step's longest context
    (at least 2, so Dynamo never specialises it). The forward is the static-shape decode (runner.static_decode) --
    the same function CUDA graphs capture -- compiled with dynamic shapes."""

    def __init__(self, runner):
        global _ENGINES
        use_isa_cache_dir()
        # Dynamo keeps every compiled variant of static_decode (two per engine: one sequence, several) under one
        # limit per function; room for this engine's, so that a process may build several engines.
        _ENGINES += 1
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 2 * _ENGINES + 2)
        self.runner = runner
        seal(runner.model)
        # cpp_wrapper: the compiled graph's own driver in C++ too (a Python one costs ~1 ms a step here)
        self.compiled = torch.compile(functools.partial(static_decode, runner), dynamic=True, fullgraph=True,
                                      options={"cpp_wrapper": True})
        self.compile_s = 0.0  # seconds spent in steps that compiled (first use of each specialisation)
        self._seen: set[bool] = set()  # batch == 1, batch > 1: the two specialisations
        self.failed: str | None = None
        self.skip_guards = True  # False once a built variant's guard failed (see run)

    def takes(self, step) -> bool:
        return step.num_decode == len(step.starts) > 0 and not step.prompt_rows

    def rows(self, step) -> np.ndarray:
        W = max(2, max(len(t) for t in step.block_tables))
        return write_decode_rows(np.zeros((len(step.starts), 3 + W), dtype=np.int32), step)

    def run(self, step):
        """The step's logits, or None when compiling failed (the caller runs the step eagerly, and should drop this
        object: `failed` says why)."""
        from .runner import StepLogits
        rows = torch.from_numpy(self.rows(step)).to(self.runner.device)
        single = rows.shape[0] == 1
        logits = None
        if single in self._seen and self.skip_guards:
            # Dynamo's guards skipped but those that tell this function's compiled variants apart (batch 1 or more,
            # which engine): what else they check -- the shapes, dtypes and devices of the weights and caches the
            # graph reads, global modes -- is fixed for the engine's life. Saves ~0.6 ms a step (bench-mini, one
            # sequence: 8.22 -> 7.65 ms a token).
            try:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    logits = self.compiled(rows)
            except RuntimeError as e:
                if "Recompilation triggered" not in str(e):
                    raise
                # A guard of a built variant failed after all (Dynamo raises before running anything): this engine
                # evaluates every guard from now on, and the step compiles the variant it needs, as below.
                self.skip_guards = False
        if logits is None:  # a first use compiles (timed); any call may, with guards on: fall back to eager if not
            t0, first = time.perf_counter(), single not in self._seen
            try:
                logits = self.compiled(rows)
            except Exception as e:  # compilation raises before the step runs: the cache is untouched
                self.failed = f"compiling the decode step failed: {type(e).__name__}: {str(e).splitlines()[0]}"
                return None
            if first:
                self._seen.add(single)
                self.compile_s += time.perf_counter() - t0
        logits = logits[step.logits_indices]
        return StepLogits(sample=logits[step.sample_rows], prompt={})


def write_decode_rows(rows: np.ndarray, step) -> np.ndarray:
    """A decode step's sequences into the first S rows of `rows` [>= S, 3 + W] int32, static_decode's input:
    [token | position | context length | block table]. Table entries past a context stay as they are (masked)."""
    S = len(step.starts)
    rows[:S, 0], rows[:S, 1], rows[:S, 2] = step.token_ids, step.starts, np.add(step.starts, 1)
    for i, t in enumerate(step.block_tables):
        rows[i, 3:3 + len(t)] = t
    return rows


def static_decode(runner, rows: torch.Tensor) -> torch.Tensor:
    """One decode step from a rows tensor alone [S, 3 + W] int32 ([token | position | context length | block
    table]) -> logits [S, V]: slots and attention metadata are derived on the device, so nothing depends on host
    values (a CUDA graph can hold it; torch.compile sees one graph)."""
    bs = runner.block_size
    tokens, positions, lens, tables = rows[:, 0].long(), rows[:, 1].long(), rows[:, 2], rows[:, 3:]
    slots = tables.gather(1, (positions // bs)[:, None])[:, 0].long() * bs + positions % bs  # [S]
    attn = PagedAttention(kv_caches=runner.kv_caches, slot_mapping=slots, seq_slots=[], query_ranges=[],
                          num_decode=rows.shape[0], fp8=runner.fp8, block_tables=tables, context_lens=lens)
    return runner.model(tokens, positions, attn=attn)


def unsupported_reason(model: Transformer, device: torch.device) -> str | None:
    """Why the decode step of this model cannot be compiled here; None if it can."""
    if device.type != "cpu":
        return "the compiled decode step is the CPU path (CUDA decode uses CUDA graphs)"
    if model.config.rope_type == "dynamic":
        return "dynamic NTK rope reads each step's context lengths on the host"
    return compiler_unavailable_reason()


def notice(reason: str) -> None:
    print(f"dsv2: decode runs eagerly ({reason})", file=sys.stderr)
