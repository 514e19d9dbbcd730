"""Peak memory of `dsv2.load_model` relative to the checkpoint's size on disk.

    python benchmarks/load_memory.py /tmp/bench-mini [--dtype bfloat16]

Loads in a fresh process and samples /proc/self/status every millisecond: RssAnon is memory the process owns
(the model's tensors, and the one tensor being read), VmRSS adds file-backed pages mapped into the process. The
loader reads each tensor with plain file I/O (no mmap) into a model allocated once, so RssAnon should peak near one
copy of the model in the target dtype plus the largest single tensor. The file's page cache belongs to the kernel,
not to the process, and is not counted in either.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    import torch
    import dsv2
    files = [f for f in os.listdir(a.model) if f.endswith(".safetensors")]
    size = sum(os.path.getsize(os.path.join(a.model, f)) for f in files)
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
    model = dsv2.load_model(a.model, dtype=getattr(torch, a.dtype))
    seconds = time.perf_counter() - start
    done.set()
    t.join()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"checkpoint_bytes": size, "model_bytes": model_bytes, "load_seconds": round(seconds, 2),
           "peak_anon_bytes": peak["anon"] * 1024, "peak_rss_bytes": peak["total"] * 1024,
           "peak_anon_over_model": round(peak["anon"] * 1024 / model_bytes, 3),
           "peak_anon_over_checkpoint": round(peak["anon"] * 1024 / size, 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
