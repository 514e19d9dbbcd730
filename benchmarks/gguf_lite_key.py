"""Rewrite a DeepSeek-V2 GGUF with `deepseek2.attention.q_lora_rank = 0` said outright.

    python benchmarks/gguf_lite_key.py MODEL.gguf        (in place, through a temporary file beside it)

llama.cpp decides that a DeepSeek-V2 GGUF has no q_lora (V2-Lite's query projection) from its layer count alone
(26 or 27 layers); a V2-Lite-width model with fewer layers (make_big_model.py --layers 4) then fails to load or
quantize with "key not found in model: deepseek2.attention.q_lora_rank". With the key present and 0, llama.cpp
reads the model as V2-Lite. Needs the `gguf` package (llama.cpp's gguf-py).
"""
import os
import sys

import gguf
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

path = sys.argv[1]
reader = gguf.GGUFReader(path, "r")
arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
key = f"{arch}.attention.q_lora_rank"
if reader.get_field(key) is not None:
    sys.exit(f"{path} already has {key}")
tmp = path + ".tmp"
writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
copy_with_new_metadata(reader, writer, {key: MetadataDetails(gguf.GGUFValueType.UINT32, 0)}, [])
del reader
os.replace(tmp, path)
print(f"{path}: {key} = 0")
