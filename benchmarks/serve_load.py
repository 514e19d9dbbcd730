"""Load on a real `dsv2 serve`: N concurrent streaming chats from the official `openai` client, latency measured by
the client and read back from the server's /metrics.

    python benchmarks/serve_load.py [--model DIR] [--concurrency 32] [--requests 64] [--max-tokens 64]
                                    [--out benchmarks/results/serve_load.json]

Starts the server on a free loopback port (default model: the one dsv2 ships), keeps `concurrency` requests in
flight until `requests` have finished, then scrapes /metrics and stops the server with SIGTERM. Client-side TTFT
runs from sending the request to the first content chunk; inter-token latency is the gap between content chunks.
/metrics gives the server's view (engine queue to first token, token to token) as histogram means and quantiles
interpolated within the buckets. Prints a markdown table; --out also writes JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

PROMPTS = ["Write a function that reverses a list.", "What does `with open(path) as f:` do?",
           "Explain Python's GIL in one paragraph.", "def fibonacci(n):", "How do I sort a dict by value?",
           "class Stack:", "What is a context manager?", "import os\n\n# list every .py file under a directory"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, port: int, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dsv2.cli", "serve", "--port", str(port), "--log-level", "warning",
           "--served-model-name", "bench"]
    if model:
        cmd += ["--model", model]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"dsv2 serve exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("dsv2 serve did not answer /health within 300 s")


async def run_load(base: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    import openai
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)
    ttft, itl, tokens = [], [], 0

    async def one(i: int):
        nonlocal tokens
        async with sem:
            t0 = time.perf_counter()
            stream = await client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                max_tokens=max_tokens, temperature=0.7, seed=i, stream=True,
                stream_options={"include_usage": True})
            last = None
            async for chunk in stream:
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
                if not chunk.choices or not chunk.choices[0].delta.content:
                    continue
                now = time.perf_counter()
                if last is None:
                    ttft.append(now - t0)
                else:
                    itl.append(now - last)
                last = now

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    wall = time.perf_counter() - t
    await client.close()
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None
    return {"wall_s": wall, "completion_tokens": tokens, "output_tokens_per_s": tokens / wall,
            "client_ttft_s": {"mean": float(np.mean(ttft)), "p50": pct(ttft, 50), "p90": pct(ttft, 90),
                              "p99": pct(ttft, 99)},
            "client_itl_s": {"mean": float(np.mean(itl)), "p50": pct(itl, 50), "p90": pct(itl, 90),
                             "p99": pct(itl, 99)}}


def histogram(text: str, name: str) -> dict:
    """Mean and bucket-interpolated quantiles of one Prometheus histogram in /metrics text."""
    buckets = [(float(le), float(c)) for le, c in re.findall(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.M)]
    total = float(re.search(rf"^{name}_sum (\S+)$", text, re.M).group(1))
    count = float(re.search(rf"^{name}_count (\S+)$", text, re.M).group(1))

    def quantile(q: float) -> float | None:
        if not count:
            return None
        rank, prev_le, prev_c = q * count, 0.0, 0.0
        for le, c in buckets:
            if c >= rank:
                if le == float("inf"):
                    return prev_le
                return prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-12)
            prev_le, prev_c = le, c
        return prev_le

    return {"count": int(count), "mean": total / count if count else None, "p50": quantile(0.5),
            "p90": quantile(0.9), "p99": quantile(0.99)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the model dsv2 ships)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server (default 2)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(a.model, port, a.threads)
    try:
        result = asyncio.run(run_load(base, a.concurrency, a.requests, a.max_tokens))
        text = httpx.get(base + "/metrics", timeout=10).text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    result.update(model=a.model or "dsv2-tiny-stdlib (shipped)", concurrency=a.concurrency, requests=a.requests,
                  max_tokens=a.max_tokens, server_exit_code=proc.returncode,
                  metrics_ttft_s=histogram(text, "dsv2_time_to_first_token_seconds"),
                  metrics_itl_s=histogram(text, "dsv2_inter_token_latency_seconds"),
                  metrics_e2e_s=histogram(text, "dsv2_e2e_request_latency_seconds"))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    ms = lambda v: "-" if v is None else f"{v * 1e3:.1f}"
    print(f"{a.requests} streaming chats, {a.concurrency} in flight, up to {a.max_tokens} tokens each: "
          f"{result['completion_tokens']} tokens in {result['wall_s']:.1f} s = {result['output_tokens_per_s']:.0f} "
          f"tokens/s; server exit code {proc.returncode}\n")
    print("| latency (ms) | mean | p50 | p90 | p99 |\n|---|---|---|---|---|")
    for label, key in (("TTFT, client", "client_ttft_s"), ("TTFT, /metrics", "metrics_ttft_s"),
                       ("inter-token, client", "client_itl_s"), ("inter-token, /metrics", "metrics_itl_s"),
                       ("end to end, /metrics", "metrics_e2e_s")):
        h = result[key]
        print(f"| {label} | {ms(h['mean'])} | {ms(h['p50'])} | {ms(h['p90'])} | {ms(h['p99'])} |")


if __name__ == "__main__":
    main()
