"""Tokenizer for DeepSeek-V2 checkpoints: tokenizer.json (byte-level BPE via the `tokenizers` library),
tokenizer_config.json (special tokens, add_bos_token, chat template), and a streaming detokenizer.

    tok = Tokenizer.from_pretrained("path/to/DeepSeek-V2-Lite-Chat")
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)  # one bos, ends "Assistant:"
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    for t in generated: print(detok.add(t), end="")
"""
import functools
import json
import os
from collections.abc import Iterable, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

# Verbatim from DeepSeek-V2-Chat / V2-Lite-Chat / Coder-V2-Lite tokenizer_config.json (MODEL_SPEC section 7):
# <bos>{system}\n\nUser: {u1}\n\nAssistant: {a1}<eos>User: {u2}\n\nAssistant:
DEEPSEEK_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")
# pre-tokenizers that keep every character of the text (unless told to remove some: "behavior": "Removed")
KEEPS_TEXT = ("ByteLevel", "Split", "Digits", "Punctuation")


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it from the original checkpoint") from None


def _token_str(value) -> str | None:
    # tokenizer_config.json writes special tokens either as strings or as {"__type": "AddedToken", "content": ...}
    return value.get("content") if isinstance(value, dict) else value


def _compile_template(source: str) -> jinja2.Template:
    # The environment transformers uses, so templates written for it render identically here.
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


class Tokenizer:
    """A Hugging Face tokenizer directory, read without transformers. Build with `Tokenizer.from_pretrained(dir)`."""

    def __init__(self, tok: HFTokenizer, config: dict, chat_template: str | None = None):
        self._tok = tok
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.pad_token = _token_str(config.get("pad_token")) or self.eos_token
        self.bos_token_id = self._special_id(self.bos_token, "bos_token")
        self.eos_token_id = self._special_id(self.eos_token, "eos_token")
        self.pad_token_id = self._special_id(self.pad_token, "pad_token")
        # transformers 5 ignores add_bos_token when a tokenizer.json exists and lets its post-processor decide;
        # we read the flag when the config has it and fall back to what the post-processor does.
        adds_bos = self.bos_token_id is not None and tok.encode("").ids[:1] == [self.bos_token_id]
        self.add_bos_token = bool(config.get("add_bos_token", adds_bos)) and self.bos_token_id is not None
        # add_bos_token is the single source of truth: the post-processor must not add a second bos, and a
        # truncation/padding setting saved in tokenizer.json must not silently cut or pad prompts.
        tok.post_processor = None
        tok.no_truncation()
        tok.no_padding()
        self.chat_template = chat_template or DEEPSEEK_CHAT_TEMPLATE
        self.model_max_length = config.get("model_max_length")
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.all_special_ids = sorted(special | {i for i in (self.bos_token_id, self.eos_token_id) if i is not None})
        self._template = None

    @classmethod
    def from_pretrained(cls, path: str) -> "Tokenizer":
        """Load tokenizer.json (required), tokenizer_config.json and special_tokens_map.json (optional) from `path`."""
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"no tokenizer.json in {path!r}: dsv2 reads the fast-tokenizer file only; copy it "
                                    f"from the original checkpoint (a tokenizer.model alone is not enough)")
        tok = HFTokenizer.from_file(tok_file)
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        # special_tokens_map.json wins over tokenizer_config.json, as in transformers
        config.update({k: v for k, v in _read_json(os.path.join(path, "special_tokens_map.json")).items() if v})
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...] in some configs
            template = {t["name"]: t["template"] for t in template}.get("default")
        jinja_file = os.path.join(path, "chat_template.jinja")  # transformers 5 saves the template here
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        return cls(tok, config, template)

    def _special_id(self, token: str | None, key: str) -> int | None:
        if token is None:
            return None
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer_config.json sets {key}={token!r}, but tokenizer.json has no such token; "
                             f"the two files come from different tokenizers")
        return i

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; prepends bos when add_bos_token, unless the text already starts with it."""
        return self._with_bos(self._tok.encode(text).ids, add_special_tokens)

    def _with_bos(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        if add_special_tokens and self.add_bos_token and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def encode_within(self, text: str, limit: int, add_special_tokens: bool = True) -> list[int] | None:
        """encode(text) if that is at most `limit` tokens, else None -- found without tokenizing all of a text that
        is far too long: by its length (see max_token_chars), else by a prefix whose whole words alone are over the
        limit (each prefix twice the last, so at most twice the work of a text that fits). Tokenizes with the GIL
        released: on a worker thread it leaves an event loop free."""
        span = self.max_token_chars
        if span is not None and len(text) > limit * span:
            return None
        margin = self._longest_token + 2  # words this close to a cut may end differently in the whole text
        cut = 4 * limit + margin
        while cut < len(text):
            prefix = self._tok.encode_batch([text[:cut]], add_special_tokens=False)[0]
            if _tokens_of_whole_words(prefix, cut - margin) > limit:
                return None
            cut *= 2
        ids = self._tok.encode_batch_fast([text], add_special_tokens=False)[0].ids
        ids = self._with_bos(ids, add_special_tokens)
        return ids if len(ids) <= limit else None

    @functools.cached_property
    def _longest_token(self) -> int:
        return max(map(len, self._tok.get_vocab(with_added_tokens=True)))

    @functools.cached_property
    def max_token_chars(self) -> int | None:
        """The most characters of text one token can stand for, so that a text of L characters has at least
        L / max_token_chars tokens -- where the tokenizer keeps every character and each token's string is at least
        as long as the text it covers: byte-level BPE (a token's string has a character per byte, a byte is at most
        a character), no normalizer, no pre-tokenizer that drops text and no added token that swallows the spaces
        around it. DeepSeek's tokenizers and dsv2's own are such. None for any other."""
        state = lambda part: json.loads(part.__getstate__()) if part is not None else None  # noqa: E731
        if state(self._tok.normalizer) not in (None, {"type": "Sequence", "normalizers": []}):
            return None
        pre = state(self._tok.pre_tokenizer) or {}
        parts = pre.get("pretokenizers", [pre])
        if (type(self._tok.model).__name__ != "BPE" or not any(p.get("type") == "ByteLevel" for p in parts)
                or any(p.get("type") not in KEEPS_TEXT or p.get("behavior") == "Removed" for p in parts)
                or any(t.lstrip or t.rstrip for t in self._tok.get_added_tokens_decoder().values())):
            return None
        return self._longest_token

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(int(i)) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **extra) -> str | list[int]:
        """Render `messages` ([{"role": "system"|"user"|"assistant", "content": str}, ...]) with the chat template.

        With tokenize=True returns ids; no bos is added on top of the one the template writes.
        """
        if not isinstance(messages, (list, tuple)):
            raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                             f"got {type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
            if m.get("role") not in ROLES:
                raise ValueError(f"messages[{i}]['role'] is {m.get('role')!r}; expected one of {', '.join(ROLES)}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}]['content'] must be a string, got {type(m.get('content')).__name__} "
                                 f"(join multi-part content into one string first)")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                     pad_token=self.pad_token or "", **extra)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _tokens_of_whole_words(encoding, end: int) -> int:
    """How many leading tokens of `encoding` belong to words (pre-tokens) that end before character `end`: exactly
    the tokens the whole text starts with, when `end` is far enough from where the encoded prefix was cut. 0 when
    that character is in no token (a tokenizer that drops it), which only makes the caller look further."""
    i = encoding.char_to_token(end)
    if i is None:
        return 0
    word = encoding.token_to_word(i)
    return i if word is None else encoding.word_to_tokens(word)[0]


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas for streaming.

    Each step decodes a short window of recent tokens and emits what it adds beyond the text already emitted,
    so decoders that drop a leading space on the first token never do so mid-stream, and a trailing U+FFFD
    (a UTF-8 character split across tokens) is held back until the bytes that complete it arrive.
    "".join(deltas) + flush() == tokenizer.decode(ids, skip_special_tokens) for the generated ids.
    """

    CONTEXT = 5  # tokens kept before the new ones, as vLLM does

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        prompt_ids = [] if prompt_ids is None else list(prompt_ids)
        self.ids = [int(i) for i in prompt_ids[-self.CONTEXT:]]  # the window: context + tokens not yet slid out
        self.emitted = len(self._decode().rstrip("\ufffd"))  # chars of the window's text already accounted for
        self._pieces = []  # joined on demand: appending to one str would copy it every step

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one generated token; return the new text it completes (possibly "")."""
        self.ids.append(int(token_id))
        window = self._decode()
        # A trailing U+FFFD may be an incomplete multi-byte character: hold it back. If it is a real invalid
        # byte, the next token (or flush) emits it.
        stable = window.rstrip("\ufffd")
        delta = stable[self.emitted:]
        self.emitted = max(self.emitted, len(stable))
        if stable == window and len(self.ids) >= 2 * self.CONTEXT:
            # Clean end and everything emitted: slide the window so each step decodes O(CONTEXT) tokens. (Only a
            # run of tokens that all end mid-character keeps it growing, until one ends cleanly.)
            self.ids = self.ids[-self.CONTEXT:]
            self.emitted = len(self._decode())
        self._pieces.append(delta)
        return delta

    def flush(self) -> str:
        """Emit text still held back (a U+FFFD that no later token completed); call when the sequence ends."""
        delta = self._decode()[self.emitted:]
        self.emitted += len(delta)
        self._pieces.append(delta)
        return delta
