"""Tokenizer.encode_within, the server's way to tokenize: the same ids as encode where the text fits the limit,
None where it does not -- decided without tokenizing all of a text that is far too long (by its length, or by a
prefix), which a spy on the Rust tokenizer checks."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.pre_tokenizers import ByteLevel, Sequence, Whitespace

from conftest import stdlib_text
from dsv2.tokenizer import Tokenizer


class Spy:
    """The Rust tokenizer, recording the length of every text it is asked to encode."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode_batch(self, texts, **kw):
        self.lengths += map(len, texts)
        return self.tok.encode_batch(texts, **kw)

    def encode_batch_fast(self, texts, **kw):
        self.lengths += map(len, texts)
        return self.tok.encode_batch_fast(texts, **kw)


@pytest.fixture(scope="module")
def tok(llm_dir):
    return Tokenizer.from_pretrained(llm_dir)


@pytest.fixture(scope="module")
def code():
    return "".join(stdlib_text(40, 30000))


def spied(tok: Tokenizer) -> Spy:
    spy = Tokenizer.__new__(Tokenizer)
    spy.__dict__.update(tok.__dict__)
    spy._tok = Spy(tok._tok)
    return spy


def texts(tok: Tokenizer, code: str) -> list[str]:
    sparse = ("    " * 16 + "x\n") * 500  # many characters per token: the prefix probes stay under the limit
    return ["", "x", code[:1000], code[:20000], sparse, f"a{tok.eos_token}b  {tok.bos_token}" * 300,
            "héllo wörld 中文 😀 " * 500, tok.bos_token + code[:3000]]


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_within_equals_encode_or_says_it_does_not_fit(tok, code, add_special_tokens):
    for text in texts(tok, code):
        ids = tok.encode(text, add_special_tokens=add_special_tokens)
        for limit in {len(ids), len(ids) - 1, len(ids) // 3, 1, 10 * len(ids) + 10}:
            got = tok.encode_within(text, limit, add_special_tokens=add_special_tokens)
            assert got == (ids if len(ids) <= limit else None), (text[:40], len(ids), limit)


def test_a_sparse_text_that_fits_is_probed_then_encoded_whole(tok, code):
    spy = spied(tok)
    sparse = texts(tok, code)[4]
    ids = tok.encode(sparse)
    assert spy.encode_within(sparse, len(ids)) == ids
    assert min(spy._tok.lengths) < len(sparse) and max(spy._tok.lengths) == len(sparse)


def test_a_text_far_too_long_is_refused_without_tokenizing_all_of_it(tok, code):
    assert tok.max_token_chars == max(map(len, tok._tok.get_vocab(with_added_tokens=True)))
    spy = spied(tok)
    assert spy.encode_within("a" * 1_000_000, 1000) is None  # by its length alone: no token covers 1000 a's
    assert spy._tok.lengths == []
    text = (code * 2)[:1_000_000]
    assert len(text) <= 50_000 * tok.max_token_chars  # the length alone does not decide it ...
    assert spy.encode_within(text, 50_000) is None  # ... a prefix does
    assert 0 < max(spy._tok.lengths) < len(text) // 4


def test_a_tokenizer_that_drops_text_gets_no_length_bound(tok, code):
    hf = HFTokenizer.from_str(tok._tok.to_str())
    hf.pre_tokenizer = Sequence([Whitespace(), ByteLevel(use_regex=False)])  # spaces are dropped, not tokens
    dropping = Tokenizer(hf, {"bos_token": tok.bos_token, "eos_token": tok.eos_token})
    assert dropping.max_token_chars is None
    spaces = " " * 100_000 + "x"  # one token, though far longer than limit * the longest token
    assert dropping.encode_within(spaces, 10) == dropping.encode(spaces)
    for text in texts(tok, code)[:5]:
        ids = dropping.encode(text)
        assert dropping.encode_within(text, len(ids)) == ids and dropping.encode_within(text, len(ids) - 1) is None
