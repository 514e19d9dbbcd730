"""Supervised fine-tuning: packed sequences never see each other, the chat loss mask covers assistant tokens only
(token by token on the DeepSeek template), bad lines are reported, and `dsv2 sft` trains, resumes exactly and
exports (full and LoRA)."""
from __future__ import annotations

import pytest
import torch

from conftest import YARN, make_hf_model

import dsv2
from dsv2.model.mla import PackedSequences


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
