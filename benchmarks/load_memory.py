"""Peak memory while loading a checkpoint, relative to what is loaded.

    python benchmarks/load_memory.py /tmp/bench-mini [--dtype bfloat16]           # dsv2.load_model (trainable form)
    python benchmarks/load_memory.py /tmp/bench-mini --quantization int8          # the engine's streaming load
    python benchmarks/load_memory.py ~/models/v2-lite-random --quantization int4 --json

Loads in this fresh process and samples /proc/self/status every millisecond: RssAnon is memory the process owns
(the model's tensors, and what is being read and converted), VmRSS adds file-backed pages mapped into the process.
The loaders read each tensor with plain file I/O (no mmap); the file's page cache belongs to the kernel, not to the
process, and is counted in neither.

Without --quantization (and --plan) it measures `dsv2.load_model`, which allocates the whole model once in the
target dtype. With --quantization or --plan, `engine.prepare.load_for_inference` with that inference plan: the
model streams part by part (read in the stored dtype, quantized or packed, next part), so the peak should be the
prepared model plus about one part (a decoder block's attention and dense weights, or one routed expert; the embedding and
lm_head) -- `--json` reports both, and the largest part's bytes in the stored dtype.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def tensor_bytes(module) -> int:
    """Bytes of a module's parameters and buffers, each counted once (tied or shared tensors too)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def largest_part_bytes(cfg, itemsize: int) -> int:
    """The stored bytes of the biggest part the streaming loader holds at once in the stored dtype: the embedding
    and lm_head, a decoder block without its routed experts, or one routed expert (they stream one at a time)."""
    import torch
    from dsv2.model import Transformer
    with torch.device("meta"):
        m = Transformer(cfg)
    blocks = max(sum(p.numel() for n, p in b.named_parameters() if ".experts." not in n) for b in m.model.layers)
    top = sum(p.numel() for p in [*m.model.embed_tokens.parameters(), *m.lm_head.parameters()])
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return max(blocks, top, expert) * itemsize


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--dtype", default="bfloat16", help="load_model's dtype, or the plan's dtype (auto allowed)")
    ap.add_argument("--quantization", choices=["int8", "int4"], default=None)
    ap.add_argument("--plan", action="store_true", help="the engine's streaming load even without quantization")
    ap.add_argument("--json", action="store_true", help="one JSON line (for tests and scripts)")
    a = ap.parse_args()
    import torch
    import dsv2
    from dsv2.capability import inference_plan
    from dsv2.config import ModelConfig
    from dsv2.engine.prepare import load_for_inference
    files = [f for f in os.listdir(a.model) if f.endswith(".safetensors")]
    size = sum(os.path.getsize(os.path.join(a.model, f)) for f in files)
    streaming = a.quantization is not None or a.plan
    plan = inference_plan("cpu", a.dtype, a.quantization) if streaming else None
    base_anon = status_kb("RssAnon")
    peak = {"anon": 0, "total": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak["anon"] = max(peak["anon"], status_kb("RssAnon") - base_anon)
            peak["total"] = max(peak["total"], status_kb("VmRSS"))
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    if streaming:
        model = load_for_inference(a.model, plan)
    else:
        model = dsv2.load_model(a.model, dtype=getattr(torch, a.dtype))
    seconds = time.perf_counter() - start
    time.sleep(0.01)
    done.set()
    t.join()
    model_bytes = tensor_bytes(model)
    cfg = ModelConfig.from_pretrained(a.model)
    stored = torch.tensor([], dtype=plan.weight_dtype if plan else getattr(torch, a.dtype)).element_size()
    out = {"loader": "load_for_inference" if streaming else "load_model",
           "plan": plan.as_dict()["weights"] if plan else None, "quantization": a.quantization,
           "checkpoint_bytes": size, "model_bytes": model_bytes, "largest_part_bytes": largest_part_bytes(cfg, stored),
           "load_seconds": round(seconds, 2), "peak_anon_bytes": peak["anon"] * 1024,
           "peak_rss_bytes": peak["total"] * 1024,
           "peak_anon_over_model": round(peak["anon"] * 1024 / model_bytes, 3),
           "peak_anon_over_checkpoint": round(peak["anon"] * 1024 / size, 3)}
    print(json.dumps(out) if a.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
