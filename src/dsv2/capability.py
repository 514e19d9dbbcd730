"""What this machine runs fast -- asked of the CPU and of torch, never assumed -- and, from that, how inference
multiplies by each kind of weight. `dsv2 info --system` prints both, with the reason for every choice.

    cap = cpu_capability()                       # CPU level, oneDNN bf16, the int8 and int4 kernels: each tried once
    plan = inference_plan("cpu", "auto", None)   # weight / compute dtypes and the kernel of every matmul kind

DSV2_CPU_CAPABILITY=default|avx2|avx512 lowers what dsv2 believes the CPU can do (it never raises it), so the paths
an AVX2 or plain CPU takes run -- and are tested -- on any machine. It changes dsv2's choices only; to make torch's
own kernels behave as on an AVX2 CPU too, set ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 as well.
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field

import torch

LEVELS = ("default", "avx2", "avx512")  # dsv2's view of x86 vector levels, lowest first
ENV = "DSV2_CPU_CAPABILITY"
# Up to this many rows a matmul is a matrix-vector product bound by reading the weights (decode); above it, a
# matrix-matrix product bound by arithmetic (prefill, large decode batches). The int8 kernel switches at this size
# (measured on 2-core EPYC and Xeon machines, AVX-512 and emulated AVX2: the int8 GEMV beats dequantize + matmul up
# to ~24 rows).
GEMV_ROWS = 16
# torch's CPU int4 kernel dequantizes the weights again for every 4 rows, so its cost grows with the rows; above about
# this many, dequantizing by tiles and multiplying there is faster (2816 x 1024 and 1024 x 512, AVX-512 and emulated
# AVX2, one thread: even at 24-32 rows, the tiles ahead from 32-48; benchmarks/quant_kernels.py --rows)
INT4_KERNEL_ROWS = 32
INT4_GROUP_SIZE = 64  # int4 weights per (scale, zero) pair by default (benchmarks/quant_kernels.py)
INT4_GROUP_SIZES = (32, 64, 128)
# torch's half-precision GEMV on CPUs without fast bf16 handles one row at a time (its cost grows with the rows),
# so for bf16 weights computed in fp32, converting the weight and multiplying in fp32 wins from 3 rows on (2048 x
# 2048, emulated AVX2: 0.83 vs 1.21 ms at 2 rows, 1.23 vs 1.22 at 3, 1.67 vs 1.57 at 4; benchmarks in BENCHMARKS.md)
UPCAST_GEMV_ROWS = 2
# Where kernels/moe_cpu.cpp is built, upcast products of up to this many rows run there instead: fp32 activations
# over the bf16 weights, each weight read once for all rows (real AVX2 AMD EPYC Zen 3, 2 threads, fp32 rows over
# the mini model's bf16 matrices, kernel time / the GEMV-or-convert path's: 0.25-0.36 at 2 rows, 0.13-0.25 at 4,
# 0.21-0.40 at 8, 0.35-0.55 at 16, 0.41-0.73 at 32, 0.96-1.09 at 64; the lm_head at 16 rows 17.9 vs 32.5 ms)
UPCAST_KERNEL_ROWS = 32
_INTERESTING_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
                      "avx512_fp16", "avx_vnni", "avx512_vnni", "avx_ne_convert", "amx_bf16", "amx_int8", "amx_tile",
                      "asimd", "bf16", "i8mm", "sve", "sve2")


@dataclass(frozen=True)
class CpuCapability:
    """The CPU as dsv2 sees it. Each bool is the answer of a check (see `reasons`), not of a CPU model name."""
    arch: str  # platform.machine(): x86_64, aarch64, arm64, ...
    torch_level: str  # torch.backends.cpu.get_cpu_capability(), lower case: default, avx2, avx512, sve256, ...
    level: str  # what dsv2 uses on x86: torch's level, lowered by DSV2_CPU_CAPABILITY
    forced: str | None  # DSV2_CPU_CAPABILITY (or the override a test passed)
    onednn_bf16: bool  # oneDNN multiplies bf16 natively and its weight prepacking works
    fast_bf16: bool  # bf16 matrix-matrix products run at least as fast as fp32 (else: compute in fp32)
    fast_fp16: bool
    int8_gemv: bool  # torch's int8 weight-only GEMV kernel (aten._weight_int8pack_mm) gives right answers
    flags: tuple[str, ...]  # the vector-ISA flags the OS reports (informational)
    int4_kernel: bool = False  # torch's CPU int4 kernel (aten._weight_int4pack_mm_for_cpu) gives right answers
    reasons: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def is_x86(self) -> bool:
        return self.arch.lower() in ("x86_64", "amd64", "i686", "x86")

    def as_dict(self) -> dict:
        return {"arch": self.arch, "torch_capability": self.torch_level, "level": self.level, "forced": self.forced,
                "onednn_bf16": self.onednn_bf16, "fast_bf16": self.fast_bf16, "fast_fp16": self.fast_fp16,
                "int8_gemv": self.int8_gemv, "int4_kernel": self.int4_kernel, "flags": list(self.flags),
                "reasons": dict(self.reasons)}


def cpu_capability(force: str | None = None) -> CpuCapability:
    """This machine's capability (checked once per process and override). `force` (or the DSV2_CPU_CAPABILITY
    environment variable) is one of LEVELS and only ever lowers the level."""
    force = force if force is not None else os.environ.get(ENV) or None
    if force is not None:
        force = force.strip().lower()
        if force not in LEVELS:
            raise ValueError(f"{ENV}={force!r}: use one of {', '.join(LEVELS)}")
    return _detect(force)


@functools.lru_cache(maxsize=None)
def _detect(force: str | None) -> CpuCapability:
    arch = platform.machine() or "unknown"
    torch_level = torch.backends.cpu.get_cpu_capability().lower()
    reasons: dict[str, str] = {}
    x86 = arch.lower() in ("x86_64", "amd64", "i686", "x86")
    level = torch_level if torch_level in LEVELS else "default"
    if force is not None and LEVELS.index(force) < LEVELS.index(level):
        level = force
        reasons["level"] = f"{ENV}={force} lowers torch's {torch_level}"
    elif force is not None and force != level:
        reasons["level"] = f"{ENV}={force} ignored: this CPU (as torch runs it) only reaches {torch_level}"
    else:
        reasons["level"] = f"torch.backends.cpu.get_cpu_capability() = {torch_level.upper()}"

    onednn_bf16, why = _check_onednn_bf16(x86, level)
    reasons["onednn_bf16"] = why
    if x86:
        fast_bf16, fast_fp16 = onednn_bf16, onednn_bf16 and _mkldnn_supports("fp16")
        reasons["fast_bf16"] = ("oneDNN runs bf16 GEMMs natively" if fast_bf16 else
                                "no oneDNN bf16 here: torch's fallback bf16 GEMM is many times slower than fp32")
    else:  # ARM and others: torch's own check (bf16 instructions and a oneDNN/ACL build that uses them)
        fast_bf16, fast_fp16 = _mkldnn_supports("bf16"), _mkldnn_supports("fp16")
        reasons["fast_bf16"] = f"torch.ops.mkldnn._is_mkldnn_bf16_supported() = {fast_bf16} on {arch}"
    reasons["fast_fp16"] = f"torch.ops.mkldnn._is_mkldnn_fp16_supported() = {fast_fp16}" if fast_bf16 or not x86 \
        else "no oneDNN half-precision GEMMs at this level"
    int8_gemv, reasons["int8_gemv"] = _check_int8_gemv()
    int4_kernel, reasons["int4_kernel"] = _check_int4_kernel()
    return CpuCapability(arch=arch, torch_level=torch_level, level=level, forced=force, onednn_bf16=onednn_bf16,
                         fast_bf16=fast_bf16, fast_fp16=fast_fp16, int8_gemv=int8_gemv, flags=_cpu_flags(),
                         int4_kernel=int4_kernel, reasons=reasons)


def _mkldnn_supports(kind: str) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    check = getattr(torch.ops.mkldnn, f"_is_mkldnn_{kind}_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def _check_onednn_bf16(x86: bool, level: str) -> tuple[bool, str]:
    if not x86:
        return False, "not x86: oneDNN weight prepacking is only used with x86 kernels"
    if level != "avx512":
        return False, f"CPU level {level}: oneDNN's bf16 path needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT"
    if not _mkldnn_supports("bf16"):
        return False, "torch.ops.mkldnn._is_mkldnn_bf16_supported() is False (CPU or torch build)"
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False, "this torch build has no mkldnn._reorder_linear_weight"
    try:  # the trial the real model would make, on a tiny matrix, checked against fp32
        w = torch.randn(32, 64).bfloat16()
        x = torch.randn(3, 64).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        ok = torch.allclose(y.float(), x.float() @ w.float().T, rtol=2e-2, atol=5e-2)
    except RuntimeError as e:
        return False, f"oneDNN refused a bf16 weight: {str(e).splitlines()[0][:120]}"
    return (True, "a bf16 weight packed and multiplied on a trial matrix") if ok else \
        (False, "oneDNN's packed bf16 matmul gave wrong results on a trial matrix")


def _check_int8_gemv() -> tuple[bool, str]:
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return False, "this torch build has no aten._weight_int8pack_mm"
    try:
        g = torch.Generator().manual_seed(0)
        q = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=g)
        scale = (torch.rand(32, generator=g) / 64 + 1e-3).bfloat16()
        x = torch.randn(2, 64, generator=g).bfloat16()
        y = op(x, q, scale).float()
        ref = x.float() @ (q.float() * scale.float()[:, None]).T
        ok = torch.allclose(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    except RuntimeError as e:
        return False, f"aten._weight_int8pack_mm refused a trial: {str(e).splitlines()[0][:120]}"
    return (True, "aten._weight_int8pack_mm matched fp32 on a trial matrix") if ok else \
        (False, "aten._weight_int8pack_mm gave wrong results on a trial matrix")


@functools.lru_cache(maxsize=None)
def int4_cpu_packing() -> tuple[int, bool] | None:
    """How aten._convert_weight_to_int4pack_for_cpu lays out codes at the CPU level torch runs at, read off its
    output (torch documents no layout): (rows per block, halves) -- for each k a block stores B/2 bytes, byte j
    holding rows j and j + B/2 (halves) or rows 2j and 2j + 1 -- or None (no such op, or another layout)."""
    op = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if op is None:
        return None
    n, k = 144, 2  # whole blocks and, at any block size here, a last block of 16 rows
    try:
        rows = torch.arange(n, dtype=torch.int32)[:, None].expand(n, k).contiguous()
        low, high = op(rows % 16, 1).flatten(), op(rows // 16, 1).flatten()  # each nibble names its row in 2 parts
    except RuntimeError:
        return None
    seen = (((low & 15) + 16 * (high & 15)).tolist(), ((low >> 4) + 16 * (high >> 4)).tolist())
    for block, halves in ((64, True), (32, True), (64, False), (32, False)):
        want: tuple[list[int], list[int]] = ([], [])
        for start in range(0, n, block):
            b = min(block, n - start)
            half = halves and b == block  # a last, shorter block holds pairs
            for _ in range(k):
                want[0].extend(start + (j if half else 2 * j) for j in range(b // 2))
                want[1].extend(start + (j + b // 2 if half else 2 * j + 1) for j in range(b // 2))
        if want == seen:
            return block, halves
    return None


def _check_int4_kernel() -> tuple[bool, str]:
    op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    packing = int4_cpu_packing()
    if op is None or packing is None:
        return False, ("this torch build has no aten._weight_int4pack_mm_for_cpu" if op is None else
                       "aten._convert_weight_to_int4pack_for_cpu packs in a layout dsv2 cannot read back")
    try:  # 80 rows: a whole block and a shorter last one (at 64-row blocks); K = 128 in 4 groups of 32
        g = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (80, 128), dtype=torch.int32, generator=g)
        sz = torch.stack([torch.rand(4, 80, generator=g) / 16 + 1e-3, torch.randn(4, 80, generator=g) / 4], -1)
        x = torch.randn(3, 128, generator=g).bfloat16()
        y = op(x, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), 32, sz.bfloat16()).float()
        s, z = sz.bfloat16().float().permute(2, 1, 0).unsqueeze(-1)  # [80, 4, 1]
        w = ((q.view(80, 4, 32) - 8) * s + z).view(80, 128)
        ref = x.float() @ w.T
        ok = torch.allclose(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    except RuntimeError as e:
        return False, f"aten._weight_int4pack_mm_for_cpu refused a trial: {str(e).splitlines()[0][:120]}"
    block, halves = packing
    layout = f"blocks of {block} rows, " + ("halves" if halves else "pairs")
    return (True, f"aten._weight_int4pack_mm_for_cpu matched fp32 on a trial matrix (packing: {layout})") if ok else \
        (False, "aten._weight_int4pack_mm_for_cpu gave wrong results on a trial matrix")


@functools.lru_cache(maxsize=None)
def int4_cuda_kernel(device: str) -> tuple[bool, str]:
    """torch's CUDA int4 kernel (aten._weight_int4pack_mm, tinygemm) tried once on `device` against fp32."""
    op = getattr(torch.ops.aten, "_weight_int4pack_mm", None)
    if op is None:
        return False, "this torch build has no aten._weight_int4pack_mm"
    try:
        g = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (64, 256), dtype=torch.int32, generator=g)
        sz = torch.stack([torch.rand(2, 64, generator=g) / 16 + 1e-3, torch.randn(2, 64, generator=g) / 4], -1)
        x = torch.randn(3, 256, generator=g).bfloat16()
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, 1::2] | (q[:, 0::2] << 4)).to(torch.uint8)
                                                            .to(device), 8)
        y = op(x.to(device), packed, 128, sz.bfloat16().to(device)).float().cpu()
        s, z = sz.bfloat16().float().permute(2, 1, 0).unsqueeze(-1)
        ref = x.float() @ ((q.view(64, 2, 128) - 8) * s + z).view(64, 256).T
        ok = torch.allclose(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    except (RuntimeError, AssertionError) as e:
        return False, f"aten._weight_int4pack_mm refused a trial: {str(e).splitlines()[0][:120]}"
    return (True, "aten._weight_int4pack_mm matched fp32 on a trial matrix") if ok else \
        (False, "aten._weight_int4pack_mm gave wrong results on a trial matrix")


def _cpu_flags() -> tuple[str, ...]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return tuple(flag for flag in _INTERESTING_FLAGS if flag in have)
    except OSError:
        pass
    return ()


# ---- the inference plan ---------------------------------------------------------------------------------------
# kv_b_proj is kept in its stored dtype by packing, int8 and int4: prefill decompresses the cache with it, and decode
# uses its per-head slices (W_UK, W_UV^T), which prepare_attention copies out in the compute dtype. Quantizing it
# too costs accuracy for little memory (<1% of V2-Lite's weights): KL to bf16 +6% in int4, +15% in int8 (measured)
KEEP_PLAIN = ("kv_b_proj",)
# an int4 plan keeps these in int8: on the shipped (trained) model an int4 lm_head alone takes the KL to bf16 from
# 0.0037 to 0.0100 nats (groups of 64; an int8 lm_head: as bf16), for 3% of V2-Lite's weights
# (benchmarks/quant_kernels.py measures both)
INT4_AS_INT8 = ("lm_head",)

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "half": torch.float16,
           "fp16": torch.float16, "float32": torch.float32, "float": torch.float32, "fp32": torch.float32}
QUANTIZATIONS = ("int8", "int4")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    """A dtype name or torch dtype -> torch dtype; "auto" -> None (the plan decides)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: use auto or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


@dataclass(frozen=True)
class InferencePlan:
    """How a model is stored and multiplied for inference on one device.

    weights: "packed"  -- bf16/fp16 weights reordered into oneDNN's blocked layout (x86 with oneDNN bf16)
             "upcast"  -- bf16/fp16 weights kept compact; a few rows (decode) run torch's half-precision GEMV, more
                          rows multiply in fp32 with the weight converted per call (CPUs without fast bf16 GEMMs)
             "int8"    -- int8 weights with a scale per output row (quantization="int8")
             "int4"    -- int4 weights in groups of `group_size` inputs, a scale and zero each (quantization="int4")
             "plain"   -- nn.Linear in the weight dtype (fp32, CUDA, or what was asked for)
    """
    device: str
    weight_dtype: torch.dtype  # the dtype weights are loaded in (int8 / int4 quantize the matrices from it)
    compute_dtype: torch.dtype  # activations, the residual stream, attention
    cache_dtype: torch.dtype  # the latent cache
    weights: str
    quantization: str | None
    int8_kernel: bool  # int8 decode rows through aten._weight_int8pack_mm (else dequantize)
    gemv_rows: int = GEMV_ROWS
    notes: tuple[str, ...] = ()
    int4_kernel: bool = False  # int4 through torch's int4 kernel (CPU: decode rows; CUDA: all rows)
    group_size: int | None = None  # int4: inputs per (scale, zero) pair
    cpu_experts_kernel: bool = False  # routed experts of few tokens through kernels/moe_cpu.cpp (kept plain for it)
    upcast_kernel_rows: int = UPCAST_KERNEL_ROWS  # upcast linears / MLPs of up to this many rows through that kernel

    def kernels(self) -> dict[str, str]:
        """Each kind of matmul -> the kernel that runs it, readable."""
        from .kernels.cpu_moe import EXPERT_ROWS, MLP_ROWS
        c, w = _name(self.compute_dtype), _name(self.weight_dtype)
        kernel = self.weights == "upcast" and self.cpu_experts_kernel and self.upcast_kernel_rows > 0
        limit = self.upcast_kernel_rows if kernel else self.gemv_rows
        few, many = f"<= {limit} rows (decode)", f"> {limit} rows (prefill, big batches)"
        mlp_rows = self.upcast_kernel_rows if kernel else MLP_ROWS
        if self.weights == "packed":
            gemv = gemm = f"oneDNN {w} matmul on prepacked (blocked) weights"
        elif self.weights == "upcast" and kernel:
            gemv = f"one C++ call (kernels/moe_cpu.cpp): {c} activations over the {w} weight, read once for all rows"
            gemm = f"fp32 GEMM: the {w} weight converted to fp32 for each call"
        elif self.weights == "upcast":
            gemv = f"torch {w} GEMV: activations rounded to {w}, fp32 accumulation, output back to {c}"
            gemm = f"fp32 GEMM: the {w} weight converted to fp32 for each call"
        elif self.weights == "int8":
            gemv = ("aten._weight_int8pack_mm (int8 weights dequantized in the kernel, bf16 activations)"
                    if self.int8_kernel else f"dequantize by tiles of rows to {c}, {c} matmul on each")
            gemm = f"dequantize by tiles of rows to {c}, {c} matmul on each"
        elif self.weights == "int4":
            groups = f"int4 in groups of {self.group_size}"
            gemm = f"{groups} dequantized by tiles of rows to {c}, {c} matmul on each"
            if self.int4_kernel and self.device.startswith("cuda"):
                gemv = gemm = f"aten._weight_int4pack_mm ({groups} dequantized in the kernel, bf16 activations)"
            elif self.int4_kernel:
                gemv = f"aten._weight_int4pack_mm_for_cpu ({groups} dequantized in the kernel, bf16 activations)"
            else:
                gemv = gemm
        else:
            gemv = gemm = f"torch {c} matmul" + (" (cuBLAS)" if self.device.startswith("cuda") else "")
        return {
            f"linear {few}": gemv,
            f"linear {many}": gemm,
            "routed experts": (f"up to {EXPERT_ROWS} tokens: one C++ call a layer over all chosen experts on their "
                               "stacked weights (kernels/moe_cpu.cpp); more: tokens grouped by expert, each group "
                               + (f"through torch's {w} matmul" if self.weights == "packed" else
                                  "through the linear kernels above")) if self.cpu_experts_kernel else
                              "tokens grouped by expert, each group through the linear kernels above",
            **({"dense / shared MLPs": f"up to {mlp_rows} rows: one C++ call (kernels/moe_cpu.cpp); more: "
                                       "the linear kernels above"}
               if self.cpu_experts_kernel and self.weights in ("plain", "upcast") else {}),
            "router": "fp32 matmul and softmax (weights kept fp32)",
            "prefill attention": f"scaled_dot_product_attention in {c} (v padded to the q/k head dim)",
            "decode attention": f"absorbed MLA over the {_name(self.cache_dtype)} latent cache, scores and softmax "
                                "in fp32",
        }

    def formats(self) -> dict[str, str]:
        """Each kind of weight -> how it is stored (model/inference.py applies this)."""
        w = _name(self.weight_dtype)
        kinds = "attention projections, dense MLPs, shared and routed experts"
        plain = {f"{', '.join(KEEP_PLAIN)}, embedding, norms": w, "router": "float32"}
        if self.weights == "int4":
            return {kinds: f"int4, groups of {self.group_size} (a bf16 scale and zero each)",
                    ", ".join(INT4_AS_INT8): "int8, a scale per output row", **plain}
        if self.weights == "int8":
            return {f"{kinds}, lm_head": "int8, a scale per output row", **plain}
        if self.weights == "packed" and self.cpu_experts_kernel:
            return {"attention projections, dense MLPs, shared experts, lm_head": f"{w}, oneDNN-prepacked",
                    "routed experts": f"{w}, stacked (for kernels/moe_cpu.cpp)", **plain}
        if self.weights == "packed":
            return {f"{kinds}, lm_head": f"{w}, oneDNN-prepacked", **plain}
        return {f"{kinds}, lm_head, {', '.join(KEEP_PLAIN)}, embedding, norms": w, "router": "float32"}

    def as_dict(self) -> dict:
        return {"device": self.device, "weight_dtype": _name(self.weight_dtype),
                "compute_dtype": _name(self.compute_dtype), "cache_dtype": _name(self.cache_dtype),
                "weights": self.weights, "quantization": self.quantization, "gemv_rows": self.gemv_rows,
                "int8_kernel": self.int8_kernel, "int4_kernel": self.int4_kernel, "group_size": self.group_size,
                "cpu_experts_kernel": self.cpu_experts_kernel,
                "formats": self.formats(), "kernels": self.kernels(), "notes": list(self.notes)}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def inference_plan(device: str | torch.device, dtype: str | torch.dtype = "auto", quantization: str | None = None,
                   cpu_weight_packing: bool | None = None, capability: CpuCapability | None = None,
                   group_size: int | None = None) -> InferencePlan:
    """The fastest faithful way to run a model on `device` with what the user asked for.

    dtype "auto": bf16 weights everywhere (the published checkpoints' dtype); computed in bf16 on CUDA and on CPUs
    with fast bf16 GEMMs, in fp32 elsewhere. An explicit dtype means weights *and* compute in that dtype.
    quantization "int8" / "int4": weight-only int8 / int4 matrices (group_size: int4's group, default
    INT4_GROUP_SIZE); compute as for "auto" unless a dtype is given.
    cpu_weight_packing: None = where oneDNN takes the weights; False = never; True = required (error if not possible).
    """
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not supported; use one of {list(QUANTIZATIONS)} "
                         "(weight-only: int8 per output row, int4 in groups) or None")
    if group_size is not None and (quantization != "int4" or group_size not in INT4_GROUP_SIZES):
        raise ValueError(f"group_size={group_size}: int4 takes one of {list(INT4_GROUP_SIZES)}" if
                         quantization == "int4" else f"group_size={group_size} is for quantization='int4' only")
    device = torch.device(device)
    asked = parse_dtype(dtype)
    if quantization is not None:
        return _quantized_plan(device, asked, quantization, cpu_weight_packing, capability,
                               group_size or INT4_GROUP_SIZE)
    notes: list[str] = []
    if device.type != "cpu":
        d = asked or torch.bfloat16
        if cpu_weight_packing:
            raise ValueError("cpu_weight_packing=True needs device='cpu'")
        return InferencePlan(str(device), d, d, d, "plain", None, False)

    cap = capability or cpu_capability()
    fast = {torch.bfloat16: cap.fast_bf16, torch.float16: cap.fast_fp16, torch.float32: True}
    weight = asked or torch.bfloat16
    if asked is None and not cap.fast_bf16:
        compute = torch.float32  # keep the weights compact, compute where this CPU is fast
        notes.append(f"no fast bf16 GEMM on this CPU ({cap.reasons['fast_bf16']}): bf16 weights, fp32 compute")
    else:
        compute = weight
        if not fast[weight]:
            notes.append(f"{_name(weight)} was asked for, but this CPU has no fast {_name(weight)} GEMM: prefill "
                         "will be slow; dtype auto keeps bf16 weights and computes in fp32")
    cache = weight  # compact where the weights are: an "upcast" model caches bf16 latents
    can_pack = cap.onednn_bf16 and weight == torch.bfloat16 and compute == torch.bfloat16
    if cpu_weight_packing and not can_pack:
        why = cap.reasons["onednn_bf16"] if not cap.onednn_bf16 else "it packs bf16 weights computed in bf16 only"
        raise ValueError(f"cpu_weight_packing=True is not possible here: {why}")
    experts = weight in (torch.bfloat16, torch.float32) and cpu_experts_kernel()
    if can_pack and cpu_weight_packing is not False:
        return InferencePlan("cpu", weight, compute, cache, "packed", None, False, notes=tuple(notes),
                             cpu_experts_kernel=experts)
    if compute == torch.float32 and weight != torch.float32:
        return InferencePlan("cpu", weight, compute, cache, "upcast", None, False, gemv_rows=UPCAST_GEMV_ROWS,
                             notes=tuple(notes), cpu_experts_kernel=experts)
    return InferencePlan("cpu", weight, compute, cache, "plain", None, False, notes=tuple(notes),
                         cpu_experts_kernel=experts)


def cpu_experts_kernel() -> bool:
    """Whether kernels/moe_cpu.cpp is built here (builds it at the first call, ~2 s; cached on disk after)."""
    from .kernels import cpu_moe
    return cpu_moe.kernel() is not None


def _quantized_plan(device: torch.device, asked: torch.dtype | None, quantization: str,
                    cpu_weight_packing: bool | None, capability: CpuCapability | None,
                    group_size: int) -> InferencePlan:
    """int8 / int4 weights; the embedding and norms stay in the stored dtype (bf16 unless a dtype is given)."""
    if cpu_weight_packing:
        raise ValueError(f"cpu_weight_packing=True and quantization={quantization!r} exclude each other: quantized "
                         "weights are not prepacked")
    stored = asked or torch.bfloat16  # what the matrices are quantized from
    group = group_size if quantization == "int4" else None
    notes: list[str] = []
    if device.type != "cpu":
        int4, why = int4_cuda_kernel(str(device)) if device.type == "cuda" and quantization == "int4" else \
            (False, f"no int4 kernel for {device.type}")
        if quantization == "int8":
            notes.append("int8 decode rows dequantize on this device")
        elif not int4:
            notes.append(f"int4 kernel unavailable ({why}): every product dequantizes by tiles")
        return InferencePlan(str(device), stored, stored, stored, quantization, quantization, False,
                             notes=tuple(notes), int4_kernel=int4, group_size=group)

    cap = capability or cpu_capability()
    compute = asked or (torch.bfloat16 if cap.fast_bf16 else torch.float32)
    # the kernels take bf16 activations (they are many times slower in fp32): with an explicit fp32, dequantize
    int8 = cap.int8_gemv and asked != torch.float32
    int4 = cap.int4_kernel and asked != torch.float32
    have, why = (cap.int8_gemv, cap.reasons.get("int8_gemv")) if quantization == "int8" else \
        (cap.int4_kernel, cap.reasons.get("int4_kernel"))
    if not have:
        notes.append(f"{quantization} kernel unavailable ({why}): decode dequantizes by tiles (slower)")
    elif asked == torch.float32:
        notes.append(f"dtype float32 asked for: {quantization} decode rows dequantize to fp32 (the {quantization} "
                     "kernel rounds activations to bf16)")
    rows = INT4_KERNEL_ROWS if quantization == "int4" else GEMV_ROWS
    return InferencePlan("cpu", stored, compute, stored, quantization, quantization, int8, gemv_rows=rows,
                         notes=tuple(notes), int4_kernel=int4, group_size=group)
