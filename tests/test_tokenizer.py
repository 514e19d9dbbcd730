"""Tokenizer: chat template vs MODEL_SPEC section 7, bos handling, streaming detokenization, transformers parity."""
import glob
import json
import os
import shutil
import sysconfig

import jinja2
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.pre_tokenizers import ByteLevel

from dsv2.tokenizer import DEEPSEEK_CHAT_TEMPLATE, IncrementalDetokenizer, Tokenizer
from dsv2.train.bpe import BOS, EOS, train_tokenizer

from conftest import REFERENCE

# the published DeepSeek-Coder-V2-Lite tokenizer_config.json (AddedToken dicts, the chat template), kept beside the repo
REAL_CONFIG = os.path.join(REFERENCE, "configs", "DeepSeek-Coder-V2-Lite", "tokenizer_config.json")

MULTILINGUAL = ("Hello, 世界! 中文测试：深度求索。日本語のテキスト、한국어 텍스트.\n"
                "Emoji 😀👍🏽🇯🇵👨‍👩‍👧 café naïve e\u0301 Zoë — ünïcödé ∑∫√ \t tabs\n\n  two spaces\n")
SAMPLES = ["hello world", "def f(x):\n    return x ** 2\n", "  leading spaces", MULTILINGUAL, "", "a" * 50,
           f"x{EOS}y", "中文😀"]


def corpus():
    # ~100 KB streamed from the stdlib plus a little multi-byte text, so that some merges end mid-character
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py")))[:20]:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read(5000)
    for _ in range(10):
        yield "深度求索的中文语料，测试字节级分词。日本語と한국어も少し。表情 😀😃👍 café über naïve.\n"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tok"))
    train_tokenizer(corpus(), out, vocab_size=1200)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_pretrained(tok_dir)


def variant(tok_dir, tmp_path, config):
    """The trained tokenizer.json next to a different tokenizer_config.json (None: no config file)."""
    shutil.copy(os.path.join(tok_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return str(tmp_path)


def real_config():
    if not os.path.exists(REAL_CONFIG):
        pytest.skip(f"{REAL_CONFIG} not found")
    with open(REAL_CONFIG, encoding="utf-8") as f:
        return json.load(f)


# ---- attributes and encoding

def test_attributes(tok):
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, EOS)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 1)
    assert tok.add_bos_token and tok.model_max_length == 4096
    assert tok.vocab_size == 1200 and {0, 1} <= set(tok.all_special_ids)
    assert tok.chat_template == DEEPSEEK_CHAT_TEMPLATE == real_config()["chat_template"]
    assert tok.convert_ids_to_tokens([0, 1]) == [BOS, EOS] and tok.token_to_id(EOS) == 1


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[1:] == tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == BOS + text
    assert tok.decode(ids, skip_special_tokens=True) == text.replace(EOS, "")


def test_no_double_bos(tok):
    assert tok.encode(BOS + "hi") == tok.encode("hi")
    assert tok.encode(BOS + "hi").count(tok.bos_token_id) == 1


def test_add_bos_token_respected(tok_dir, tmp_path):
    # the file's post-processor adds bos on its own; add_bos_token=false must still win
    assert HFTokenizer.from_file(os.path.join(tok_dir, "tokenizer.json")).encode("hi").ids[0] == 0
    no_bos = Tokenizer.from_pretrained(variant(tok_dir, tmp_path, {**real_config(), "add_bos_token": False}))
    assert not no_bos.add_bos_token and no_bos.encode("hi")[0] != no_bos.bos_token_id


def test_defaults_without_config(tok_dir, tmp_path):
    bare = Tokenizer.from_pretrained(variant(tok_dir, tmp_path, None))
    assert bare.bos_token is None and bare.eos_token_id is None and not bare.add_bos_token
    assert bare.chat_template == DEEPSEEK_CHAT_TEMPLATE and bare.model_max_length is None


def test_special_tokens_map_and_added_token_dicts(tok_dir, tmp_path):
    d = variant(tok_dir, tmp_path, {"bos_token": {"__type": "AddedToken", "content": BOS}, "eos_token": "<|EOT|>"})
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": EOS}}), encoding="utf-8")
    t = Tokenizer.from_pretrained(d)
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (0, 1, 1)
    assert t.add_bos_token  # not in the config: follows the post-processor of tokenizer.json, as transformers 5 does


# ---- chat template (MODEL_SPEC section 7)

CHATS = [  # (messages, add_generation_prompt, expected with B = bos, E = eos)
    ([{"role": "user", "content": "u1"}], True, "{B}User: u1\n\nAssistant:"),
    ([{"role": "system", "content": "sys"}, {"role": "user", "content": "u1"}], True,
     "{B}sys\n\nUser: u1\n\nAssistant:"),
    ([{"role": "system", "content": "sys"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
      {"role": "user", "content": "u2"}], True, "{B}sys\n\nUser: u1\n\nAssistant: a1{E}User: u2\n\nAssistant:"),
    ([{"role": "user", "content": "中文 😀"}, {"role": "assistant", "content": "ok"}], False,
     "{B}User: 中文 😀\n\nAssistant: ok{E}"),
]


@pytest.mark.parametrize("source", ["real_config", "default"])
@pytest.mark.parametrize("messages,gen,expected", CHATS)
def test_chat_template(tok_dir, tmp_path, source, messages, gen, expected):
    config = real_config() if source == "real_config" else {"bos_token": BOS, "eos_token": EOS}
    t = Tokenizer.from_pretrained(variant(tok_dir, tmp_path, config))
    expected = expected.format(B=BOS, E=EOS)
    text = t.apply_chat_template(messages, add_generation_prompt=gen)
    assert text == expected
    ids = t.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
    assert ids[0] == t.bos_token_id and ids.count(t.bos_token_id) == 1
    assert ids == t.encode(text) and t.decode(ids) == text


def test_chat_template_extra_variables(tok_dir, tmp_path):
    config = {"bos_token": BOS, "eos_token": EOS,
              "chat_template": "{% if not messages %}{{ raise_exception('empty') }}{% endif %}{{ greeting }}"}
    t = Tokenizer.from_pretrained(variant(tok_dir, tmp_path, config))
    assert t.apply_chat_template([{"role": "user", "content": "x"}], greeting="hey") == "hey"
    with pytest.raises(jinja2.TemplateError, match="empty"):
        t.apply_chat_template([])


@pytest.mark.parametrize("messages,problem", [
    ("hello", "must be a list"),
    ([("user", "hi")], r"messages\[0\] must be a dict"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], r"messages\[1\]\['role'\] is 'tool'"),
    ([{"content": "a"}], r"\['role'\] is None"),
    ([{"role": "user", "content": None}], r"messages\[0\]\['content'\] must be a string"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}]}], "must be a string, got list"),
])
def test_bad_messages(tok, messages, problem):
    with pytest.raises(ValueError, match=problem):
        tok.apply_chat_template(messages)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_pretrained(str(tmp_path))


def test_mismatched_special_token(tok_dir, tmp_path):
    with pytest.raises(ValueError, match="eos_token='</s>'"):
        Tokenizer.from_pretrained(variant(tok_dir, tmp_path, {"eos_token": "</s>"}))


# ---- streaming detokenization

def stream(tok, ids, skip_special_tokens=True, prompt_ids=None):
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    return deltas, detok


def byte_tokens(tok, text):
    """One token per UTF-8 byte: the worst case for multi-byte characters."""
    symbols = "".join(s for s, _ in ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text))
    return [tok.token_to_id(c) for c in symbols]


def test_tokens_split_characters(tok):
    # the streaming tests below are only meaningful if BPE tokens cut UTF-8 characters, as real vocabularies do
    pieces = [tok.decode([i]) for i in tok.encode(MULTILINGUAL, add_special_tokens=False)]
    assert any(p.endswith("\ufffd") and len(p) > 1 for p in pieces)  # e.g. "中" + the first bytes of "文"


@pytest.mark.parametrize("text", [MULTILINGUAL, "中文😀", "e\u0301\u0301 👨‍👩‍👧 ok", "a  b\n\n c " * 3])
@pytest.mark.parametrize("split", ["bpe", "bytes"])
def test_stream_matches_decode(tok, text, split):
    ids = tok.encode(text, add_special_tokens=False) if split == "bpe" else byte_tokens(tok, text)
    assert tok.decode(ids) == text
    deltas, _ = stream(tok, ids)
    assert "".join(deltas) == text and deltas[-1] == ""  # nothing was left for flush
    emitted = ""
    for d in deltas:  # never half a character, never anything later text would change
        emitted += d
        assert "\ufffd" not in d and text.startswith(emitted)


@pytest.mark.parametrize("skip", [True, False])
def test_stream_with_special_tokens(tok, skip):
    ids = [tok.bos_token_id] + byte_tokens(tok, "中文 😀") + [tok.eos_token_id] + tok.encode(MULTILINGUAL, False)
    ids += [tok.eos_token_id, tok.eos_token_id]
    deltas, _ = stream(tok, ids, skip_special_tokens=skip)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert (EOS in "".join(deltas)) != skip


def test_stream_after_prompt(tok):
    prompt = tok.apply_chat_template([{"role": "user", "content": "中文?"}], tokenize=True)
    out = tok.encode(" 好的 😀 sure", add_special_tokens=False) + [tok.eos_token_id]
    deltas, _ = stream(tok, out, prompt_ids=prompt)
    full, head = tok.decode(prompt + out, True), tok.decode(prompt, True)
    assert "".join(deltas) == full[len(head):] == " 好的 😀 sure"


def test_stream_invalid_bytes(tok):
    # a lone lead byte stays U+FFFD forever: emitted once later text arrives, or by flush at the end
    lead = byte_tokens(tok, "中")[0]
    ids = [lead] + tok.encode("ok", False) + [lead, lead]
    deltas, _ = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == "\ufffdok\ufffd\ufffd"
    assert deltas[-1] == "\ufffd\ufffd"  # held back until flush


def test_stream_metaspace_leading_space(tmp_path):
    # sentencepiece-style decoders drop the space of the first token they see: a window decode must not leak that
    from tokenizers import decoders, models, pre_tokenizers, trainers
    sp = HFTokenizer(models.BPE())
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    sp.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=600, show_progress=False))
    sp.save(str(tmp_path / "tokenizer.json"))
    t = Tokenizer.from_pretrained(str(tmp_path))
    ids = t.encode("the quick brown fox jumps over the lazy dog " * 4)
    assert "".join(t.decode([i]) for i in ids) != t.decode(ids)  # decoding token by token loses the spaces
    deltas, _ = stream(t, ids)
    assert "".join(deltas) == t.decode(ids)


def test_stream_window_is_bounded(tok):
    ids = tok.encode(MULTILINGUAL * 10, add_special_tokens=False)
    deltas, detok = stream(tok, ids)
    assert "".join(deltas) == MULTILINGUAL * 10
    assert len(detok.ids) < 2 * IncrementalDetokenizer.CONTEXT


# ---- transformers parity (test-only dependency)

@pytest.mark.parametrize("source", ["trained", "real_config"])
def test_transformers_parity(tok_dir, tmp_path, source):
    transformers = pytest.importorskip("transformers")
    d = tok_dir if source == "trained" else variant(tok_dir, tmp_path, real_config())
    ours, theirs = Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(d)
    for text in SAMPLES:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False), text
    for messages, gen, _ in CHATS:
        text = ours.apply_chat_template(messages, add_generation_prompt=gen)
        assert text == theirs.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        ids = theirs.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        assert ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True) == ids
    ids = ours.encode(MULTILINGUAL + EOS)
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
