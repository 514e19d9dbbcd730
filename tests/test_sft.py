"""Supervised fine-tuning: packed sequences never see each other, the chat loss mask covers assistant tokens only
(token by token on the DeepSeek template), bad lines are reported, and `dsv2 sft` trains, resumes exactly and
exports (full and LoRA)."""
from __future__ import annotations

import pytest
import torch

from conftest import YARN, make_hf_model
from test_lora import _one_thread  # noqa: F401  (autouse: one thread per test)

import dsv2
from dsv2.model.mla import PackedSequences


@pytest.mark.parametrize("rope", [None, YARN, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}],
                         ids=["plain", "yarn", "dynamic"])
def test_packed_sequences_equal_each_sequence_run_alone(tmp_path, rope):
    kw = {"max_position_embeddings": 8} if rope and rope["rope_type"] == "dynamic" else {}  # NTK stretch active
    path, _ = make_hf_model(tmp_path / "m", rope=rope, **kw)
    model = dsv2.load_model(path)
    g = torch.Generator().manual_seed(0)
    rows = [[7, 12, 3, 5], [20, 7]]  # sequence lengths per row; row 0 ends with 5 padding tokens
    T = 27
    ids = torch.randint(2, 128, (2, T), generator=g)
    seg = torch.tensor([sum([[i] * n for i, n in enumerate(r)], []) for r in rows])
    packed = PackedSequences(seg)
    assert packed.positions[0, :10].tolist() == list(range(7)) + [0, 1, 2]
    assert packed.token_context_lengths()[0, 6:9].tolist() == [7, 12, 12]
    with torch.no_grad():
        out = model(ids, attn=packed)
        out_pos = model(ids, positions=packed.positions, attn=packed)
        assert torch.equal(out, out_pos)
        worst = 0.0
        for b, lengths in enumerate(rows):
            start = 0
            for n in lengths:
                alone = model(ids[b:b + 1, start:start + n])[0]
                worst = max(worst, float((out[b, start:start + n] - alone).abs().max()))
                start += n
    assert worst < 2e-5, worst
    assert out.abs().max() > 1.0


def test_one_packed_sequence_per_row_is_the_plain_forward(tmp_path):
    path, _ = make_hf_model(tmp_path / "m")
    model = dsv2.load_model(path)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attn=PackedSequences(torch.zeros(2, 16, dtype=torch.long))), model(ids),
                                   rtol=0, atol=1e-5)


# ---- chat rendering and the loss mask -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deepseek_tok(tmp_path_factory):
    """The shipped tokenizer with the chat template of the published DeepSeek-V2 family, read from its
    tokenizer_config.json."""
    import shutil
    from conftest import REFERENCE
    from dsv2.assets import default_model_path
    from dsv2.tokenizer import Tokenizer
    d = tmp_path_factory.mktemp("tok")
    shutil.copy(f"{default_model_path()}/tokenizer.json", d)
    shutil.copy(f"{REFERENCE}/configs/DeepSeek-Coder-V2-Lite/tokenizer_config.json", d)
    return Tokenizer.from_pretrained(str(d))


CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, since 1871."}]


def test_loss_mask_token_by_token_on_the_deepseek_template(deepseek_tok):
    from dsv2.train.chat_data import encode_conversation
    tok = deepseek_tok
    bos, eos = tok.bos_token, tok.eos_token
    text = f"{bos}You are terse.\n\nUser: Capital of France?\n\nAssistant: Paris.{eos}User: And of Italy?\n\n" \
           f"Assistant: Rome, since 1871.{eos}"
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False) == text  # the published template
    ids, labels = encode_conversation(tok, CHAT)
    assert ids == tok.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=True)  # as one text
    # each token's characters in `text`, and whether they fall in a reply (" Paris.<eos>", " Rome, since 1871.<eos>")
    replies = [(text.index(r), text.index(r) + len(r)) for r in (f" Paris.{eos}", f" Rome, since 1871.{eos}")]
    at, expected = 0, []
    for i in ids:
        piece = tok.decode([i])
        assert text.startswith(piece, at)
        expected.append(any(a <= at and at + len(piece) <= b for a, b in replies))
        assert expected[-1] or not any(a < at + len(piece) and at < b for a, b in replies)  # never straddles
        at += len(piece)
    assert at == len(text)
    assert labels == expected
    assert tok.decode([i for i, m in zip(ids, labels) if m]) == f" Paris.{eos} Rome, since 1871.{eos}"
    assert [i for i, m in zip(ids, labels) if m].count(tok.eos_token_id) == 2 and labels[-1]
    assert not labels[0] and ids[0] == tok.bos_token_id
    # the prompt of turn 2 is exactly what LLM.chat would feed the model (the labels start right after it)
    prompt = tok.apply_chat_template(CHAT[:3] + CHAT[3:4], add_generation_prompt=True, tokenize=True)
    assert ids[:len(prompt)] == prompt and labels[len(prompt)] and not labels[len(prompt) - 1]


def test_prompt_completion_and_bad_lines(tmp_path, deepseek_tok):
    import json
    from dsv2.train.chat_data import encode_conversation, load_chat_jsonl
    lines = [json.dumps({"messages": CHAT}),
             "{not json",
             json.dumps({"prompt": "Capital of France?", "completion": "Paris."}),
             json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]}),
             "",
             json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
             json.dumps({"messages": [{"role": "user", "content": "long " * 400}, {"role": "assistant", "content": "ok"}]}),
             json.dumps({"prompt": CHAT[:3], "completion": CHAT[3:]}),
             json.dumps(["a list"])]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    data = load_chat_jsonl(str(path), deepseek_tok, seq_len=256)
    assert [c.line for c in data.conversations] == [1, 3, 8]
    assert {r: [n for n, _ in v] for r, v in data.problems.items()} == {
        "not JSON": [2], "unknown role (not system, user, assistant)": [4], "no assistant reply to learn": [6],
        "longer than --seq-len 256": [7], "not a JSON object": [9]}
    report = data.report()
    assert "5 bad lines" in report and "'tool'" in report and "tokens)" in report
    single = encode_conversation(deepseek_tok, CHAT[1:3])
    assert (data.conversations[1].ids, data.conversations[1].labels) == single  # prompt/completion = one exchange
    full = data.conversations[0]
    ctx = data.conversations[2]  # the first reply is context only: only " Rome, ..." is learned
    assert ctx.ids == full.ids and sum(ctx.labels) < sum(full.labels) and ctx.labels[-1]
    with pytest.raises(ValueError, match=r"lines? 2.*--strict"):
        load_chat_jsonl(str(path), deepseek_tok, seq_len=256, strict=True)


def test_packed_batches_keep_targets_inside_each_conversation():
    from dsv2.train.chat_data import IGNORE, Conversation, SftBatches, pack_rows
    rows = pack_rows([5, 3, 8, 2, 6], 10)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 8, 2, 6][i] for i in r) <= 10 for r in rows) and len(rows) == 3
    convs = [Conversation(list(range(10 * k + 2, 10 * k + 2 + n)), [False] * (n // 2) + [True] * (n - n // 2), k)
             for k, n in enumerate([5, 3, 8, 2, 6])]
    batches = SftBatches(convs, seq_len=10, seed=0, packing=True, pad_id=1)
    assert batches.rows_per_epoch == 3
    b = batches.get(0, 3)
    assert b.tokens == 24 and b.n_targets == sum(n - n // 2 for n in [5, 3, 8, 2, 6])
    for r in range(3):
        seg, ids, tgt = b.packed.segment_ids[r], b.ids[r], b.targets[r]
        for t in range(b.ids.shape[1]):
            if tgt[t] != IGNORE:  # the next token, of the same conversation
                assert seg[t + 1] == seg[t] and tgt[t] == ids[t + 1]
    assert batches.get(3, 3).ids.tolist() != b.ids.tolist()  # epoch 1: another order
    assert SftBatches(convs, 10, seed=0, pad_id=1).get(3, 3).ids.tolist() == batches.get(3, 3).ids.tolist()  # by (seed, row)
    plain = SftBatches(convs, 10, seed=0, packing=False)
    assert plain.rows_per_epoch == 5 and plain.get(0, 5).packed is None


# ---- dsv2 sft: runs, resume, export -----------------------------------------------------------------------------
def _write_chats(path, n=30, bad=False):
    """Arithmetic chats of very different lengths (a long system prompt on some), and prompt/completion lines."""
    import json
    import random
    rng = random.Random(0)
    lines = []
    for i in range(n):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        msgs = [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": f"{a + b}."}]
        if i % 3 == 0:
            msgs = [{"role": "system", "content": "You add numbers. " * rng.randint(1, 12)}] + msgs + [
                {"role": "user", "content": "And times two?"}, {"role": "assistant", "content": f"{2 * (a + b)}."}]
        lines.append(json.dumps({"messages": msgs}))
        if i % 4 == 0:
            lines.append(json.dumps({"prompt": f"def add_{i}(x):", "completion": f"    return x + {i}"}))
    if bad:
        lines[3:3] = ["{oops", json.dumps({"messages": [{"role": "robot", "content": "beep"}]})]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _sft(*args):
    from dsv2.cli import main as cli
    return cli(["sft", "--quiet", "--threads", "1", "--seq-len", "128", "--batch-size", "2", "--log-every", "1",
                *map(str, args)])


def _train_records(run):
    from dsv2.train.checkpointing import read_metrics
    return [r for r in read_metrics(run) if r["kind"] == "train"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_resumes_exactly(tmp_path, lora):
    """A run whose last checkpoint is lost resumes from the one before and logs the very same losses."""
    import glob
    import os
    data = _write_chats(tmp_path / "chats.jsonl")
    run = str(tmp_path / "run")
    extra = ["--lora-rank", 4, "--lora-targets", "q_a_proj,o_proj,experts", "--lora-dropout", 0.1] if lora else []
    assert _sft("--data", data, "--out", run, "--steps", 6, "--save-every", 3, "--grad-accum", 2, *extra) == 0
    first = _train_records(run)
    assert [r["step"] for r in first] == list(range(1, 7))
    assert first[-1]["ce"] < first[0]["ce"] + 1.0 and all(r["target_tokens"] > 0 for r in first)
    for f in glob.glob(f"{run}/checkpoints/step-00000006.pt*"):
        os.remove(f)
    assert _sft("--resume", "--out", run) == 0
    again = _train_records(run)
    assert [(r["loss"], r["grad_norm"], r["tokens"]) for r in again] == \
        [(r["loss"], r["grad_norm"], r["tokens"]) for r in first]
    import torch as _t
    state = _t.load(f"{run}/checkpoints/step-00000006.pt", weights_only=True)
    assert ("lora_config" in state) == lora
    if lora:  # only what trains is saved
        assert all(".lora_" in k for k in state["model"])


def test_loss_is_per_token_over_the_whole_step(tmp_path):
    """Two micro-batches of one row == one micro-batch of two rows: each assistant token weighs the same."""
    data = _write_chats(tmp_path / "chats.jsonl")
    runs = {}
    for name, b, ga in (("one", 2, 1), ("two", 1, 2)):
        run = str(tmp_path / name)
        assert _sft("--data", data, "--out", run, "--steps", 1, "--batch-size", b, "--grad-accum", ga,
                    "--lr", 1e-3, "--warmup-steps", 0, "--schedule", "constant") == 0
        runs[name] = _train_records(run)[0]
    r1, r2 = runs["one"], runs["two"]
    assert r1["target_tokens"] == r2["target_tokens"]
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)  # a mean per micro-batch would differ by ~10%
    assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-4)


def test_exports_of_a_lora_run_load_in_transformers_and_peft(tmp_path):
    pytest.importorskip("peft")
    import copy
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from dsv2.assets import default_model_path
    from dsv2.cli import main as cli
    from dsv2.train.checkpointing import load_latest
    from dsv2.train.sft import load_lora_run_model
    data = _write_chats(tmp_path / "chats.jsonl")
    run = str(tmp_path / "run")
    assert _sft("--data", data, "--out", run, "--steps", 2, "--lora-rank", 4, "--lr", 5e-2,
                "--lora-targets", "q_a_proj,kv_b_proj,o_proj,gate_proj,down_proj,experts", "--train-router") == 0
    assert cli(["export", run, str(tmp_path / "merged")]) == 0
    assert cli(["export", run, str(tmp_path / "adapter"), "--adapter-only"]) == 0
    unmerged = load_lora_run_model(run, load_latest(run)[0]).eval()
    ids = torch.randint(0, 8192, (2, 40), generator=torch.Generator().manual_seed(0))
    hf_base = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()
    merged_hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(copy.deepcopy(hf_base), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ours = unmerged(ids)
        merged_dsv2 = dsv2.load_model(str(tmp_path / "merged"))(ids)
        base, hf, pm = hf_base(ids).logits, merged_hf(ids).logits, peft(ids).logits
    assert (ours - base).abs().max() > 1e-2  # training moved it
    assert (merged_dsv2 - ours).abs().max() < 1e-4  # merged == unmerged
    assert (hf - ours).abs().max() < 1e-4  # transformers loads the merged export
    assert (pm - ours).abs().max() < 1e-4  # PEFT loads the adapter


def test_sft_reports_bad_lines_and_refuses_with_strict(tmp_path, capsys):
    from dsv2.cli import main as cli
    data = _write_chats(tmp_path / "chats.jsonl", n=6, bad=True)
    assert _sft("--data", data, "--out", tmp_path / "strict", "--steps", 1, "--strict") == 1
    err = capsys.readouterr().err
    assert "dsv2 sft: error:" in err and "not JSON: line 4" in err and "unknown role" in err and "line 5" in err
    assert _sft("--data", data, "--out", tmp_path / "lenient", "--steps", 1) == 0
    assert "2 bad lines (not JSON: line 4; unknown role" in capsys.readouterr().err
    assert _sft("--data", data, "--out", tmp_path / "short", "--steps", 1, "--seq-len", 8) == 1
    assert "no usable conversation" in capsys.readouterr().err
    assert cli(["train", "--resume", "--out", str(tmp_path / "lenient")]) == 1
    assert "`dsv2 sft --resume`" in capsys.readouterr().err
    assert cli(["export", str(tmp_path / "lenient"), str(tmp_path / "x"), "--adapter-only"]) == 1
    assert "not from a LoRA `dsv2 sft` run" in capsys.readouterr().err
