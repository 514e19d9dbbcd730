"""dsv2's int8 / int4 against llama.cpp's q8_0 / Q4_0 on the very same weights, in one run: load time, peak memory,
prefill and decode tokens/s, and decode against the bandwidth roof.

    # the weights: DeepSeek-V2-Lite's shape with random weights (all 27 layers, or --layers N for a quick look)
    python ../shared/bench/make_big_model.py ../shared/reference/configs/DeepSeek-V2-Lite ~/models/v2-lite-random
    # llama.cpp's formats of them (its own converter and quantizer; llama-cpp-python and gguf installed)
    bash ../shared/bench/to_gguf.sh ~/models/v2-lite-random /tmp/v2l-q8_0.gguf q8_0
    python benchmarks/gguf_lite_key.py /tmp/v2l-q8_0.gguf      # only for a --layers model (see that script)
    python ../shared/bench/gguf_quantize.py /tmp/v2l-q8_0.gguf /tmp/v2l-q4_0.gguf Q4_0
    # then
    python benchmarks/quant_compare.py ~/models/v2-lite-random --dsv2 int8="--quantization int8" \\
        --dsv2 int4="--quantization int4" --gguf q8_0=/tmp/v2l-q8_0.gguf --gguf Q4_0=/tmp/v2l-q4_0.gguf \\
        --llama-python /tmp/venv-llama/bin/python --rounds 2 --out benchmarks/results/v2-lite-quant.json

Every measurement is its own process (`dsv2 bench --json`, benchmarks/llama_cpp_run.py), one after another with the
same threads; --rounds N repeats the whole set, interleaved, and keeps each engine's best prefill and best decode,
so a machine whose speed drifts gives every engine the same chances. dsv2 loads once per round and measures every
--batch (1 and 16 sequences by default); llama_cpp_run.py times one sequence. Peak RSS is each process's own.
The roof: measured streaming read bandwidth / the bytes one decode step reads (each engine counts its own: routed
experts at k/E of their bytes, no embedding lookup, the formats' scales included).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from compare import EMULATE, cpu_name, memory_bandwidth_gbs  # noqa: E402


def run_lines(cmd: list[str], env: dict) -> list[dict]:
    print("$", " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        print(p.stderr[-3000:], file=sys.stderr)
        return []
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def keep_best(into: dict, got: dict) -> None:
    """Per (engine, batch): the best prefill and the best decode over rounds; the rest from the latest run."""
    best = into.get("prefill_tokens_per_s", 0), into.get("decode_tokens_per_s", 0)
    into.update({k: v for k, v in got.items() if k != "system"})  # the plan and CPU: once, in results["dsv2"]
    into["prefill_tokens_per_s"] = max(best[0], got["prefill_tokens_per_s"])
    into["decode_tokens_per_s"] = max(best[1], got["decode_tokens_per_s"])
    into.setdefault("all_decode_tokens_per_s", []).append(got["decode_tokens_per_s"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a Hugging Face DeepSeek-V2 directory")
    ap.add_argument("--dsv2", action="append", default=[], metavar="NAME=ARGS",
                    help='a dsv2 configuration, e.g. int4="--quantization int4" (repeatable)')
    ap.add_argument("--gguf", action="append", default=[], metavar="NAME=PATH",
                    help="llama.cpp's file of the same weights, e.g. Q4_0=/tmp/m-q4_0.gguf (repeatable)")
    ap.add_argument("--llama-python", action="append", default=[], metavar="[BUILD=]PYTHON",
                    help="the python whose llama_cpp to time; several builds as NAME=PYTHON (default: this python)")
    ap.add_argument("--no-extra-bufts", action="store_true",
                    help="llama.cpp without extra weight buffers (needed by AMX builds on q8_0 DeepSeek-V2 GGUFs)")
    ap.add_argument("--batch", default="1,16", help="dsv2's batch sizes (default 1,16)")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--kv-cache-memory", default="1GiB", help="dsv2's latent cache (default 1GiB)")
    ap.add_argument("--cpu", choices=sorted(EMULATE), help="restrict dsv2 to this CPU kind (llama.cpp: pick a "
                                                           "matching build with --llama-python)")
    ap.add_argument("--out", help="write the results as JSON here (and the markdown table beside it, .md)")
    ap.add_argument("--markdown-from", metavar="JSON", help="only print the table of an earlier run's JSON")
    a = ap.parse_args()
    if a.markdown_from:
        with open(a.markdown_from) as f:
            print(markdown(json.load(f)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    llama_env = dict(env)
    if a.cpu:
        env.update(EMULATE[a.cpu])
    dsv2 = [(v.split("=", 1)[0], shlex.split(v.split("=", 1)[1]) if "=" in v else []) for v in a.dsv2]
    ggufs = [tuple(v.split("=", 1)) if "=" in v else (os.path.basename(v), v) for v in a.gguf]
    builds = [("llama.cpp " + v.split("=", 1)[0], v.split("=", 1)[1]) if "=" in v else ("llama.cpp", v)
              for v in a.llama_python] or [("llama.cpp", sys.executable)]
    results = {"model": os.path.abspath(a.model), "date": time.strftime("%Y-%m-%d %H:%M"), "threads": a.threads,
               "context": a.context, "new": a.new, "rounds": a.rounds,
               "machine": {"cpu": cpu_name(), "emulated": a.cpu}, "runs": {}}
    for _ in range(a.rounds):
        for name, args in dsv2:
            rows = run_lines([sys.executable, "-m", "dsv2.cli", "bench", "--model", a.model, "--batch", a.batch,
                                  "--context", str(a.context), "--new", str(a.new), "--kv-cache-memory",
                                  a.kv_cache_memory, *args, "--json"], env)
            for row in rows:
                results.setdefault("dsv2", {})[name] = row["system"]
                keep_best(results["runs"].setdefault(f"dsv2 {name} x{row['batch']}", {"engine": "dsv2",
                                                                                      "format": name}), row)
        for fmt, path in ggufs:
            for build, python in builds:
                for row in run_lines([python, os.path.join(HERE, "llama_cpp_run.py"), path, "--context",
                                      str(a.context), "--new", str(a.new), "--threads", str(a.threads),
                                      *(["--no-extra-bufts"] if a.no_extra_bufts else [])], llama_env):
                    keep_best(results["runs"].setdefault(f"{build} {fmt} x1", {"format": fmt}),
                              {**row, "engine": build})
        print(json.dumps(results["runs"]), file=sys.stderr, flush=True)
    results["measured_read_bandwidth_gbs"] = memory_bandwidth_gbs()
    text = markdown(results)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
            f.write(text + "\n")
    print(text)


def markdown(r: dict) -> str:
    bw = r["measured_read_bandwidth_gbs"]
    lines = [f"{r['machine']['cpu']}" + (f", dsv2 restricted to {r['machine']['emulated']}" if r["machine"]["emulated"]
                                         else "") + f", {r['threads']} threads, {r['date']}; prompt {r['context']} "
             f"tokens, {r['new']} new; best of {r['rounds']} round(s); measured read bandwidth {bw:.1f} GB/s", "",
             "| engine | format | sequences | weights GB | load s | peak RSS GB | prefill tok/s | decode tok/s | "
             "decode reads MB/token | decode GB/s | % of roof |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, v in r["runs"].items():
        per_token = v.get("decode_weight_bytes_per_token")
        seqs = v.get("batch", 1)
        gbs = v["decode_tokens_per_s"] / seqs * per_token / 1e9 if per_token else None
        size = f"{v['weight_bytes'] / 1e9:.2f}" if "weight_bytes" in v else "-"  # (a llama_cpp without gguf-py)
        lines.append(f"| {v['engine']} | {v['format']} | {seqs} | {size} | "
                     f"{v['load_s']:.1f} | {v['peak_rss_mb'] / 1024:.2f} | {v['prefill_tokens_per_s']:.1f} | "
                     f"{v['decode_tokens_per_s']:.2f} | "
                     + (f"{per_token / 1e6:.0f} | {gbs:.1f} | {100 * gbs / bw:.0f}% |" if gbs and seqs == 1
                        else (f"{per_token / 1e6:.0f} | - | - |" if per_token else "- | - | - |")))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
