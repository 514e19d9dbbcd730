"""dsv2 vs transformers vs llama.cpp on the very same weights, in one run: prefill and decode tokens/s.

    # once: the benchmark model (463M parameters, bf16) and its GGUF twin
    python ../shared/bench/make_bench_model.py /tmp/bench-mini --preset mini
    pip install llama-cpp-python gguf && bash ../shared/bench/to_gguf.sh /tmp/bench-mini /tmp/bench-mini.gguf bf16
    # then
    python benchmarks/compare.py /tmp/bench-mini --gguf /tmp/bench-mini.gguf --out benchmarks/results/mini.json

Every number comes from a separate process (dsv2 bench, ../shared/bench/hf_bench.py, llama_cpp_bench.py), run one
after another with 2 threads each, so they share nothing but the machine. --rounds N runs the whole set N times,
interleaved, and keeps each engine's best prefill and best decode: on a shared machine whose speed drifts, every
engine gets the same chances. Prints a markdown table with ratios (of the first dsv2 variant).

Several dsv2 configurations in the same run, to decide a default by measurement (the first one is compared):
    python benchmarks/compare.py /tmp/bench-mini --gguf /tmp/bench-mini.gguf \
        --variant auto= --variant int8="--quantization int8" --variant fp32="--dtype float32"

Another kind of CPU, emulated on an AVX-512 machine: torch, oneDNN and dsv2 restricted to AVX2 for dsv2 and
transformers, and llama.cpp from a build without AVX-512 (its python given by --llama-python):
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" \
        /tmp/venv-avx2/bin/pip install --no-binary llama-cpp-python llama-cpp-python
    python benchmarks/compare.py /tmp/bench-mini --gguf /tmp/bench-mini.gguf --cpu avx2 \
        --llama-python /tmp/venv-avx2/bin/python --out benchmarks/results/mini-avx2.json

Weight-only int8 against llama.cpp's 8-bit format (the same weights, quantized by each):
    bash ../shared/bench/to_gguf.sh /tmp/bench-mini /tmp/bench-mini-q8_0.gguf q8_0
    python benchmarks/compare.py /tmp/bench-mini --quantization int8 --gguf /tmp/bench-mini-q8_0.gguf --skip-hf
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
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
EXTRA: dict = {}  # from dsv2 bench --json: latent cache bytes per token, the largest peak RSS seen
RATE = re.compile(r"prefill ([\d.]+) tok/s, decode ([\d.]+) tok/s")


def run(cmd: list[str], env: dict) -> tuple[float, float] | None:
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        print(p.stderr[-2000:], file=sys.stderr)
        return None
    if cmd[-1] == "--json":
        d = json.loads(p.stdout.strip().splitlines()[-1])
        EXTRA.update(kv_cache_bytes_per_token=d["kv_cache_bytes_per_token"],
                     peak_rss_mb=max(EXTRA.get("peak_rss_mb", 0), d["peak_rss_mb"]))
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


EMULATE = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "DSV2_CPU_CAPABILITY": "avx2"}}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="HF directory made by make_bench_model.py")
    ap.add_argument("--gguf", default=None, help="the same weights converted with to_gguf.sh (skip llama.cpp if absent)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--repeat", type=int, default=2, help="dsv2 repeats each case and keeps the best (default 2)")
    ap.add_argument("--rounds", type=int, default=1, help="run everything N times, keep each engine's best (default 1)")
    ap.add_argument("--quantization", default=None, choices=["int8"], help="dsv2 --quantization (default: none)")
    ap.add_argument("--variant", action="append", default=None, metavar="NAME=ARGS",
                    help="a dsv2 configuration to run (repeatable), e.g. int8='--quantization int8'; the first is the "
                         "one compared (default: one variant, 'dsv2', with --quantization if given)")
    ap.add_argument("--cpu", default=None, choices=sorted(EMULATE),
                    help="emulate another kind of CPU for dsv2 and transformers (environment variables torch, oneDNN "
                         "and dsv2 honour); give llama.cpp a matching build with --llama-python")
    ap.add_argument("--llama-python", default=sys.executable, help="the python whose llama_cpp to time")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    llama_env = dict(env)
    if a.cpu:
        env.update(EMULATE[a.cpu])
    quant = ["--quantization", a.quantization] if a.quantization else []
    variants = [("dsv2", quant)] if not a.variant else \
        [(v.split("=", 1)[0], shlex.split(v.split("=", 1)[1]) if "=" in v else []) for v in a.variant]
    engines = [name for name, _ in variants]
    results = {"model": a.model, "gguf": a.gguf, "threads": a.threads, "rounds": a.rounds,
               "quantization": a.quantization, "variants": {n: " ".join(v) for n, v in variants},
               "machine": {"cpu": cpu_name(), "emulated": a.cpu, "llama_python": a.llama_python},
               "date": time.strftime("%Y-%m-%d %H:%M"), "cases": []}
    results["machine"]["dsv2_system"] = json.loads(subprocess.run(
        [sys.executable, "-m", "dsv2.cli", "info", "--system", "--json", "--device", "cpu"], env=env,
        capture_output=True, text=True, check=True).stdout)["cpu"]
    rows = [{"case": name, "batch": batch, "context": context, "new": new} for name, batch, context, new in CASES]
    for _ in range(a.rounds):
        for row in rows:
            batch, context, new = (str(row[k]) for k in ("batch", "context", "new"))
            got = {}
            for name, args in variants:
                got[name] = run([sys.executable, "-m", "dsv2.cli", "bench", "--model", a.model, "--batch", batch,
                                 "--context", context, "--new", new, "--repeat", str(a.repeat), *args, "--json"], env)
            if not a.skip_hf:
                got["transformers"] = run([sys.executable, os.path.join(BENCH, "hf_bench.py"), a.model, "--batch",
                                           batch, "--context", context, "--new", new], env)
            if a.gguf and row["batch"] == 1:  # llama_cpp_bench.py runs one sequence
                got["llama.cpp"] = run([a.llama_python, os.path.join(BENCH, "llama_cpp_bench.py"), a.gguf,
                                        "--context", context, "--new", new, "--threads", str(a.threads)], llama_env)
            for engine, rate in got.items():
                if rate is not None:
                    row.setdefault("all_" + engine, []).append(rate)
                    best = row.get(engine)
                    row[engine] = rate if best is None else (max(best[0], rate[0]), max(best[1], rate[1]))
            print(json.dumps(row), file=sys.stderr, flush=True)
    results["cases"] = rows
    results["engines"] = engines

    from dsv2.config import ModelConfig
    cfg = ModelConfig.from_pretrained(a.model)
    active_bytes = (1 if a.quantization == "int8" else 2) * cfg.param_counts()["activated"]
    results["active_weight_bytes_per_token"] = active_bytes
    results.update(EXTRA)
    results["measured_read_bandwidth_gbs"] = memory_bandwidth_gbs()
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)
    print(markdown(results))


def markdown(r: dict) -> str:
    fmt = lambda v: "-" if v is None else (f"{v:.1f}" if v < 100 else f"{v:.0f}")
    ours = r.get("engines") or ["dsv2"]
    first = ours[0]
    m = r.get("machine")
    lines = []
    if m:
        lines += [f"Machine: {m['cpu']}" + (f", emulating {m['emulated']} (dsv2 and transformers restricted through "
                                             "ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA / DSV2_CPU_CAPABILITY, "
                                             "llama.cpp built without AVX-512)" if m.get("emulated") else ""), ""]
    names = [*ours, "transformers", "llama.cpp"]
    lines += ["| case | | " + " | ".join(names) + f" | {first} / transformers | {first} / llama.cpp |",
              "|---|---|" + "---|" * (len(names) + 2)]
    for c in r["cases"]:
        for i, what in enumerate(("prefill", "decode")):
            vals = [c.get(k)[i] if c.get(k) else None for k in names]
            d, h, l = vals[0], vals[-2], vals[-1]
            ratio = lambda x, y: "-" if x is None or y is None else f"{x / y:.2f}x"
            lines.append(f"| {c['case']} | {what} tok/s | " + " | ".join(fmt(v) for v in vals)
                         + f" | {ratio(d, h)} | {ratio(d, l)} |")
    lines += ["", *targets(r)]
    bw, active = r["measured_read_bandwidth_gbs"], r["active_weight_bytes_per_token"]
    one = r["cases"][0].get(first)
    lines.append("")
    if "peak_rss_mb" in r:
        lines.append(f"dsv2: latent cache {r['kv_cache_bytes_per_token']} bytes per token; peak RSS "
                     f"{r['peak_rss_mb']:.0f} MB over its bench runs.")
    lines.append(f"Active weights per token ({'int8' if r.get('quantization') == 'int8' else 'bf16'}): {active / 1e6:.0f} MB. Measured streaming read bandwidth: {bw:.1f} GB/s "
                 f"(ceiling {bw * 1e9 / active:.0f} tok/s); at the issue's ~30 GB/s the ceiling is "
                 f"{30e9 / active:.0f} tok/s.")
    if one:
        lines.append(f"dsv2 single-sequence decode at 256 ctx: {one[1]:.1f} tok/s = {one[1] * active / 1e9:.1f} GB/s of "
                     f"weights, {100 * one[1] * active / (bw * 1e9):.0f}% of the measured ceiling, "
                     f"{100 * one[1] * active / 30e9:.0f}% of the issue's 30 GB/s one.")
    return "\n".join(lines)


def targets(r: dict) -> list[str]:
    """The issue's targets, as measured ratios (each needs its inputs to have been measured)."""
    by = {c["case"]: c for c in r["cases"]}

    ours = (r.get("engines") or ["dsv2"])[0]

    def get(case, engine, i):
        v = by.get(case, {}).get(ours if engine == "dsv2" else engine)
        return None if v is None else v[i]

    checks = [  # (target, numerator, denominator, required ratio)
        ("decode, 1 seq, 256 ctx >= llama.cpp", ("256 ctx, 1 seq", "dsv2", 1), ("256 ctx, 1 seq", "llama.cpp", 1), 1),
        ("decode, 16 seqs >= 4x llama.cpp single-sequence", ("256 ctx, 16 seqs", "dsv2", 1),
         ("256 ctx, 1 seq", "llama.cpp", 1), 4),
        ("decode, 4096 ctx >= 2x llama.cpp", ("4096 ctx, 1 seq", "dsv2", 1), ("4096 ctx, 1 seq", "llama.cpp", 1), 2),
        ("decode, 4096 ctx >= 3x transformers", ("4096 ctx, 1 seq", "dsv2", 1), ("4096 ctx, 1 seq", "transformers", 1),
         3),
        ("prefill, 4096 ctx >= llama.cpp", ("4096 ctx, 1 seq", "dsv2", 0), ("4096 ctx, 1 seq", "llama.cpp", 0), 1),
        ("prefill, 256 ctx >= llama.cpp", ("256 ctx, 1 seq", "dsv2", 0), ("256 ctx, 1 seq", "llama.cpp", 0), 1),
    ]
    lines = ["| target | measured ratio | met |", "|---|---|---|"]
    for name, num, den, need in checks:
        x, y = get(*num), get(*den)
        if x is None or y is None:
            continue
        lines.append(f"| {name} | {x / y:.2f}x | {'yes' if x / y >= need else 'no'} |")
    return lines


if __name__ == "__main__":
    main()
