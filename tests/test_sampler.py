"""Sampler: each logits processor on hand-made numbers, sampling against softmax, seeds, logprobs, validation."""
import math

import pytest
import torch

from dsv2.engine.sampler import Sampler, make_generator, prompt_logprobs, token_logprobs
from dsv2.engine.sampling_params import SamplingParams
from dsv2.engine.sequence import Sequence

EOS = 0


def seqs_for(params_list, prompt=(5, 6), outputs=()):
    seqs = []
    for p in params_list:
        s = Sequence(list(prompt), p)
        for t in outputs:
            s.append_token(t)
        seqs.append(s)
    return seqs


def draw(logits_row, params, n, seed=0):
    """n independent samples from one row of logits, as one batch."""
    sampler = Sampler([EOS], seed=seed)
    return torch.tensor(sampler(logits_row.expand(n, -1).clone(), seqs_for([params] * n)).token_ids)


def test_greedy_top_k_1_and_tiny_top_p_all_equal_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    expected = logits.argmax(-1).tolist()
    sampler = Sampler([EOS], seed=0)
    for p in (SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(top_p=1e-6),
              SamplingParams(temperature=0.5, top_k=1, top_p=0.9), SamplingParams(min_p=1.0)):
        assert sampler(logits, seqs_for([p] * 6)).token_ids == expected, p
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


def test_sampling_matches_softmax_with_temperature():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    n = 20000
    for t in (0.7, 1.0, 1.5):
        counts = torch.bincount(draw(logits, SamplingParams(temperature=t), n), minlength=6).float()
        expected = (logits / t).softmax(-1) * n
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 30, (t, counts, expected)  # df = 5: p < 1e-5 for a correct sampler


def test_top_k_top_p_and_min_p_cut_the_tail():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    seen = lambda p: set(draw(logits, p, 4000).tolist())  # noqa: E731
    assert seen(SamplingParams()) == {0, 1, 2, 3}
    assert seen(SamplingParams(top_k=2)) == {0, 1}
    assert seen(SamplingParams(top_p=0.7)) == {0, 1}  # 0.5 < 0.7, so the next token is needed too
    assert seen(SamplingParams(top_p=0.85)) == {0, 1, 2}
    assert seen(SamplingParams(min_p=0.2)) == {0, 1, 2}  # 0.05 < 0.2 * 0.5
    assert seen(SamplingParams(min_p=0.5)) == {0, 1}
    assert seen(SamplingParams(top_k=3, top_p=0.6)) == {0, 1}
    # top-k without top-p keeps ties with the k-th value; per-row settings mix in one batch
    sampler = Sampler(seed=1)
    rows = torch.stack([logits, logits, logits])
    out = {i: set() for i in range(3)}
    for _ in range(300):
        tok = sampler(rows, seqs_for([SamplingParams(top_k=1), SamplingParams(top_k=3), SamplingParams()])).token_ids
        for i, t in enumerate(tok):
            out[i].add(t)
    assert out == {0: {0}, 1: {0, 1, 2}, 2: {0, 1, 2, 3}}


def test_top_p_mass_is_renormalised_after_top_k():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # after top_k=2: [4/7, 3/7]; top_p=0.5 then keeps only the first
    assert set(draw(logits, SamplingParams(top_k=2, top_p=0.5), 2000).tolist()) == {0}


def test_repetition_penalty_follows_hf():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 3.0]])
    seq = seqs_for([SamplingParams(repetition_penalty=2.0)], prompt=(0, 1), outputs=(2,))
    x = Sampler().apply_penalties(logits, seq)
    assert x.tolist() == [[1.0, -4.0, 0.5, -1.0, 0.5, 3.0]]
    assert logits.tolist() == [[2.0, -2.0, 1.0, -1.0, 0.5, 3.0]], "input changed"


def test_presence_and_frequency_penalties_follow_openai_on_output_tokens_only():
    logits = torch.zeros(1, 5)
    seq = seqs_for([SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)], prompt=(4, 4), outputs=(1, 1, 1, 2))
    x = Sampler().apply_penalties(logits, seq)
    assert x.tolist() == [[0.0, -(0.75 + 0.5), -(0.25 + 0.5), 0.0, 0.0]]
    neg = seqs_for([SamplingParams(presence_penalty=-1.0)], outputs=(3,))
    assert Sampler().apply_penalties(logits, neg)[0, 3].item() == 1.0


def test_eos_and_stop_tokens_are_masked_until_min_tokens():
    logits = torch.tensor([[10.0, 0.0, 9.0, 8.0]])  # eos=0 best, then stop token 2
    sampler = Sampler([EOS])
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[2])
    assert sampler(logits, seqs_for([p], outputs=(1,))).token_ids == [3]
    assert sampler(logits, seqs_for([p], outputs=(1, 1))).token_ids == [0]
    ignore = SamplingParams(temperature=0, ignore_eos=True)
    assert sampler(logits, seqs_for([ignore], outputs=(1, 1))).token_ids == [2]
    assert Sampler(EOS)(logits, seqs_for([SamplingParams(temperature=0)])).token_ids == [0]
    assert set(draw(torch.tensor([5.0, 0.0, 5.0]), SamplingParams(min_tokens=1), 500).tolist()) == {1, 2}


def test_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    V = 1000
    mine = torch.randn(V)
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=7)

    def first_tokens(others, where):
        """The seeded row's first 3 tokens, with `others` (unseeded rows) around it, at position `where`."""
        seq = Sequence([1, 2, 3], params, generator=make_generator(7, 0))
        tokens = []
        for _ in range(3):
            rows = others[:where] + [mine] + others[where:]
            seqs = [Sequence([4], SamplingParams(temperature=1.2)) for _ in others]
            seqs.insert(where, seq)
            tokens.append(Sampler()(torch.stack(rows), seqs).token_ids[where])
        return tokens

    alone = first_tokens([], 0)
    assert len(set(alone)) > 1  # the stream advances
    for n, where in ((4, 2), (3, 0), (5, 5)):
        assert first_tokens(list(torch.randn(n, V)), where) == alone


def test_generators_per_completion_are_reproducible_and_distinct():
    a, b, c = (torch.rand(4, generator=g).tolist() for g in (make_generator(1, 0), make_generator(1, 0),
                                                              make_generator(1, 1)))
    assert a == b and a != c
    assert torch.rand(4, generator=make_generator(2, 0)).tolist() != a


def test_logprobs_come_from_raw_logits():
    torch.manual_seed(0)
    logits = torch.randn(3, 40)
    params = [SamplingParams(logprobs=5, temperature=0.3, repetition_penalty=1.5, top_k=3),
              SamplingParams(logprobs=0, temperature=0), SamplingParams()]
    out = Sampler(seed=0)(logits, seqs_for(params, outputs=(3, 4)))
    ref = logits.log_softmax(-1)
    for row in (0, 1):
        lp, tok = out.logprobs[row], out.token_ids[row]
        assert lp.token_id == tok and math.isclose(lp.logprob, ref[row, tok].item(), abs_tol=1e-6)
        assert lp.rank == int((ref[row] > ref[row, tok]).sum()) + 1
    top = out.logprobs[0].top
    assert [t for t, _ in top] == ref[0].topk(5).indices.tolist()
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert out.logprobs[1].top == [] and out.logprobs[1].rank == 1 and out.logprobs[2] is None


def test_prompt_logprobs_chunks_concatenate():
    torch.manual_seed(0)
    prompt = [3, 1, 4, 1, 5, 9, 2]
    logits = torch.randn(len(prompt), 12)  # one row per prompt position; the last scores the first output
    whole = prompt_logprobs(logits, prompt, 2)
    assert len(whole) == len(prompt) and whole[0] is None
    ref = logits.log_softmax(-1)
    for t in range(1, len(prompt)):
        assert whole[t].token_id == prompt[t] and math.isclose(whole[t].logprob, ref[t - 1, prompt[t]].item(),
                                                                abs_tol=1e-6)
        assert [i for i, _ in whole[t].top] == ref[t - 1].topk(2).indices.tolist()
    chunks = prompt_logprobs(logits[:3], prompt, 2) + prompt_logprobs(logits[3:], prompt, 2, start=3)
    assert chunks == whole
    assert token_logprobs(logits[:2], prompt[1:3], 2) == whole[1:3]


def _count_ops(fn) -> int:
    """How many torch operators fn dispatches (a structural measure: no clocks on a shared machine)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def test_large_batch_is_vectorised():
    """Filtering, penalties and sampling run batched: the operator count does not grow with the batch, except for
    the draw from each seeded row's own generator (a fixed few operators per seeded row)."""
    def run(B: int, seeded: bool):
        torch.manual_seed(0)
        logits = torch.randn(B, 32000)
        params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1,
                                 frequency_penalty=0.2, seed=i if seeded else None) for i in range(B)]
        seqs = [Sequence(list(range(i, i + 200)), p, generator=make_generator(i, 0) if seeded else None)
                for i, p in enumerate(params)]
        out = []
        n = _count_ops(lambda: out.append(Sampler()(logits, seqs)))
        assert len(out[0].token_ids) == B
        return n

    assert run(64, seeded=False) == run(8, seeded=False)
    per_row = (run(64, seeded=True) - run(8, seeded=True)) / 56
    assert 0 < per_row <= 4, per_row


@pytest.mark.parametrize("kwargs, field", [
    (dict(n=0), "n"), (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"), (dict(min_p=1.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"), (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs"), (dict(prompt_logprobs=30), "prompt_logprobs"),
    (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} must be"):
        SamplingParams(**kwargs)


def test_params_normalise_and_reject_unknown_names():
    p = SamplingParams(stop="###", max_tokens=None, top_k=-1)
    assert p.stop == ["###"] and p.stop_token_ids == [] and p.max_tokens is None
    assert SamplingParams().stop == [] and SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    with pytest.raises(TypeError):
        SamplingParams(best_of=2)
