"""`dsv2 serve` under abuse, over real HTTP (a real uvicorn process on loopback; raw sockets where a client library
would hide the behaviour): admission counts sequences, per-request limits, prompts far too long for the context,
500s that leave the client a usable connection, clients that hang up or stall mid-body, and work cut by shutdown.

Server C: a one-sequence batch, a queue of 4 sequences, 3 per request, a context of 320000 tokens (so that a large
prompt is still a legal one), a 2 s body timeout and a 1 s shutdown grace. Its last test ends it."""
from __future__ import annotations

import json

import httpx
import pytest

from test_serve import Server


@pytest.fixture(scope="module")
def server_c(llm_dir, tmp_path_factory):
    s = Server(llm_dir, tmp_path_factory.mktemp("serve") / "c.log", "--max-num-seqs", "1", "--max-waiting", "4",
               "--max-seqs-per-request", "3", "--max-model-len", "320000", "--kv-cache-memory", "96MiB",
               env={"DSV2_API_KEY": ""})
    yield s
    s.stop()
    assert "Traceback" not in s.output(), s.output()


def _open_stream(http: httpx.Client, n: int = 1, max_tokens: int = 2000):
    """A streaming completion, returned once its headers are in (it is queued in the engine by then)."""
    req = http.build_request("POST", "/v1/completions", json={
        "prompt": "def main():\n", "n": n, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "stream": True})
    r = http.send(req, stream=True)
    assert r.status_code == 200, r.read()
    return r, (line for line in r.iter_lines() if line)


def _wait_idle(server: Server) -> None:
    import time
    deadline = time.monotonic() + 10
    while (m := server.metrics())["dsv2_kv_cache_used_blocks"] or m["dsv2_num_requests_waiting"]:
        assert time.monotonic() < deadline, f"the server did not go idle: {m}"
        time.sleep(0.05)


def test_admission_counts_sequences_and_bounds_each_request(server_c):
    post = lambda body: httpx.post(server_c.base + "/v1/completions", json={"max_tokens": 1, **body}, timeout=60)
    # per request, while idle: 2 prompts x n=2 is 4 sequences, over --max-seqs-per-request 3
    err = post({"prompt": ["a", "b"], "n": 2}).json()["error"]
    assert err["param"] == "prompt" and "4 sequences" in err["message"] and "--max-seqs-per-request 3" in err["message"]

    # the queue: one sequence runs (--max-num-seqs 1), a request with n=2 waits: 2 of --max-waiting 4 are taken
    with httpx.Client(base_url=server_c.base, timeout=60) as a, httpx.Client(base_url=server_c.base, timeout=60) as b:
        running, lines = _open_stream(a)
        next(lines)
        waiting, _ = _open_stream(b, n=2)
        full = post({"prompt": "a", "n": 3})  # 2 waiting + 3 > 4, though it is one prompt
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        assert "2 sequences are already waiting" in full.json()["error"]["message"]
        with httpx.Client(base_url=server_c.base, timeout=60) as c:
            fits, _ = _open_stream(c, n=2)  # 2 + 2 = 4: queued
            fits.close()
        waiting.close()
        running.close()
    _wait_idle(server_c)
