"""Training on several processes: `dsv2 train` in one process against data parallel (FSDP2) and expert parallel
(all-to-all) under torchrun, same global batch, same model -- tokens/s, the last logged loss, and for expert
parallel the all-to-all bytes per step and the fraction of tokens that crossed ranks, as metrics.jsonl logs them.

    python benchmarks/train_parallel.py --out benchmarks/results/train-parallel.json
    python benchmarks/train_parallel.py --model train-small --world 2 --steps 12 --repeat 2

The data is prepared from this Python's own standard library sources (a tokenizer of --vocab tokens trained on
them), so nothing is downloaded. One process uses --world threads; each of the --world ranks uses one thread, so
every run has the same cores. Every configuration runs --repeat times interleaved and keeps its best tokens/s.
Prints a markdown table; --out also writes the numbers as JSON (with the command and the machine).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.normpath(os.path.join(HERE, "..", "src"))


def _run(args: list[str], env: dict) -> None:
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def prepare(root: str, vocab: int, files: int, env: dict) -> str:
    corpus = os.path.join(root, "corpus")
    os.makedirs(corpus)
    sources = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:files]
    for i, path in enumerate(sources):
        with open(path, encoding="utf-8", errors="replace") as f, open(os.path.join(corpus, f"m{i:03d}.py"), "w") as g:
            g.write(f.read())
    cli = [sys.executable, "-m", "dsv2.cli"]
    _run([*cli, "tokenizer", "train", corpus, "--out", os.path.join(root, "tok"), "--vocab-size", str(vocab),
          "--include", "*.py"], env)
    _run([*cli, "data", "prepare", corpus, "--tokenizer", os.path.join(root, "tok"), "--out",
          os.path.join(root, "data"), "--val-fraction", "0.02", "--include", "*.py"], env)
    return os.path.join(root, "data")


def train(kind: str, out: str, data: str, a, env: dict) -> dict:
    base = ["train", "--data", data, "--out", out, "--model", a.model, "--seq-len", str(a.seq_len),
            "--batch-size", str(a.batch_size), "--steps", str(a.steps), "--warmup-steps", "2",
            "--log-every", str(a.steps), "--save-every", "100000", "--eval-every", "100000", "--no-final-eval",
            "--paper-balance", "--quiet"]
    if kind == "one process":
        cmd = [sys.executable, "-m", "dsv2.cli", *base, "--threads", str(a.world)]
        env = {**env, "OMP_NUM_THREADS": str(a.world)}
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.world),
               "-m", "dsv2.cli", *base, "--threads", "1"]
        if kind.startswith("expert"):
            cmd += ["--expert-parallel", str(a.world)]
        env = {**env, "OMP_NUM_THREADS": "1"}
    _run(cmd, env)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rec = [r for r in map(json.loads, f) if r["kind"] == "train"][-1]
    ep = rec.get("expert_parallel", {})
    return {"tokens_per_s": rec["tokens_per_s"], "loss": round(rec["loss"], 5),
            "a2a_MB_per_step": round(ep["a2a_bytes_per_step"] / 1e6, 2) if ep else None,
            "crossed": ep.get("crossed")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny-stdlib", help="a dsv2 train preset or config.json (default tiny-stdlib)")
    p.add_argument("--world", type=int, default=2, help="processes for the parallel runs (default 2)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="the global batch (default 8)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run; tokens/s is their mean")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--files", type=int, default=120, help="standard-library modules in the corpus (default 120)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out", help="also write JSON here")
    a = p.parse_args()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    kinds = ["one process", f"data parallel x{a.world} (FSDP2)", f"expert parallel x{a.world} (+ FSDP2)"]
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as root:
        data = prepare(root, a.vocab, a.files, env)
        for r in range(a.repeat):
            for i, kind in enumerate(kinds):
                got = train(kind, os.path.join(root, f"run-{r}-{i}"), data, a, env)
                if kind not in best or got["tokens_per_s"] > best[kind]["tokens_per_s"]:
                    best[kind] = got
                print(f"round {r + 1}: {kind}: {got}", file=sys.stderr)
    one = best["one process"]["tokens_per_s"]
    print(f"| {a.model}, global batch {a.batch_size} x {a.seq_len} | tokens/s | vs one process | loss at step "
          f"{a.steps} | all-to-all MB / step | tokens that crossed ranks |")
    print("|---|---|---|---|---|---|")
    for kind, b in best.items():
        mb = "-" if b["a2a_MB_per_step"] is None else f"{b['a2a_MB_per_step']:.2f}"
        crossed = "-" if b["crossed"] is None else f"{100 * b['crossed']:.1f}%"
        print(f"| {kind} | {b['tokens_per_s']:.0f} | {b['tokens_per_s'] / one:.2f}x | {b['loss']:.4f} | {mb} | "
              f"{crossed} |")
    if a.out:
        import torch
        with open(a.out, "w") as f:
            json.dump({"command": " ".join(["python", "benchmarks/train_parallel.py", *sys.argv[1:]]),
                       "settings": vars(a), "results": best,
                       "system": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                  "torch": torch.__version__,
                                  "capability": torch.backends.cpu.get_cpu_capability()}}, f, indent=2)


if __name__ == "__main__":
    main()
