"""dsv2 generate / chat / bench from the command line, on a tiny local model."""
import io
import json

import pytest

from dsv2.cli import main
from dsv2.engine.llm import LLM
from dsv2.engine.sampling_params import SamplingParams


def test_generate_streams_the_greedy_completion(llm_dir, capsys):
    assert main(["generate", "--model", llm_dir, "--dtype", "float32", "--temperature", "0", "--max-tokens", "12",
                 "def fibonacci(n):"]) == 0
    printed = capsys.readouterr().out
    offline = LLM(llm_dir, dtype="float32").generate(["def fibonacci(n):"], SamplingParams(temperature=0, max_tokens=12))
    assert printed == "def fibonacci(n):" + offline[0].text + "\n"


def test_generate_several_prompts_in_one_batch(llm_dir, capsys):
    assert main(["generate", "--model", llm_dir, "--dtype", "float32", "--max-tokens", "4", "--seed", "1",
                 "import os", "class A:"]) == 0
    out = capsys.readouterr().out
    assert "=== [0]" in out and "=== [1]" in out and "class A:" in out


def test_chat_keeps_history_and_resets(llm_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAnd again\n/reset\nHi\n/exit\n"))
    assert main(["chat", "--model", llm_dir, "--dtype", "float32", "--temperature", "0", "--max-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert "conversation cleared" in captured.err and captured.out.count(">>> ") == 5
    llm = LLM(llm_dir, dtype="float32")
    first = llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(temperature=0, max_tokens=6))[0].text
    assert first in captured.out


def test_bench_json(llm_dir, capsys):
    assert main(["bench", "--model", llm_dir, "--dtype", "float32", "--batch", "2", "--context", "32", "--new", "8",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["prefill_tokens_per_s"] > 0 and d["decode_tokens_per_s"] > 0 and d["batch"] == 2 and d["load_s"] > 0


def test_bench_measures_every_case_after_one_load(llm_dir, capsys):
    assert main(["bench", "--model", llm_dir, "--dtype", "float32", "--batch", "1,3", "--context", "8,16",
                 "--new", "4", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 8), (1, 16), (3, 8), (3, 16)]
    assert len({r["load_s"] for r in rows}) == 1  # one model load for all four


def test_bench_rejects_bad_sizes(llm_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--model", llm_dir, "--batch", "1,x"])
    assert e.value.code == 2 and "comma-separated list" in capsys.readouterr().err


def test_bad_model_path_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 1
    assert "no model directory" in capsys.readouterr().err


def test_bench_with_int4_weights_and_an_fp8_cache(llm_dir, capsys):
    from dsv2.capability import QUANTIZATIONS
    from dsv2.cli import run
    assert run.QUANTIZATIONS == QUANTIZATIONS  # the CLI's choices are the planner's
    rec = {}
    for flags in ([], ["--quantization", "int4", "--kv-cache-dtype", "fp8"]):
        assert main(["bench", "--model", llm_dir, "--context", "8", "--new", "4", "--json", *flags]) == 0
        rec[bool(flags)] = json.loads(capsys.readouterr().out)
    assert rec[True]["quantization"] == "int4" and rec[True]["weights"] == "int4"
    assert rec[True]["kv_cache_bytes_per_token"] < rec[False]["kv_cache_bytes_per_token"]
    assert rec[True]["decode_tokens_per_s"] > 0


def test_bench_counts_the_weight_bytes_decode_reads(llm_dir):
    from dsv2.engine.benchmark import weight_bytes
    from dsv2.model.moe import Gate
    bytes_of = {}
    for dtype, quantization in (("float32", None), ("bfloat16", None), ("bfloat16", "int8")):
        llm = LLM(llm_dir, dtype=dtype, quantization=quantization, kv_cache_memory="16MiB")
        bytes_of[quantization or dtype] = weight_bytes(llm.model)
        routers = sum(m.weight.numel() for m in llm.model.modules() if isinstance(m, Gate))  # fp32 in every plan
    cfg = llm.config
    active = cfg.param_counts()["activated"] - cfg.hidden_size  # an embedding row is looked up, not multiplied
    # absorbed decode reads W_UK and W_UV^T (kv_b_proj's own numbers, rearranged) instead of kv_b_proj
    assert bytes_of["float32"]["decode_weight_bytes_per_token"] == 4 * active
    assert bytes_of["bfloat16"]["decode_weight_bytes_per_token"] == 2 * active + 2 * routers
    assert bytes_of["int8"]["decode_weight_bytes_per_token"] < 0.6 * bytes_of["bfloat16"]["decode_weight_bytes_per_token"]
    assert bytes_of["float32"]["weight_bytes"] >= 4 * cfg.param_counts()["total"]
