"""Quantized checkpoints users can share: `dsv2 quantize IN OUT --quantization int4|int8` writes one, and dsv2's
engine (LLM, load_for_inference, every command that runs a model) reads it as stored -- no re-quantizing.

    write_quantized("~/models/V2-Lite", "~/models/V2-Lite-int4", "int4")   # read a part, quantize, write, release
    model = load_for_inference("~/models/V2-Lite-int4", plan)             # sees quantization_config: load_quantized

The directory has the Hugging Face layout -- config.json, safetensors (shards + model.safetensors.index.json above
5 GB), the tokenizer and generation_config.json copied -- and config.json says what it holds:

    "quantization_config": {"quant_method": "dsv2", "format": "int4", "group_size": 64, "zero_point": true, ...}

Tensors keep the published names. A matrix X.weight [N, K] that the format quantizes is stored as
    int8: X.qweight I8 [N, K], X.scales F32 [N]                        W = qweight * scales[:, None]
    int4: X.qweight U8 [N, K/2] (k even in the low nibble, odd in the high), X.scales and X.zeros BF16 [N, K/g]
                                                                       W[n, k] = (q[n, k] - 8) * scales[n, k // g]
                                                                                 + zeros[n, k // g]
and what the format keeps (embedding, norms, router, kv_b_proj, biases) as X.weight / X.bias in the stored dtype.
Codes and scales only, so a file is the same whichever machine wrote it: the layouts a machine's kernels want
(torch's int4 packing for this CPU level, the int8 kernel's bf16 scales) and what is derived (the absorbed W_UK /
W_UV^T from kv_b_proj) are rebuilt on load. Which matrices are int4, int8 or kept is model/inference.py's choice;
the loader builds the model's quantized structure on the meta device with the same code and checks every stored
name, shape and dtype against it before reading, so a file from a dsv2 that chose differently is refused by name.

Writing streams (engine/prepare.stream_parts): each part of the source is read, quantized as the plan says and
written, then released, so `dsv2 quantize` holds about one part, never the model. Shards are written as their
tensors come: the sizes are known in advance from the structure on meta.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct

import torch
from torch import nn

from .. import __version__
from ..capability import INT4_AS_INT8, KEEP_PLAIN, QUANTIZATIONS, InferencePlan, inference_plan, parse_dtype
from ..checkpoint import (INDEX_FILE, SINGLE_FILE, CheckpointError, checkpoint_files, expected_keys, is_weight_file,
                          load_targets, read_header, resolve_model_path)
from ..config import ModelConfig
from ..fileio import atomic_directory
from ..model import Transformer, build_model
from ..model.inference import prepare_embedding, prepare_part
from ..model.int4 import Int4Experts, Int4Linear, Int4MLP, pack, unpack_nibbles
from ..model.mla import MLA
from ..model.quant import Int8Experts, Int8Linear, Int8MLP
from ..model.upcast import Workspace
from ..parallel.tensor_parallel import ParallelContext
from ..progress import Progress
from .prepare import LAYERS, _convert_child, release_freed_memory, stream_parts, top_part

METHOD = "dsv2"
# config.json's model_type in a quantized directory. transformers skips a quant_method it does not know with a
# warning and loads the model with every quantized matrix left at its random init; under a model_type it does not
# know, AutoConfig / AutoModelForCausalLM refuse the directory instead ("... has model type
# `deepseek_v2_dsv2_quantized` but Transformers does not recognize this architecture"), and so do other tools
MODEL_TYPE = "deepseek_v2_dsv2_quantized"
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
              torch.uint8: "U8"}


def quantization_config(directory: str) -> dict | None:
    """config.json's quantization_config when it is dsv2's (a dict with quant_method "dsv2"), else None."""
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            quant = json.load(f).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    return quant if isinstance(quant, dict) and quant.get("quant_method") == METHOD else None


def checkpoint_plan(directory: str, plan: InferencePlan) -> InferencePlan:
    """The plan to load `directory` with: `plan` itself for a plain checkpoint, or for a dsv2-quantized one the
    plan of its format (the caller's device and dtype kept). Asking for another quantization than the stored one is
    an error: the codes cannot be turned into another format without the original weights."""
    quant = quantization_config(directory)
    if quant is None:
        return plan
    fmt, group = quant.get("format"), quant.get("group_size")
    if fmt not in QUANTIZATIONS:
        raise CheckpointError(f"{directory}/config.json: quantization_config format {fmt!r} is not one this dsv2 "
                              f"reads ({', '.join(QUANTIZATIONS)}); a newer dsv2 may have written it")
    if plan.quantization not in (None, fmt):
        raise ValueError(f"{directory} holds {fmt} weights (written by `dsv2 quantize`), but {plan.quantization} was "
                         f"asked for: drop --quantization (or pass {fmt}), or quantize the original checkpoint with "
                         f"`dsv2 quantize ORIGINAL OUT --quantization {plan.quantization}`")
    if plan.quantization == fmt:
        return plan if fmt != "int4" or plan.group_size == group else dataclasses.replace(plan, group_size=group)
    # the dtype that was asked for, as the plan shows it: compute == weights unless "auto" chose to upcast
    asked = plan.compute_dtype if plan.compute_dtype == plan.weight_dtype else "auto"
    return inference_plan(plan.device, asked, fmt, group_size=group if fmt == "int4" else None)


# ---- where each stored tensor lives in a prepared model ----------------------------------------------------------
def stored_tensors(part: dict[str, nn.Module], plain_keys: set[str], codes=lambda m: m.qweight
                   ) -> dict[str, torch.Tensor]:
    """Stored key -> the view of a prepared part (module path -> module, as stream_parts yields) that it is: rows of
    a fused matrix, one expert of a stack, scales transposed out of int4's [G, N, 2]. codes(m) gives an int4
    module's codes in the portable layout [*S, N, K/2] (its qweight when it has that layout; a loader passes
    staging buffers for the others). plain_keys: the published checkpoint's keys, which say which biases exist."""
    out: dict[str, torch.Tensor] = {}

    def matrix(m: nn.Module, pieces: list[tuple[str, int, int | None]], member: int | None = None,
               q8: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """pieces: (published name, first row, end row) of the one quantized matrix m holds (member of a stack)."""
        if q8 is not None:
            q, s = q8 if member is None else (q8[0][member], q8[1][member])
        else:
            q, sz = codes(m), m.scale_zeros
            q, sz = (q, sz) if member is None else (q[member], sz[member])
        bias = getattr(m, "bias", None)
        for name, a, b in pieces:
            out[f"{name}.qweight"] = q[a:b]
            if q8 is not None:
                out[f"{name}.scales"] = s[a:b]
            else:
                out[f"{name}.scales"], out[f"{name}.zeros"] = sz[:, a:b, 0].T, sz[:, a:b, 1].T  # [n, G]
            if bias is not None and f"{name}.bias" in plain_keys:
                out[f"{name}.bias"] = bias.data[a:b]

    def walk(m: nn.Module, name: str) -> None:
        if isinstance(m, MLA) and m.fused_input:  # input_proj = [q_proj or q_a_proj | kv_a_proj_with_mqa]
            n_q = m.input_proj.out_features - m.rank - m.rope
            first = f"{name}.q_proj" if m.q_lora_rank is None else f"{name}.q_a_proj"
            linear(m.input_proj, [(first, 0, n_q), (f"{name}.kv_a_proj_with_mqa", n_q, None)])
            for child, sub in m.named_children():  # w_uk / w_uv_t are buffers derived from kv_b_proj: not stored
                if child != "input_proj":
                    walk(sub, f"{name}.{child}")
        elif isinstance(m, Int4MLP):
            half = m.gate_up.out_features // 2
            matrix(m.gate_up, [(f"{name}.gate_proj", 0, half), (f"{name}.up_proj", half, None)])
            matrix(m.down, [(f"{name}.down_proj", 0, None)])
        elif isinstance(m, Int8MLP):
            half = m.gate_up.shape[0] // 2
            matrix(m, [(f"{name}.gate_proj", 0, half), (f"{name}.up_proj", half, None)],
                   q8=(m.gate_up, m.gate_up_scale))
            matrix(m, [(f"{name}.down_proj", 0, None)], q8=(m.down, m.down_scale))
        elif isinstance(m, (Int4Experts, Int8Experts)):
            int4 = isinstance(m, Int4Experts)
            half = (m.gate_up.out_features if int4 else m.gate_up.shape[1]) // 2
            for e in range(m.n_experts):
                gate_up = [(f"{name}.{e}.gate_proj", 0, half), (f"{name}.{e}.up_proj", half, None)]
                down = [(f"{name}.{e}.down_proj", 0, None)]
                if int4:
                    matrix(m.gate_up, gate_up, e)
                    matrix(m.down, down, e)
                else:
                    matrix(m, gate_up, e, q8=(m.gate_up, m.gate_up_scale))
                    matrix(m, down, e, q8=(m.down, m.down_scale))
        elif isinstance(m, (Int4Linear, Int8Linear)):
            linear(m, [(name, 0, None)])
        else:  # kept as published: its own parameters (the checkpoint has no buffers), then its children
            for p, t in m.named_parameters(recurse=False):
                out[f"{name}.{p}"] = t.data
            for child, sub in m.named_children():
                walk(sub, f"{name}.{child}")

    def linear(m: nn.Module, pieces: list[tuple[str, int, int | None]]) -> None:
        matrix(m, pieces, q8=(m.qweight, m.qweight_scale) if isinstance(m, Int8Linear) else None)

    for path, module in part.items():
        walk(module, path)
    return out


def _prepared_on_meta(cfg: ModelConfig, plan: InferencePlan) -> tuple[Transformer, list[dict[str, nn.Module]]]:
    """The model in the plan's inference structure on the meta device (no memory), made by the same conversions as
    a streaming load (stream_parts), and its parts in the same order."""
    model = build_model(cfg, dtype=plan.weight_dtype, device="meta", init=False).eval()
    workspace = Workspace()
    _convert_child(model, "lm_head", plan, workspace)
    for block in model.model.layers:
        prepare_part(block, plan, workspace)
    return model, [top_part(model)] + [{f"{LAYERS}{i}": b} for i, b in enumerate(model.model.layers)]


def _plain_keys(cfg: ModelConfig) -> set[str]:
    return set(expected_keys(cfg))


def _layout(cfg: ModelConfig, plan: InferencePlan) -> tuple[Transformer, list[dict[str, nn.Module]], list[dict]]:
    """(meta model, its parts, per part: stored key -> its meta view) -- what a checkpoint of this plan holds."""
    model, parts = _prepared_on_meta(cfg, plan)
    plain = _plain_keys(cfg)
    per_part = [stored_tensors(p, plain) for p in parts]
    stored = {k for views in per_part for k in views}
    covered = {k for k in stored if not k.endswith((".qweight", ".scales", ".zeros"))}
    covered |= {k.removesuffix(".qweight") + ".weight" for k in stored if k.endswith(".qweight")}
    want = plain | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    if covered != want:  # a module kind stored_tensors does not know: fail loudly, never write a partial file
        raise RuntimeError(f"internal: the quantized layout does not cover the model: missing "
                           f"{sorted(want - covered)[:3]}, extra {sorted(covered - want)[:3]}")
    return model, parts, per_part


# ---- writing -----------------------------------------------------------------------------------------------------
class _ShardWriter:
    """One safetensors file written tensor by tensor, in a fixed order: the header (names, dtypes, shapes, offsets)
    goes first, so no tensor is held after it is written."""

    def __init__(self, path: str, entries: list[tuple[str, tuple[int, ...], torch.dtype]]):
        header, offset = {"__metadata__": {"format": "pt", "quant_method": METHOD}}, 0
        for key, shape, dtype in entries:
            n = _numel(shape) * dtype.itemsize
            header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.path, self.entries, self.done, self.nbytes = path, entries, 0, offset
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, key: str, t: torch.Tensor) -> None:
        want, shape, dtype = self.entries[self.done]
        if key != want or tuple(t.shape) != shape or t.dtype != dtype:
            raise RuntimeError(f"internal: writing {key!r} {tuple(t.shape)} {t.dtype} where {self.path} expects "
                               f"{want!r} {shape} {dtype}")
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            self.file.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self.done += 1
        if self.done == len(self.entries):
            self.file.close()

    def close(self) -> None:
        self.file.close()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _shards(entries: list[tuple[str, tuple, torch.dtype]], max_bytes: int) -> list[list]:
    shards, current, size = [], [], 0
    for e in entries:
        n = _numel(e[1]) * e[2].itemsize
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += n
    return shards + [current]


def writing_plan(quantization: str, dtype: str | torch.dtype = "bfloat16", group_size: int | None = None
                 ) -> InferencePlan:
    """The plan `dsv2 quantize` converts with: the format's, on the CPU, with the kernels off -- the stored form
    is the portable one whatever this machine runs (and nothing is packed only to be unpacked for writing)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}")
    weight = parse_dtype(dtype)
    if weight is None or not weight.is_floating_point:
        raise ValueError(f"--dtype {dtype!r}: the dtype the kept weights are stored in: bfloat16, float16 or float32")
    plan = inference_plan("cpu", weight, quantization, group_size=group_size)
    return dataclasses.replace(plan, int8_kernel=False, int4_kernel=False)


def write_quantized(source: str, out: str, quantization: str, group_size: int | None = None,
                    dtype: str | torch.dtype = "bfloat16", max_shard_bytes: int = 5 << 30,
                    progress: bool = False) -> dict:
    """Quantize the checkpoint at `source` into a new directory `out` (replaced as a whole, atomically: a crash
    leaves the old `out` or none). Returns the quantization_config written."""
    src = resolve_model_path(source)
    if quantization_config(src) is not None:
        raise ValueError(f"{src} is already quantized ({quantization_config(src).get('format')}, by `dsv2 "
                         "quantize`): quantize the original checkpoint instead")
    if os.path.realpath(src) == os.path.realpath(os.path.expanduser(out)):
        raise ValueError(f"the output directory is the input {src}: write the quantized model elsewhere")
    plan = writing_plan(quantization, dtype, group_size)
    cfg = ModelConfig.from_pretrained(src)
    _, _, per_part = _layout(cfg, plan)
    entries = [(k, tuple(t.shape), t.dtype) for views in per_part for k, t in views.items()]
    shards = _shards(entries, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    plain = _plain_keys(cfg)
    quant = {"quant_method": METHOD, "format": quantization, "bits": 4 if quantization == "int4" else 8,
             "group_size": plan.group_size, "zero_point": quantization == "int4",
             "modules_in_int8": list(INT4_AS_INT8) if quantization == "int4" else [],
             "modules_not_converted": _kept_modules(entries),
             "kept_dtype": str(plan.weight_dtype).removeprefix("torch."), "format_version": 1,
             "dsv2_version": __version__}
    with atomic_directory(out) as staging:
        writers = [_ShardWriter(os.path.join(staging, n), s) for n, s in zip(names, shards)]
        where = {e[0]: w for w, s in zip(writers, shards) for e in s}
        try:
            for _, part in stream_parts(src, plan, progress=progress, desc=f"quantizing to {quantization}"):
                for key, t in stored_tensors(part, plain).items():
                    where[key].write(key, t)
                for m in part.values():
                    m.to_empty(device="meta")  # written: release it before the next part is read
                release_freed_memory()
        finally:
            for w in writers:
                w.close()
        unwritten = [w.entries[w.done][0] for w in writers if w.done < len(w.entries)]
        if unwritten:
            raise RuntimeError(f"internal: {unwritten[:3]} were never written")
        if len(shards) > 1:
            with open(os.path.join(staging, INDEX_FILE), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": sum(w.nbytes for w in writers)},
                           "weight_map": {e[0]: n for n, s in zip(names, shards) for e in s}}, f, indent=2)
        _write_config(src, staging, quant, plan.weight_dtype)
        _copy_others(src, staging)
    return quant


def _kept_modules(entries) -> list[str]:
    """The modules stored as published (layer numbers as *): the embedding, norms, router, kv_b_proj."""
    kept = {k.rsplit(".", 1)[0] for k, _, _ in entries if k.endswith(".weight")}
    return sorted({".".join("*" if p.isdigit() else p for p in k.split(".")) for k in kept})


def _write_config(src: str, staging: str, quant: dict, dtype: torch.dtype) -> None:
    """The source's config.json as it is (keys dsv2 does not use stay), with quantization_config and torch_dtype."""
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        d = json.load(f)
    d.pop("auto_map", None)  # remote code cannot read this format either
    d["model_type"] = MODEL_TYPE
    d["torch_dtype"] = str(dtype).removeprefix("torch.")
    d["quantization_config"] = quant
    with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as f:
        json.dump(d, f, indent=2)
        f.write("\n")


def _copy_others(src: str, staging: str) -> None:
    """The tokenizer, generation_config.json, a README, ...: every file beside the weights but config.json and
    Python code (remote code for the original layout)."""
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if (os.path.isfile(path) and not is_weight_file(name) and name != "config.json" and not name.endswith(".py")
                and not name.startswith(".")):
            shutil.copy2(path, os.path.join(staging, name))


# ---- loading -----------------------------------------------------------------------------------------------------
def load_quantized(directory: str, plan: InferencePlan, parallel: ParallelContext | None = None,
                   progress: bool = False) -> Transformer:
    """A checkpoint written by write_quantized, in `plan`'s inference form (checkpoint_plan adapts a plan asked
    without quantization): built on meta in the quantized structure, then part by part allocated and read in
    place; kernel layouts and derived buffers rebuilt. Every file is checked before a byte of weight is read."""
    if parallel is not None and parallel.world_size > 1:
        raise ValueError(f"{directory} is quantized (by `dsv2 quantize`); tensor-parallel loads of quantized "
                         "checkpoints are not supported: run it in one process, or load the original checkpoint "
                         "with --tensor-parallel-size and --quantization")
    plan = checkpoint_plan(directory, plan)
    cfg = ModelConfig.from_pretrained(directory)
    files = checkpoint_files(directory)
    model, parts, per_part = _layout(cfg, plan)
    _validate(directory, files, {k: t for views in per_part for k, t in views.items()})
    plain = _plain_keys(cfg)
    bar = Progress(len(parts), "loading weights", unit="parts", enabled=progress)
    for part in parts:
        staged: dict[Int4Linear, torch.Tensor] = {}

        def codes(m: Int4Linear) -> torch.Tensor:
            if m.layout.kind == "plain":
                return m.qweight
            if m not in staged:  # read in the portable layout, packed for this machine below
                staged[m] = torch.empty(*m.scale_zeros.shape[:-3], m.out_features, m.in_features // 2,
                                        dtype=torch.uint8, device=m.qweight.device)
            return staged[m]

        for m in part.values():
            m.to_empty(device=plan.device)
            for sub in m.modules():
                if isinstance(sub, (Int4Linear, Int8Linear)) and sub.bias is not None:
                    sub.bias.data.zero_()  # a fused bias whose half the checkpoint does not have (q_proj)
        load_targets(files, stored_tensors(part, plain, codes))
        with torch.no_grad():
            for m, portable in staged.items():
                for e in range(m.stack or 1):
                    p = portable if m.stack is None else portable[e]
                    dest = m.qweight if m.stack is None else m.qweight[e]
                    dest.copy_(pack(unpack_nibbles(p), m.layout).view(dest.shape))
            for m in part.values():
                _derive(m)
        del staged
        release_freed_memory()
        bar.update(1)
    bar.close()
    model.requires_grad_(False)
    return prepare_embedding(model, plan).eval()


def _derive(part: nn.Module) -> None:
    """What is not stored: the absorbed W_UK / W_UV^T (per-head slices of kv_b_proj, in the compute dtype, as
    model/inference.fused_attention makes them), and the int8 kernel's bf16 scales (model/quant.py names them
    <name>_kernel_scale, beside <name>_scale)."""
    for m in part.modules():
        if isinstance(m, MLA) and m.fused_input:
            w = m.kv_b_proj.weight.unflatten(0, (-1, m.nope + m.v_dim))  # [n, Dn + Dv, R]
            m.w_uk.copy_(w[:, :m.nope])
            m.w_uv_t.copy_(w[:, m.nope:].transpose(1, 2))
        for name, buf in m.named_buffers(recurse=False):
            if name.endswith("_kernel_scale") and buf is not None:
                buf.copy_(getattr(m, name.removesuffix("_kernel_scale") + "_scale"))


def _validate(directory: str, files: dict[str, str], expected: dict[str, torch.Tensor]) -> None:
    """Every stored tensor against the structure this dsv2 builds for the format, before anything is read; names
    the file and key of what is wrong."""
    headers = {f: read_header(f) for f in sorted(set(files.values()))}  # catches truncated files, by name
    missing = [k for k in expected if k not in files]
    redo = "re-run `dsv2 quantize` on the original checkpoint"
    if missing:
        raise CheckpointError(f"{directory}: {len(missing)} quantized tensor(s) missing, e.g. {missing[:3]}; the "
                              f"checkpoint is incomplete or was written for another config.json: {redo}")
    unexpected = [k for k in files if k not in expected]
    if unexpected:
        raise CheckpointError(f"{files[unexpected[0]]}: {len(unexpected)} tensor(s) this dsv2 does not expect in "
                              f"its layout, e.g. {unexpected[:3]} (another dsv2 version, or another config.json?): "
                              f"{redo}")
    for key, file in files.items():
        info = headers[file].get(key)
        if info is None:
            raise CheckpointError(f"{file}: the index says it holds {key!r}, but it does not")
        want = expected[key]
        stored = _ST_DTYPES.get(want.dtype)
        plain_float = want.dtype.is_floating_point and not key.endswith((".scales", ".zeros"))
        if tuple(info["shape"]) != tuple(want.shape) or (
                info["dtype"] != stored and not (plain_float and info["dtype"] in ("F32", "F16", "BF16"))):
            raise CheckpointError(f"{file}: {key!r} is {info['dtype']} {tuple(info['shape'])}, expected {stored} "
                                  f"{tuple(want.shape)} for this config.json and format: {redo}")
