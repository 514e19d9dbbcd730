"""`dsv2 serve` under abuse, over real HTTP (a real uvicorn process on loopback; raw sockets where a client library
would hide the behaviour): admission counts sequences, per-request limits, prompts far too long for the context,
500s that leave the client a usable connection, clients that hang up or stall mid-body, and work cut by shutdown.

Server C: a one-sequence batch, a queue of 4 sequences, 3 per request, a context of 320000 tokens (so that a large
prompt is still a legal one), a 2 s body timeout and a 1 s shutdown grace. Its last test ends it."""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import openai
import pytest

from conftest import stdlib_text
from dsv2.engine.llm import LLM
from dsv2.tokenizer import Tokenizer
from test_serve import Server, _free_port


@pytest.fixture(scope="module")
def server_c(llm_dir, tmp_path_factory):
    s = Server(llm_dir, tmp_path_factory.mktemp("serve") / "c.log", "--max-num-seqs", "1", "--max-waiting", "4",
               "--max-seqs-per-request", "3", "--max-model-len", "320000", "--kv-cache-memory", "96MiB",
               "--body-timeout", "2", "--shutdown-grace", "1", env={"DSV2_API_KEY": ""})
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
    deadline = time.monotonic() + 10
    while (m := server.metrics())["dsv2_kv_cache_used_blocks"] or m["dsv2_num_requests_waiting"]:
        assert time.monotonic() < deadline, f"the server did not go idle: {m}"
        time.sleep(0.05)


def _raw(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: (status, headers lower-cased, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection mid-response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in (l.partition(":") for l in lines[1:]))
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _request(path: str, body: bytes | None = None) -> bytes:
    if body is None:
        return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024


def _in_background(fn):
    """Run fn() on a thread; returns (thread, result dict that gets "value" or "error")."""
    result = {}

    def run():
        try:
            result["value"] = fn()
        except Exception as e:  # the test thread asserts on it
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


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


class BrokenLLM(LLM):
    """An engine with a bug: any request it is given raises."""

    def add_request(self, *args, **kwargs):
        raise RuntimeError("a bug in the engine")


def test_a_500_leaves_the_client_a_usable_connection(llm_dir):
    """An unexpected error is a 500 in OpenAI's shape; the keep-alive connection it came on either stays usable or
    the response says Connection: close, so the client's next request does not fail on a dead connection."""
    import uvicorn

    from dsv2.serve import ServerConfig, build_app
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(BrokenLLM(llm_dir, dtype="float32"), ServerConfig("m")),
                                           host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the in-process server did not start"
            time.sleep(0.02)
        with _raw(port) as sock:
            sock.sendall(_request("/v1/completions", b'{"prompt": [5, 6], "max_tokens": 1}'))
            status, headers, body = _read_response(sock)
            assert status == 500 and json.loads(body)["error"]["type"] == "server_error", body
            if headers.get("connection", "").lower() != "close":  # then it must still work
                sock.sendall(_request("/health"))
                assert _read_response(sock)[0] == 200
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'dsv2_http_requests_total{endpoint="/v1/completions",status="500"} 1' in metrics
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_a_client_that_hangs_up_mid_body_is_a_499_not_a_500(server_c):
    key = 'dsv2_http_requests_total{endpoint="/v1/completions",status="499"}'
    before = server_c.metrics().get(key, 0)
    with _raw(server_c.port) as sock:
        sock.sendall(_request("/v1/completions", b'{"prompt": "abc", "max_tokens": 1}' + b" " * 1000)[:-900])
    deadline = time.monotonic() + 10
    while (m := server_c.metrics()).get(key, 0) == before:
        assert not any('status="5' in k for k in m), m
        assert time.monotonic() < deadline, f"the hang-up was not counted: {m}"
        time.sleep(0.05)
    assert m[key] == before + 1 and not any('status="5' in k for k in m), m


def test_a_body_that_stalls_gets_408_and_its_connection_closed(server_c):
    """--body-timeout 2: the headers and part of the body arrive, then nothing more."""
    with _raw(server_c.port) as sock:  # a 30 s socket timeout: a server that waits forever fails the test
        sock.sendall(_request("/v1/completions", b'{"prompt": "abc", "max_tokens": 1}')[:-10])
        status, headers, body = _read_response(sock)
        err = json.loads(body)["error"]
        assert status == 408 and headers.get("connection") == "close", (status, headers)
        assert err["code"] == "request_timeout" and "--body-timeout" in err["message"], err
        assert sock.recv(1) == b""  # and the server closed the connection
    assert server_c.metrics()['dsv2_http_requests_total{endpoint="/v1/completions",status="408"}'] == 1


def test_a_prompt_far_too_long_is_refused_before_it_is_tokenized(server_c):
    """15 MB of code (under the 16 MiB body limit) was tokenized on the event loop: /health and every stream
    stalled for ~30 s and the server's RSS grew by 1.6 GB for good. Now: a 400 at once, /health answers all along."""
    text = ("".join(stdlib_text(200, 100_000)) * 4)[:15_000_000]
    body = json.dumps({"prompt": text, "max_tokens": 1}).encode()
    assert len(body) < 16 << 20
    rss = _rss_mb(server_c.proc.pid)
    thread, result = _in_background(lambda: httpx.post(server_c.base + "/v1/completions", content=body, timeout=20))
    with httpx.Client(base_url=server_c.base, timeout=10) as http:
        while thread.is_alive():
            assert http.get("/health").status_code == 200
            time.sleep(0.01)
    r = result.get("value") or result["error"]
    assert isinstance(r, httpx.Response), f"the huge prompt took too long: {r!r}"
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "prompt", err
    assert "320000" in err["message"], err
    chat = json.dumps({"messages": [{"role": "user", "content": text}]}).encode()
    r = httpx.post(server_c.base + "/v1/chat/completions", content=chat, timeout=20)
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "messages", err
    deadline = time.monotonic() + 10
    while _rss_mb(server_c.proc.pid) > rss + 400:  # what the request took is given back
        assert time.monotonic() < deadline, f"RSS {_rss_mb(server_c.proc.pid):.0f} MB, {rss:.0f} MB before"
        time.sleep(0.1)


def test_health_answers_while_a_large_legal_prompt_is_tokenized(server_c, llm_dir):
    """~290k tokens of code: it fits server C's context of 320000, so all of it is tokenized -- on a worker thread,
    while the event loop answers /health (it answered none while the loop tokenized). /tokenize, so that the engine
    need not prefill it; the ids are the offline tokenizer's."""
    text = "".join(stdlib_text(200, 100_000))[:530_000]
    expected = Tokenizer.from_pretrained(llm_dir).encode(text)
    assert 200_000 < len(expected) <= 320_000
    thread, result = _in_background(
        lambda: httpx.post(server_c.base + "/tokenize", json={"prompt": text}, timeout=60))
    answered = 0
    with httpx.Client(base_url=server_c.base, timeout=10) as http:
        while thread.is_alive():
            assert http.get("/health").status_code == 200
            answered += thread.is_alive()
    r = result.get("value") or result["error"]
    assert r.status_code == 200 and r.json()["tokens"] == expected
    assert answered >= 10, f"/health answered only {answered} times while the prompt was tokenized"


def test_work_cut_by_shutdown_is_an_error_not_a_finish_reason(server_c, llm_dir):
    """Runs last on server C: it ends the process. Past --shutdown-grace (1 s) what still runs is aborted. No
    client knows finish_reason "abort": a started stream ends with an error event (the openai client raises), a
    non-streaming request gets 503 shutting_down (which the openai client retries, on another replica)."""
    client = openai.OpenAI(base_url=server_c.base + "/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(model=os.path.basename(llm_dir), max_tokens=5000, stream=True,
                                            messages=[{"role": "user", "content": "Tell a long story"}],
                                            extra_body={"ignore_eos": True})
    assert next(stream).choices[0].delta.role == "assistant"
    thread, result = _in_background(lambda: httpx.post(  # waits behind the stream (--max-num-seqs 1)
        server_c.base + "/v1/completions", json={"prompt": "x", "max_tokens": 5000, "ignore_eos": True}, timeout=60))
    deadline = time.monotonic() + 10
    while server_c.metrics()["dsv2_num_requests_waiting"] < 1:
        assert time.monotonic() < deadline, "the second request did not queue"
        time.sleep(0.02)
    server_c.proc.send_signal(signal.SIGTERM)
    with pytest.raises(openai.APIError) as cut:
        for chunk in stream:
            assert all(c.finish_reason is None for c in chunk.choices), chunk
    assert cut.value.code == "shutting_down" and "shutting down" in cut.value.message, cut.value.body
    thread.join(timeout=60)
    r = result["value"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    assert server_c.proc.wait(timeout=30) == 0, server_c.output()
