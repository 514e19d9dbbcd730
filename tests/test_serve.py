"""`dsv2 serve` as a real uvicorn process, driven by the official `openai` client (and httpx for raw requests):
outputs equal the offline engine's, streams and batches of concurrent streams work, a closed stream frees its
cache blocks, every bad request gets its 4xx, and SIGTERM drains. Two servers per module: A with an API key
(most tests), B without one and with a one-sequence batch (queue limit, then SIGTERM)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from dsv2.engine.llm import LLM
from dsv2.engine.sampling_params import SamplingParams

KEY = "sk-test-key"
NAME = "tiny-chat"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, log_path, *args: str, env: dict | None = None):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        cmd = [sys.executable, "-m", "dsv2.cli", "serve", "--model", model, "--dtype", "float32", "--port",
               str(self.port), "--log-level", "warning", *args]
        # one torch thread: the tiny model gains nothing from more, and the test process and the other server share
        # the cores
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the server did not come up:\n{self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.base + "/metrics").text
        return {k: float(v) for k, v in (l.rsplit(" ", 1) for l in text.splitlines() if l and l[0] != "#")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(llm_dir, tmp_path_factory):
    s = Server(llm_dir, tmp_path_factory.mktemp("serve") / "a.log", "--served-model-name", NAME,
               "--max-body-bytes", "100000", env={"DSV2_API_KEY": KEY})
    yield s
    s.stop()
    assert "Traceback" not in s.output(), s.output()


@pytest.fixture(scope="module")
def server_b(llm_dir, tmp_path_factory):
    s = Server(llm_dir, tmp_path_factory.mktemp("serve") / "b.log", "--max-num-seqs", "1", "--max-waiting", "1",
               "--shutdown-grace", "120",
               env={"DSV2_API_KEY": ""})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offline(llm_dir):
    return LLM(llm_dir, dtype="float32")


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0)


GREEDY = dict(temperature=0, max_tokens=12)


def test_models_and_completions_equal_the_offline_engine(client, offline):
    assert [m.id for m in client.models.list()] == [NAME]
    prompts = ["def fibonacci(n):\n", "import os\n"]
    ref = offline.generate(prompts, SamplingParams(**GREEDY))
    one = client.completions.create(model=NAME, prompt=prompts[0], **GREEDY)
    assert one.object == "text_completion" and one.choices[0].text == ref[0].text
    assert one.usage.prompt_tokens == len(ref[0].prompt_token_ids)
    assert one.usage.completion_tokens == len(ref[0].token_ids)
    batch = client.completions.create(model=NAME, prompt=prompts, n=2, **GREEDY)  # choice i*n + j
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [ref[0].text] * 2 + [ref[1].text] * 2
    ids = client.completions.create(model=NAME, prompt=ref[1].prompt_token_ids, **GREEDY)
    assert ids.choices[0].text == ref[1].text
    # sampling extensions travel in extra_body; stop strings cut the text
    stop = ref[0].text[3:6]
    cut = client.completions.create(model=NAME, prompt=prompts[0], stop=[stop], **GREEDY,
                                    extra_body={"top_k": 5, "repetition_penalty": 1.0})
    assert cut.choices[0].text == ref[0].text[:ref[0].text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_streaming_completion_joins_to_the_full_text(client, offline):
    ref = offline.generate(["class Foo:\n"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    chunks = list(client.completions.create(model=NAME, prompt="class Foo:\n", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_chat_with_logprobs_equals_offline_chat(client, offline):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ref = offline.chat(conv, SamplingParams(max_tokens=10, temperature=0, logprobs=2))[0]
    parts = [conv[0], {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]  # content as parts
    r = client.chat.completions.create(model=NAME, messages=parts, max_completion_tokens=10, temperature=0,
                                       logprobs=True, top_logprobs=2)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids) and r.usage.completion_tokens == len(ref.token_ids)
    lps = choice.logprobs.content
    assert len(lps) == len(ref.token_ids)
    for entry, tid, pos in zip(lps, ref.token_ids, ref.outputs[0].logprobs):
        assert entry.logprob == pytest.approx(pos[tid].logprob, abs=1e-4)
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)  # greedy: the top one


def test_32_concurrent_streaming_chats_equal_offline(server, offline):
    convs = [[{"role": "user", "content": f"Question {i}: what is {i} + {i * 7 % 5}?"}] for i in range(32)]
    ref = offline.chat(convs, SamplingParams(max_tokens=16, temperature=0))
    before = server.metrics()

    async def one(client, conv):
        stream = await client.chat.completions.create(model=NAME, messages=conv, max_tokens=16, temperature=0,
                                                      stream=True, stream_options={"include_usage": True})
        return [c async for c in stream]

    peak = 0

    async def watch(http: httpx.AsyncClient):  # the running-batch gauge while the streams run
        nonlocal peak
        while True:
            text = (await http.get("/metrics")).text
            peak = max(peak, float(text.split("\ndsv2_num_requests_running ")[1].split()[0]))
            await asyncio.sleep(0.01)

    async def main():
        async with openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0) as client, \
                httpx.AsyncClient(base_url=server.base) as http:
            watcher = asyncio.create_task(watch(http))
            results = await asyncio.gather(*(one(client, c) for c in convs))
            watcher.cancel()
            return results

    results = asyncio.run(main())
    assert peak >= 8, f"the streams did not share the batch (at most {peak} running at once)"
    for chunks, expected in zip(results, ref):
        assert chunks[0].choices[0].delta.role == "assistant"
        with_choices = [c for c in chunks if c.choices]
        assert "".join(c.choices[0].delta.content or "" for c in with_choices) == expected.text
        assert with_choices[-1].choices[0].finish_reason == expected.finish_reason
        assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    after = server.metrics()
    ttft = "dsv2_time_to_first_token_seconds"
    assert after[ttft + "_count"] - before[ttft + "_count"] == 32
    itl = "dsv2_inter_token_latency_seconds"
    d = {k: after[k] - before[k] for k in (ttft + "_sum", ttft + "_count", itl + "_sum", itl + "_count")}
    print(f"\n/metrics for 32 concurrent streams (peak batch {peak:.0f}): "
          f"mean TTFT {d[ttft + '_sum'] / d[ttft + '_count'] * 1e3:.1f} ms, "
          f"mean ITL {d[itl + '_sum'] / d[itl + '_count'] * 1e3:.2f} ms over {d[itl + '_count']:.0f} gaps")


def test_echo_logprobs_score_the_prompt_like_the_engine(client, offline):
    """What lm-evaluation-harness sends for loglikelihood: echo + logprobs + max_tokens 0, token-id prompts."""
    ids = offline.tokenizer.encode("def add(a, b):\n    return a + b\n")
    ref = offline.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
    r = client.completions.create(model=NAME, prompt=[ids], echo=True, logprobs=1, max_tokens=0)
    c = r.choices[0]
    assert r.usage.completion_tokens == 0 and c.finish_reason == "length"
    assert c.text == offline.tokenizer.decode(ids, skip_special_tokens=True)
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(ref.prompt_logprobs[t][ids[t]].logprob, abs=1e-4)
        assert max(lp.top_logprobs[t].values()) >= lp.token_logprobs[t]
    assert lp.text_offset == sorted(lp.text_offset)
    # echo with generation: the prompt first, then the completion, logprobs for both
    g = client.completions.create(model=NAME, prompt="x = 1\n", echo=True, logprobs=0, max_tokens=3,
                                  temperature=0).choices[0]
    assert g.text.startswith("x = 1\n") and len(g.logprobs.tokens) == len(offline.tokenizer.encode("x = 1\n")) + 3


def test_closed_stream_aborts_and_frees_its_blocks(server, client):
    before = server.metrics()
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Tell a story"}],
                                            max_tokens=400, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while True:
        m = server.metrics()
        aborted = m.get('dsv2_requests_finished_total{finish_reason="abort"}', 0)
        if m["dsv2_kv_cache_used_blocks"] == 0 and aborted > before.get(
                'dsv2_requests_finished_total{finish_reason="abort"}', 0):
            break
        assert time.monotonic() < deadline, f"blocks still in use after the stream closed: {m}"
        time.sleep(0.05)
    assert m["dsv2_generation_tokens_total"] - before["dsv2_generation_tokens_total"] < 400
    assert m["dsv2_kv_cache_total_blocks"] > 0 and m["dsv2_num_requests_running"] == 0

    # a non-streaming client that gives up (here: a read timeout) is noticed by polling, and aborted too
    before = m
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3,
                   json={"prompt": "x", "n": 8, "max_tokens": 450, "temperature": 0, "ignore_eos": True})
    deadline = time.monotonic() + 10
    while (m := server.metrics())["dsv2_num_requests_running"] or m["dsv2_kv_cache_used_blocks"]:
        assert time.monotonic() < deadline, f"the abandoned request still runs: {m}"
        time.sleep(0.05)
    aborts = 'dsv2_requests_finished_total{finish_reason="abort"}'
    assert m[aborts] - before[aborts] == 8
    assert m["dsv2_generation_tokens_total"] - before["dsv2_generation_tokens_total"] < 8 * 450


BAD = [  # (path, body, expected status, the field the error names)
    ("/v1/completions", b'{"prompt": "x", "max_tokens": ', 400, None),
    ("/v1/completions", b'["not", "an", "object"]', 400, None),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": [5, 99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    # wrong JSON types are refused, not coerced (as OpenAI does); a float field takes an int
    ("/v1/completions", {"prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 4.0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 2.0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "echo": 1}, 400, "echo"),
    ("/v1/completions", {"prompt": "x", "temperature": "1"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": True}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "seed": 1.5}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": ["1"]}, 400, "stop_token_ids[0]"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": "yes"}}, 400,
     "stream_options.include_usage"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "no"}, 400, "add_special_tokens"),
    # token ids outside the vocabulary, before anything decodes them
    ("/v1/completions", {"prompt": [5, -1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [2**70]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[5, 6], [5, -1]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5, -1], "echo": True, "logprobs": 1, "max_tokens": 0}, 400, "prompt"),
    # lone UTF-16 surrogates are not text: an escape or raw (json decodes raw ones with surrogatepass)
    ("/v1/completions", b'{"prompt": "abc\\ud800def"}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": ["ok", "abc\\udfffdef"]}', 400, "prompt[1]"),
    ("/v1/completions", b'{"prompt": "abc\xed\xa0\x80def"}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "stop": ["\\ud800"]}', 400, "stop[0]"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "abc\\ud800def"}]}', 400,
     "messages[0].content"),
    ("/tokenize", b'{"prompt": "abc\\ud800def"}', 400, "prompt"),
    ("/tokenize", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}', 400,
     "messages[0].content[0].text"),
]

LIMITS = [  # (body, the field the error names, what its message must say): each limit, named with its value
    ({"prompt": "x", "stop": [f"s{i}" for i in range(17)]}, "stop", ["16", "--max-stop-strings"]),
    ({"prompt": "x", "stop": "y" * 65}, "stop", ["64", "--max-stop-chars"]),
    ({"prompt": "x", "stop": ["ok", "y" * 65]}, "stop", ["64", "--max-stop-chars"]),
    ({"prompt": "x", "stop_token_ids": list(range(257))}, "stop_token_ids", ["256"]),
    ({"prompt": "x", "logprobs": 21}, "logprobs", ["20"]),
    ({"prompt": "x", "n": 129}, "n", ["128"]),
    ({"prompt": [f"p{i}" for i in range(129)], "n": 2, "max_tokens": 1}, "prompt", ["258", "256",
                                                                                   "--max-seqs-per-request"]),
]


def test_bad_requests_get_their_status_codes(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.base, headers=auth) as http:
        for path, body, status, param in BAD:
            r = http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body)
            err = r.json()["error"]
            assert r.status_code == status and err["param"] == param, (body, r.status_code, err)
            assert err["message"] and err["type"]
        long = http.post("/v1/completions", json={"prompt": [5] * 200, "max_tokens": 400}).json()["error"]
        assert "200 tokens and max_tokens is 400" in long["message"] and "512" in long["message"], long
        assert long["code"] == "context_length_exceeded"
        # 413: announced by Content-Length, and streamed without one
        assert http.post("/v1/completions", json={"prompt": "z" * 200_000}).status_code == 413
        chunks = (b'{"prompt": "' + b"z" * 50_000 for _ in range(4))
        assert http.post("/v1/completions", content=chunks).status_code == 413
        assert http.get("/v1/nothing").status_code == 404 and http.get("/v1/completions").status_code == 405
        tok = http.post("/tokenize", json={"prompt": "hello world"}).json()
        assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 512
        assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"].endswith("hello world")
        chat_tok = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
        assert chat_tok["count"] > tok["count"] - 2
        for body in (b'{"prompt": "\\ud83d\\ude00", "max_tokens": 1}',  # a surrogate pair is an emoji: fine
                     b'{"prompt": "x", "max_tokens": 1, "temperature": 1, "top_p": 1}'):  # ints for floats
            assert http.post("/v1/completions", content=body).status_code == 200, body
        for body, param, words in LIMITS:
            r = http.post("/v1/completions", json=body)
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == param, (body, r.status_code, err)
            assert all(w in err["message"] for w in words), (words, err["message"])
        chat = {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}
        err = http.post("/v1/chat/completions", json=chat).json()["error"]
        assert err["param"] == "top_logprobs" and "20" in err["message"], err
        for messages, param in (([{"role": "user", "content": "x"}] * 2049, "messages"),
                                ([{"role": "user", "content": [{"type": "text", "text": "x"}] * 2049}],
                                 "messages[0].content")):
            err = http.post("/v1/chat/completions", json={"messages": messages}).json()["error"]
            assert err["param"] == param and "2048" in err["message"], err
    # the API key: missing or wrong -> 401; /health and /metrics need none
    assert httpx.post(server.base + "/v1/completions", json={"prompt": "x"}).status_code == 401
    wrong = httpx.get(server.base + "/v1/models", headers={"Authorization": "Bearer sk-wrong"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.base + "/health").status_code == 200
    m = server.metrics()
    assert m['dsv2_http_requests_total{endpoint="/v1/completions",status="401"}'] == 1
    assert not any('status="5' in k for k in m), "a client request caused a 5xx"


def _stream(http: httpx.Client, max_tokens: int):
    """Open a streaming completion; returns (response, its non-empty lines) once the headers are in: the request
    is queued in the engine by then."""
    req = http.build_request("POST", "/v1/completions", json={
        "prompt": "def main():\n", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}})
    r = http.send(req, stream=True)
    assert r.status_code == 200
    lines = (l for l in r.iter_lines() if l)
    return r, lines


def _read_to_end(lines) -> tuple[int, str | None]:
    usage, finish = None, None
    for line in lines:
        if line == "data: [DONE]":
            return usage, finish
        chunk = json.loads(line[len("data: "):])
        if chunk.get("usage"):
            usage = chunk["usage"]["completion_tokens"]
        for c in chunk["choices"]:
            finish = c["finish_reason"] or finish
    raise AssertionError("the stream ended without [DONE]")


def test_queue_limit_answers_429_and_no_key_is_needed_without_one(server_b):
    with httpx.Client(base_url=server_b.base, timeout=30) as http:
        running, lines = _stream(http, 480)
        next(lines)  # the first token: the only batch slot (--max-num-seqs 1) is taken
        with httpx.Client(base_url=server_b.base, timeout=30) as http2:
            waiting, _ = _stream(http2, 480)  # fills the queue (--max-waiting 1)
            full = httpx.post(server_b.base + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert full.status_code == 429 and full.headers["retry-after"] == "1"
            assert full.json()["error"]["type"] == "rate_limit_error"
            waiting.close()
        running.close()
    deadline = time.monotonic() + 10
    while server_b.metrics()["dsv2_kv_cache_used_blocks"] or server_b.metrics()["dsv2_num_requests_waiting"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ok = httpx.post(server_b.base + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    # n=2 could never be queued behind --max-waiting 1 (sequences count, not prompts): a 400, not a 429 forever
    never = httpx.post(server_b.base + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 2})
    assert never.status_code == 400 and "--max-waiting 1" in never.json()["error"]["message"], never.text


def test_sigterm_drains_in_flight_requests_then_exits_0(server_b):
    """Runs last on server B: it ends the process."""
    with httpx.Client(base_url=server_b.base, timeout=30) as a, httpx.Client(base_url=server_b.base, timeout=30) as b:
        first, first_lines = _stream(a, 200)
        next(first_lines)
        second, second_lines = _stream(b, 200)  # waits in the queue behind the first: in flight too
        server_b.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while httpx.get(server_b.base + "/health").status_code != 503:
            assert time.monotonic() < deadline, "the server did not start draining"
            time.sleep(0.01)
        refused = httpx.post(server_b.base + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert _read_to_end(first_lines) == (200, "length")
        assert _read_to_end(second_lines) == (200, "length")
    assert server_b.proc.wait(timeout=30) == 0, server_b.output()
    assert "Traceback" not in server_b.output(), server_b.output()


def test_drain_aborts_what_outlives_the_grace_period():
    """The shutdown logic alone: past the grace period the engine aborts what is left, and a second signal
    stops waiting at once."""
    import uvicorn

    from dsv2.serve.app import ServerState
    from dsv2.serve.server import DrainingServer

    class Engine:
        aborted = 0

        def abort_all(self):
            self.aborted += 1

    state, engine = ServerState(), Engine()
    srv = DrainingServer(uvicorn.Config(app=None), state, engine, grace=0.05)
    state.in_flight = 2
    srv.handle_exit(signal.SIGTERM, None)
    assert state.draining and not asyncio.run(srv.on_tick(1)) and engine.aborted == 0
    time.sleep(0.06)
    assert not asyncio.run(srv.on_tick(1)) and engine.aborted == 1  # grace over: abort, wait for them to end
    state.in_flight = 0
    assert asyncio.run(srv.on_tick(1)) and engine.aborted == 1  # all ended: exit

    srv = DrainingServer(uvicorn.Config(app=None), ServerState(), engine, grace=60)
    srv.state.in_flight = 1
    srv.handle_exit(signal.SIGTERM, None)
    srv.handle_exit(signal.SIGTERM, None)  # impatient: a second signal
    asyncio.run(srv.on_tick(1))
    assert engine.aborted == 2
