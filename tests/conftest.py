"""Shared fixtures: tiny random DeepSeek-V2 checkpoints written by transformers (the published key layout)."""
from __future__ import annotations

import json
import os

import pytest
import torch

REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference")
if not os.path.isdir(REFERENCE):
    REFERENCE = "/work/shared/reference"

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=3,
            first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=12, routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1,
            max_position_embeddings=512, bos_token_id=0, eos_token_id=1)


def make_hf_model(directory, seed: int = 0, std: float = 0.08, rope=None, **overrides):
    """Random tiny transformers DeepseekV2ForCausalLM saved with save_pretrained; returns (dir, hf_model).
    Weights are drawn wider than the init default so routing and attention are far from uniform."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
    torch.manual_seed(seed)
    kw = {**TINY, **overrides}
    kw["rope_parameters"] = rope or {"rope_type": "default", "rope_theta": 10000.0}
    model = DeepseekV2ForCausalLM(DeepseekV2Config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, std)
    model.save_pretrained(str(directory))
    return str(directory), model


def to_published_format(directory) -> None:
    """Rewrite a transformers-5 config.json (rope_parameters) into the published one (rope_theta + rope_scaling)."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        d = json.load(f)
    rp = d.pop("rope_parameters")
    d["rope_theta"] = rp.pop("rope_theta")
    kind = rp.pop("rope_type")
    d["rope_scaling"] = None if kind == "default" else {"type": kind, **rp}
    with open(path, "w") as f:
        json.dump(d, f)


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Token by token, full causal forward over everything each time: no cache at all."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture
def tiny_hf(tmp_path):
    return make_hf_model(tmp_path / "tiny")


def stdlib_text(n_files: int = 20, chars: int = 5000):
    import glob
    import sysconfig
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:n_files]:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read(chars)


def prepare_stdlib_data(root) -> str:
    """A small Python corpus -> a 300-token tokenizer -> prepared shards (15% held out), through the CLI, under
    `root`; returns the data directory."""
    from dsv2.cli import main as cli
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(stdlib_text(n_files=40, chars=4000)):
        (corpus / f"m{i:02d}.py").write_text(text)
    assert cli(["tokenizer", "train", str(corpus), "--out", str(root / "tok"), "--vocab-size", "300",
                "--include", "*.py"]) == 0
    assert cli(["data", "prepare", str(corpus), "--tokenizer", str(root / "tok"), "--out", str(root / "data"),
                "--val-fraction", "0.15", "--include", "*.py"]) == 0
    return str(root / "data")


def make_llm_dir(directory, vocab_size: int = 384, seed: int = 0, **overrides) -> str:
    """A tiny random model with a real byte-level BPE tokenizer (bos 0, eos 1) and generation_config.json."""
    from dsv2.tokenizer import Tokenizer
    from dsv2.train.bpe import train_tokenizer
    directory = str(directory)
    train_tokenizer(stdlib_text(), directory, vocab_size=vocab_size)
    vocab = Tokenizer.from_pretrained(directory).vocab_size
    make_hf_model(directory, seed=seed, vocab_size=vocab, **{"std": 0.15, **overrides})
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1, "temperature": 0.3, "top_p": 0.95, "do_sample": True}, f)
    return directory


@pytest.fixture(scope="session")
def llm_dir(tmp_path_factory):
    return make_llm_dir(tmp_path_factory.mktemp("llm") / "model", rope=YARN,
                        topk_method="group_limited_greedy", n_group=4, topk_group=2)
