"""The model dsv2 ships (src/dsv2/assets/dsv2-tiny-stdlib): present, small, a complete DeepSeek-V2, and the default
of LLM(), `dsv2 generate` and `dsv2 serve` when no model is given."""
import json
import os
import subprocess
import sys

import pytest
import torch

import dsv2
from dsv2.assets import DEFAULT_MODEL, default_model_path
from dsv2.config import ModelConfig
from dsv2 import LLM, SamplingParams
from dsv2.tokenizer import Tokenizer
from dsv2.train.samples import complete

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
PROMPT = "def fibonacci(n):"


def test_the_shipped_model_is_complete_and_small():
    assert default_model_path() == DEFAULT_MODEL
    for name in FILES:
        assert os.path.isfile(os.path.join(DEFAULT_MODEL, name)), name
    size = sum(os.path.getsize(os.path.join(DEFAULT_MODEL, n)) for n in os.listdir(DEFAULT_MODEL))
    assert size <= 25 * 2**20, f"{size / 2**20:.1f} MiB shipped"
    cfg = ModelConfig.from_pretrained(DEFAULT_MODEL)
    # every DeepSeek-V2 part: MLA with a query low-rank projection, shared + routed experts, group-limited
    # routing, a YaRN rope block
    assert cfg.q_lora_rank is not None and cfg.kv_lora_rank > 0 and cfg.qk_rope_head_dim > 0
    assert cfg.n_shared_experts >= 1 and cfg.n_routed_experts > cfg.num_experts_per_tok
    assert cfg.topk_method == "group_limited_greedy" and cfg.topk_group < cfg.n_group
    assert cfg.rope_scaling["type"] == "yarn"
    assert 5e6 <= cfg.param_counts()["total"] <= 20e6


def test_llm_without_a_path_is_the_shipped_model_and_matches_a_plain_loop():
    llm = LLM(dtype="float32")
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    model, tok = dsv2.load_model(DEFAULT_MODEL, dtype=torch.float32), Tokenizer.from_pretrained(DEFAULT_MODEL)
    assert out.text == complete(model, tok, PROMPT, max_new_tokens=40)
    assert out.text.strip(), "the shipped model completes Python"


def test_the_shipped_model_loads_in_transformers_with_the_same_logits():
    transformers = pytest.importorskip("transformers")
    ours = dsv2.load_model(DEFAULT_MODEL, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    ids = torch.tensor([Tokenizer.from_pretrained(DEFAULT_MODEL).encode(PROMPT + "\n    if n < 2:\n")])
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_dsv2_generate_without_model_uses_the_shipped_model():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "dsv2.cli", "generate", "--dtype", "float32", "--temperature", "0",
                        "--max-tokens", "40", PROMPT], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    llm = LLM(dtype="float32")
    penalty = llm.generation_defaults["repetition_penalty"]  # the CLI takes what the flags leave out from there
    expected = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40,
                                                     repetition_penalty=penalty))[0].outputs[0].text
    assert expected in p.stdout


def test_generation_config_and_served_name():
    from dsv2.cli.serve import served_name
    with open(os.path.join(DEFAULT_MODEL, "generation_config.json")) as f:
        gen = json.load(f)
    assert gen["eos_token_id"] == ModelConfig.from_pretrained(DEFAULT_MODEL).eos_token_id
    assert served_name(None) == "dsv2-tiny-stdlib"
