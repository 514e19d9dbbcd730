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
