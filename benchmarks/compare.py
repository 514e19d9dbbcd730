"""dsv2 vs transformers vs llama.cpp on the very same weights, in one run: prefill and decode tokens/s.

    # once: the benchmark model (463M parameters, bf16) and its GGUF twin
    python ../shared/bench/make_bench_model.py /tmp/bench-mini --preset mini
    pip install llama-cpp-python gguf && bash ../shared/bench/to_gguf.sh /tmp/bench-mini /tmp/bench-mini.gguf bf16
    # then
    python benchmarks/compare.py /tmp/bench-mini --gguf /tmp/bench-mini.gguf --out benchmarks/results/mini.json

Every number comes from a separate process (dsv2 bench, ../shared/bench/hf_bench.py, llama_cpp_bench.py), run one
after another with 2 threads each, so they share nothing but the machine. Prints a markdown table with ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "bench"))
CASES = [  # (name, batch, context, new)
    ("256 ctx, 1 seq", 1, 256, 64),
    ("256 ctx, 16 seqs", 16, 256, 32),
    ("4096 ctx, 1 seq", 1, 4096, 32),
]
RATE = re.compile(r"prefill ([\d.]+) tok/s, decode ([\d.]+) tok/s")


def run(cmd: list[str], env: dict) -> tuple[float, float] | None:
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        print(p.stderr[-2000:], file=sys.stderr)
        return None
    if cmd[-1] == "--json":
        d = json.loads(p.stdout.strip().splitlines()[-1])
        return d["prefill_tokens_per_s"], d["decode_tokens_per_s"]
    m = RATE.search(p.stdout)
    return (float(m.group(1)), float(m.group(2))) if m else None


def memory_bandwidth_gbs() -> float:
    """Read bandwidth of this machine for a streaming bf16 reduction (an upper bound for a GEMV)."""
    import torch
    x = torch.ones(512 << 20, dtype=torch.bfloat16)  # 1 GiB
    x.sum()
    t = time.perf_counter()
    for _ in range(5):
        x.sum()
    return 5 * x.numel() * 2 / (time.perf_counter() - t) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="HF directory made by make_bench_model.py")
    ap.add_argument("--gguf", default=None, help="the same weights converted with to_gguf.sh (skip llama.cpp if absent)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--repeat", type=int, default=2, help="dsv2 repeats each case and keeps the best (default 2)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    results = {"model": a.model, "threads": a.threads, "date": time.strftime("%Y-%m-%d %H:%M"), "cases": []}
    for name, batch, context, new in CASES:
        row = {"case": name, "batch": batch, "context": context, "new": new}
        row["dsv2"] = run([sys.executable, "-m", "dsv2.cli", "bench", "--model", a.model, "--batch", str(batch),
                           "--context", str(context), "--new", str(new), "--repeat", str(a.repeat), "--json"], env)
        if not a.skip_hf:
            row["transformers"] = run([sys.executable, os.path.join(BENCH, "hf_bench.py"), a.model, "--batch",
                                       str(batch), "--context", str(context), "--new", str(new)], env)
        if a.gguf and batch == 1:  # llama_cpp_bench.py runs one sequence
            row["llama.cpp"] = run([sys.executable, os.path.join(BENCH, "llama_cpp_bench.py"), a.gguf, "--context",
                                    str(context), "--new", str(new), "--threads", str(a.threads)], env)
        results["cases"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    from dsv2.config import ModelConfig
    cfg = ModelConfig.from_pretrained(a.model)
    active_bytes = 2 * cfg.param_counts()["activated"]
    results["active_weight_bytes_per_token"] = active_bytes
    results["measured_read_bandwidth_gbs"] = memory_bandwidth_gbs()
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)
    print(markdown(results))


def markdown(r: dict) -> str:
    fmt = lambda v: "-" if v is None else (f"{v:.1f}" if v < 100 else f"{v:.0f}")
    lines = ["| case | | dsv2 | transformers | llama.cpp | dsv2 / transformers | dsv2 / llama.cpp |",
             "|---|---|---|---|---|---|---|"]
    for c in r["cases"]:
        for i, what in enumerate(("prefill", "decode")):
            d, h, l = (c.get(k)[i] if c.get(k) else None for k in ("dsv2", "transformers", "llama.cpp"))
            ratio = lambda x, y: "-" if x is None or y is None else f"{x / y:.2f}x"
            lines.append(f"| {c['case']} | {what} tok/s | {fmt(d)} | {fmt(h)} | {fmt(l)} | {ratio(d, h)} | {ratio(d, l)} |")
    bw, active = r["measured_read_bandwidth_gbs"], r["active_weight_bytes_per_token"]
    one = r["cases"][0]["dsv2"]
    lines.append("")
    lines.append(f"Active bf16 weights per token: {active / 1e6:.0f} MB. Measured streaming read bandwidth: {bw:.1f} GB/s "
                 f"(ceiling {bw * 1e9 / active:.0f} tok/s); at the issue's ~30 GB/s the ceiling is "
                 f"{30e9 / active:.0f} tok/s.")
    if one:
        lines.append(f"dsv2 single-sequence decode at 256 ctx: {one[1]:.1f} tok/s = {one[1] * active / 1e9:.1f} GB/s of "
                     f"weights, {100 * one[1] * active / (bw * 1e9):.0f}% of the measured ceiling, "
                     f"{100 * one[1] * active / 30e9:.0f}% of the issue's 30 GB/s one.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
