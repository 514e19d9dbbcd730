"""Hugging Face safetensors checkpoints (one file, or shards + model.safetensors.index.json) <-> Transformer.

Loading validates every file's header against the model the config describes (names, shapes, dtypes, sizes) before
a byte of weight is read, then streams tensor by tensor (plain reads, no mmap) into a model allocated once in the
target dtype, so peak memory stays near one copy of the model (measured: 1.09x, benchmarks/load_memory.py). Per-expert checkpoint tensors are copied straight into their slice of the
stacked expert weights. Nothing from the model directory is ever executed (no pickles, no remote code).
"""
from __future__ import annotations

import json
import os
import re
import struct
from collections import defaultdict
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .fileio import atomic_directory, interrupted_swap
from .model import Transformer, build_model
from .model.moe import Experts
from .progress import Progress

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                 "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names the file and key."""


def checkpoint_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Published key -> the tensor (or slice of a stacked expert tensor) of `model` it corresponds to.
    Loading copies into these views; saving writes them out."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            I = module.down_proj.shape[-1]
            for e in range(module.gate_up_proj.shape[0]):
                out[f"{name}.{e}.gate_proj.weight"] = module.gate_up_proj.data[e, :I]
                out[f"{name}.{e}.up_proj.weight"] = module.gate_up_proj.data[e, I:]
                out[f"{name}.{e}.down_proj.weight"] = module.down_proj.data[e]
    for name, p in model.named_parameters():
        if ".experts." not in name and not (name == "lm_head.weight" and model.config.tie_word_embeddings):
            out[name] = p.data
    return out


def expected_keys(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight name a checkpoint for `cfg` holds, with its shape (no memory allocated)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in checkpoint_tensors(model).items()}


# ---- locating and validating files -------------------------------------------------------------------------
def resolve_model_path(path: str | os.PathLike) -> str:
    """A local directory as is; otherwise a Hugging Face repo id resolved through huggingface_hub's cache."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if (advice := interrupted_swap(path)) is not None:
        raise CheckpointError(f"no model directory at {path}: {advice}")
    if os.path.exists(path):
        raise CheckpointError(f"{path} is a file; pass the model directory that holds config.json and *.safetensors")
    if not _HUB_ID.match(path):
        raise CheckpointError(f"no model directory at {path!r}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{path!r} is not a local directory; to use a Hugging Face repo id install "
                              "huggingface_hub (pip install 'dsv2[hub]') or download it and pass the directory") from None
    patterns = ["*.json", "*.safetensors", "tokenizer*"]
    try:
        return snapshot_download(path, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot_download(path, allow_patterns=patterns)
    except Exception as e:
        raise CheckpointError(
            f"{path!r} is neither a local directory nor in the Hugging Face cache, and downloading it failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). On a connected machine run "
            f"`huggingface-cli download {path}`, or pass a local directory.") from None


def read_header(file: str, with_offset: bool = False):
    """Parse a safetensors header and check it against the file size (catches truncated and garbage files).
    With with_offset, also return where the tensor data starts."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: only {size} bytes, not a safetensors file (truncated?)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100 << 20:
                raise CheckpointError(f"{file}: header length {n} does not fit in a {size}-byte file (truncated or not safetensors)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_size, end_max, last = size - 8 - n, 0, None
    for key, info in header.items():
        try:
            begin, end = info["data_offsets"]
            numel = 1
            for d in info["shape"]:
                numel *= d
            nbytes = numel * _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: corrupt header entry for {key!r}: {info!r}") from None
        if end - begin != nbytes:
            raise CheckpointError(f"{file}: {key!r} claims {end - begin} bytes but shape {info['shape']} "
                                  f"{info['dtype']} needs {nbytes} (corrupt file)")
        if end > data_size and (last is None or begin < header[last]["data_offsets"][0]):
            last = key  # the first tensor (in file order) that is cut off
        end_max = max(end_max, end)
    if end_max > data_size:
        raise CheckpointError(f"{file}: truncated -- the header describes {end_max} bytes of tensor data but only "
                              f"{data_size} are present ({last!r} and what follows it are cut off). Download or "
                              "write the file again.")
    return (header, 8 + n) if with_offset else header


def _read_rows(f, file: str, key: str, info: dict, data_start: int, rows: tuple[int, int] | None = None
               ) -> torch.Tensor:
    """A tensor, or rows [a, b) of its first dimension, read with plain file I/O (not mmap): only these bytes are
    resident beside the model."""
    shape = list(info["shape"])
    begin, end = info["data_offsets"]
    if rows is not None:
        row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
        begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
        shape[0] = rows[1] - rows[0]
    f.seek(data_start + begin)
    buf = bytearray(end - begin)
    if f.readinto(buf) != len(buf):
        raise CheckpointError(f"{file}: truncated while reading {key!r}")
    dtype = _TORCH_DTYPES[info["dtype"]]
    if not buf:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).view(shape)


def _read_into(f, file: str, key: str, info: dict, data_start: int, t: "Target") -> bool:
    """Read a stored tensor (or its rows t.rows) straight into t.tensor when nothing needs converting: same dtype, a
    contiguous CPU destination. No buffer in between, so a streaming load holds nothing beside the model.
    False when it does not apply (the caller reads and converts)."""
    dest = t.tensor
    if dest.device.type != "cpu" or not dest.is_contiguous() or dest.dtype != _TORCH_DTYPES.get(info["dtype"]):
        return False
    begin, end = info["data_offsets"]
    if t.rows is not None:
        shape = info["shape"]
        row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
        begin, end = begin + t.rows[0] * row_bytes, begin + t.rows[1] * row_bytes
    if end - begin != dest.numel() * dest.element_size():
        return False  # a shape the caller's copy_ will report
    if end == begin:
        return True
    f.seek(data_start + begin)
    view = memoryview(dest.view(torch.uint8).view(-1).numpy()) if dest.dim() else memoryview(
        dest.view(1).view(torch.uint8).numpy())
    if f.readinto(view) != end - begin:
        raise CheckpointError(f"{file}: truncated while reading {key!r}")
    return True


@dataclass
class Target:
    """Where a stored tensor, or a block of it, goes: tensor = stored[rows[0]:rows[1], cols[0]:cols[1]] (None: the
    whole dimension). A tensor-parallel rank loads its slices this way, reading only what it keeps."""
    tensor: torch.Tensor
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None


_BLOCK_BYTES = 64 << 20  # a column slice is read in row blocks of at most this many bytes


def load_targets(files: dict[str, str], targets: dict[str, torch.Tensor | Target], progress: bool = False) -> None:
    """Copy every stored tensor named in `targets` (key -> destination tensor or Target) into place, converting
    dtype and device; keys not in `targets` are never read. Files are read in offset order, one at a time."""
    by_file = defaultdict(list)
    for key in targets:
        by_file[files[key]].append(key)
    bar = Progress(len(targets), "loading weights", unit="tensors", enabled=progress)
    for file in sorted(by_file):
        header, data_start = read_header(file, with_offset=True)
        with open(file, "rb") as f:
            for key in sorted(by_file[file], key=lambda k: header[k]["data_offsets"][0]):  # sequential reads
                t = targets[key]
                t = t if isinstance(t, Target) else Target(t)
                info = header[key]
                if t.cols is None and _read_into(f, file, key, info, data_start, t):
                    pass  # read straight into place
                elif t.cols is None:
                    t.tensor.copy_(_read_rows(f, file, key, info, data_start, t.rows))
                else:  # a column block: whole rows are read, a bounded number at a time
                    r0, r1 = t.rows or (0, info["shape"][0])
                    step = max(1, _BLOCK_BYTES // max(1, (info["data_offsets"][1] - info["data_offsets"][0])
                                                      // max(1, info["shape"][0])))
                    for a in range(r0, r1, step):
                        b = min(r1, a + step)
                        block = _read_rows(f, file, key, info, data_start, (a, b))
                        t.tensor[a - r0:b - r0].copy_(block[:, t.cols[0]:t.cols[1]])
                bar.update(1)
    bar.close()


def checkpoint_files(directory: str) -> dict[str, str]:
    """Key -> file for a directory's safetensors weights, checking that every file the index names exists."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        by_file = defaultdict(list)
        for key, fname in weight_map.items():
            by_file[fname].append(key)
        for fname, keys in by_file.items():
            if not os.path.isfile(os.path.join(directory, fname)):
                raise CheckpointError(f"{index} names shard {fname!r} (holding {keys[0]!r} and {len(keys) - 1} more "
                                      f"tensors) but {os.path.join(directory, fname)} does not exist")
        return {k: os.path.join(directory, v) for k, v in weight_map.items()}
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(single):
        return {k: single for k in read_header(single)}
    if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(directory)):
        raise CheckpointError(f"{directory} holds only pickle weights (*.bin); dsv2 loads safetensors only, since "
                              "unpickling can run arbitrary code. Convert them once with a trusted tool.")
    raise CheckpointError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def validate(cfg: ModelConfig, directory: str) -> dict[str, str]:
    """Check names, shapes and dtypes of every tensor against `cfg` without reading weights; key -> file."""
    _refuse_quantized(directory)
    files = checkpoint_files(directory)
    headers = {f: read_header(f) for f in sorted(set(files.values()))}
    _refuse_fp8(directory, files, headers)
    expected = expected_keys(cfg)
    missing = [k for k in expected if k not in files]
    if missing:
        raise CheckpointError(f"{directory}: {len(missing)} weight(s) missing for this config.json, e.g. "
                              f"{missing[:3]}. Is config.json from the same model as the weights?")
    unexpected = [k for k in files if k not in expected]
    if unexpected:
        raise CheckpointError(f"{directory}: {len(unexpected)} unexpected weight(s), e.g. {unexpected[:3]} "
                              f"(in {os.path.basename(files[unexpected[0]])}); config.json describes a different model")
    for key, file in files.items():
        info = headers[file].get(key)
        if info is None:
            raise CheckpointError(f"{file}: the index says it holds {key!r}, but it does not")
        if tuple(info["shape"]) != expected[key]:
            raise CheckpointError(f"{file}: {key!r} has shape {tuple(info['shape'])}, expected {expected[key]} "
                                  f"from config.json")
        if info["dtype"] not in _FLOAT_DTYPES:
            raise CheckpointError(f"{file}: {key!r} is stored as {info['dtype']}; expected a floating-point dtype")
    return files


def _refuse_quantized(directory: str) -> None:
    """A checkpoint written by `dsv2 quantize` (engine/quantized_checkpoint.py) holds int8 / int4 codes, not the
    weights that training, export or a plain load need; it would otherwise fail as 'a different model'."""
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            quant = json.load(f).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(quant, dict) or quant.get("quant_method") != "dsv2":
        return
    raise CheckpointError(
        f"{directory} is a dsv2 {quant.get('format')} checkpoint (written by `dsv2 quantize`): its matrices are "
        "stored as quantized codes, which only dsv2's inference engine reads, in one process (LLM(path); dsv2 "
        "generate / chat / bench / serve --model DIR). Loading it as plain weights (dsv2.load_model, training or "
        "fine-tuning from it, export, tensor-parallel runs) needs the original checkpoint it was quantized from.")


def _refuse_fp8(directory: str, files: dict[str, str], headers: dict[str, dict]) -> None:
    """A block-FP8 checkpoint (DeepSeek-V3's release format) would otherwise fail as 'a different model'."""
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            quant = json.load(f).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        quant = None
    quant = quant if isinstance(quant, dict) else None
    scales = [k for k in files if k.endswith("_scale_inv")]
    fp8 = [k for k in files if headers[files[k]].get(k, {}).get("dtype") in ("F8_E4M3", "F8_E5M2")]
    if not scales and not (fp8 and quant):
        return
    block = quant.get("weight_block_size") if quant else None
    blocks = f" in {block[0]} x {block[1]} blocks" if isinstance(block, list) and len(block) == 2 else ""
    stored = (f"{len(fp8)} weight(s) stored as {headers[files[fp8[0]]][fp8[0]]['dtype']}{blocks}, e.g. {fp8[0]!r} "
              f"in {os.path.basename(files[fp8[0]])}, with " if fp8 else "")
    scaled = (f"{len(scales)} per-block scale tensor(s) `*.weight_scale_inv`"
              + (f" (e.g. {scales[0]!r})" if scales else ""))
    said = f"; config.json's quantization_config says {quant.get('quant_method')!r}" if quant else ""
    raise CheckpointError(
        f"{directory} is a block-FP8 checkpoint (DeepSeek-V3 style): {stored}{scaled}{said}. dsv2 does not load FP8 "
        "weights yet. Use the model's bf16 release, or convert these weights to bf16 first (DeepSeek-V3's "
        "inference/fp8_cast_bf16.py does that) and drop quantization_config from config.json.")


# ---- loading and saving ----------------------------------------------------------------------------------
def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", progress: bool = False) -> Transformer:
    """Load a Hugging Face DeepSeek-V2 directory (or hub repo id) into a Transformer in `dtype` on `device`."""
    directory = resolve_model_path(path)
    cfg = ModelConfig.from_pretrained(directory)
    files = validate(cfg, directory)
    model = build_model(cfg, dtype=dtype, device=device, init=False)
    load_targets(files, checkpoint_tensors(model), progress)
    return model.eval()


def save_model(model: Transformer, directory: str | os.PathLike, max_shard_bytes: int = 5 << 30,
               dtype: torch.dtype | None = None) -> None:
    """Write config.json and safetensors in the published layout (per-expert keys), sharded above
    max_shard_bytes with a model.safetensors.index.json, so that dsv2 and transformers both load it.

    The directory is replaced as a whole (written beside it, fsynced, renamed in: fileio.atomic_directory), so a
    crash leaves the old model or the new one, never a mix; files in it other than weights (tokenizer,
    generation_config.json, a README) are kept."""
    with atomic_directory(directory, keep=lambda name: not is_weight_file(name)) as staging:
        write_model(model, staging, max_shard_bytes, dtype)


def write_model(model: Transformer, directory: str, max_shard_bytes: int = 5 << 30,
                dtype: torch.dtype | None = None) -> None:
    """save_model's files, written straight into `directory` (an empty staging directory)."""
    tensors = checkpoint_tensors(model)
    itemsize = lambda t: t.element_size() if dtype is None else torch.finfo(dtype).bits // 8
    shards, current, size = [], [], 0
    for key, t in tensors.items():
        nbytes = t.numel() * itemsize(t)
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, keys in enumerate(shards):  # one shard in memory at a time (experts are sliced views until here)
        fname = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        chunk = {k: tensors[k].detach().to(device="cpu", dtype=dtype).contiguous() for k in keys}
        total += sum(t.numel() * t.element_size() for t in chunk.values())
        save_file(chunk, os.path.join(directory, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
        del chunk
    if len(shards) > 1:
        with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    cfg = model.config
    if dtype is not None or cfg.torch_dtype is None:
        d = dtype or next(p.dtype for n, p in model.named_parameters() if not n.endswith("gate.weight"))
        cfg = cfg.replace(torch_dtype=str(d).removeprefix("torch."))
    cfg.save(directory)


def is_weight_file(name: str) -> bool:
    """Weights and their index, safetensors or pickle: what a new save replaces rather than keeps beside its own."""
    return (name.endswith((".safetensors", ".safetensors.index.json"))
            or name.startswith("pytorch_model") and name.endswith((".bin", ".bin.index.json")))
