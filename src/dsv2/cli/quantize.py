"""`dsv2 quantize`: write an int4 / int8 copy of a checkpoint that dsv2 loads as stored (no re-quantizing at load).

    dsv2 quantize ~/models/DeepSeek-V2-Lite-Chat ~/models/V2-Lite-Chat-int4 --quantization int4
    dsv2 quantize ~/models/DeepSeek-V2-Lite-Chat ~/models/V2-Lite-Chat-int8 --quantization int8
    dsv2 generate --model ~/models/V2-Lite-Chat-int4 "Hello"          # loads it directly

The format: engine/quantized_checkpoint.py.
"""
from __future__ import annotations

import argparse
import os
import time

from .run import QUANTIZATIONS

GROUP_SIZES = (32, 64, 128)  # capability.INT4_GROUP_SIZES, spelled out so that --help does not import torch


def register(sub) -> None:
    p = sub.add_parser(
        "quantize", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="write an int4 / int8 checkpoint that loads without re-quantizing",
        description="Quantize a DeepSeek-V2 checkpoint into a new directory: safetensors (sharded above 5 GB) plus "
                    "config.json with a quantization_config, and the tokenizer and generation_config.json copied. "
                    "`dsv2 generate/chat/bench/serve --model OUT` and LLM(OUT) load it as stored: faster than "
                    "quantizing while loading (int4 especially) and the same model bit for bit.\n\n"
                    "It streams: one part of the model (a decoder block, or the embedding and lm_head) is read, "
                    "quantized and written at a time, so it runs in far less memory than the model; OUT is written "
                    "beside its final place and renamed in when complete.\n\n"
                    "Advice: int4 (groups of 64, ~0.28x the bf16 bytes; lm_head int8) is what fits DeepSeek-V2-Lite "
                    "in 16-24 GB; int8 (a scale per output row, ~0.53x) is closer to bf16. The files are dsv2's own "
                    "format: transformers cannot load them -- share the original checkpoint for transformers users.")
    p.add_argument("input", metavar="IN_DIR", help="the checkpoint to quantize (a Hugging Face directory or repo id)")
    p.add_argument("output", metavar="OUT_DIR", help="the directory to write (must not exist, unless --overwrite)")
    p.add_argument("--quantization", required=True, choices=list(QUANTIZATIONS),
                   help="int4: weight-only groups with a bf16 scale and zero each; int8: a scale per output row")
    p.add_argument("--group-size", type=int, default=None, choices=list(GROUP_SIZES),
                   help="int4 only: inputs per (scale, zero) pair (default 64: 4.5 bits a weight; 32 is more "
                        "accurate and bigger, 128 smaller)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="the dtype the weights are read in before quantizing, and the kept ones (embedding, norms, "
                        "kv_b_proj, router) are stored in (default bfloat16, the published checkpoints' dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..engine.quantized_checkpoint import write_quantized
    out = os.path.expanduser(args.output)
    if os.path.lexists(out) and not args.overwrite:
        raise ValueError(f"{out} exists: pass --overwrite to replace it, or choose another OUT_DIR")
    if args.group_size is not None and args.quantization != "int4":
        raise ValueError("--group-size is for --quantization int4 (int8 has one scale per output row)")
    start = time.perf_counter()
    quant = write_quantized(os.path.expanduser(args.input), out, args.quantization, group_size=args.group_size,
                            dtype=args.dtype, progress=True)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    group = f", groups of {quant['group_size']}" if quant["group_size"] else ""
    print(f"wrote {out}: {quant['format']}{group}, {size / 2**30:.2f} GiB of weights in "
          f"{time.perf_counter() - start:.0f} s. Run it with: dsv2 generate --model {out} \"Hello\"")
    return 0
