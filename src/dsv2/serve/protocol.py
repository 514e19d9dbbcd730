"""Request bodies of the OpenAI API (field names from the `openai` package's types) with vLLM's sampling
extensions, validated so that every bad field becomes a 400 naming it, and the OpenAI error shape."""
from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from ..engine.sampling_params import (GENERATION_CONFIG_KNOBS, MAX_LOGPROBS, SamplingParams,
                                      with_generation_defaults)

MAX_STOP_TOKEN_IDS = 256  # each is looked up after every token; a vocabulary's special tokens fit many times over
# OpenAI's limit. Validating a message costs ~5 us on the event loop: a 16 MiB body of 480k tiny ones held it 2.5 s.
MAX_MESSAGES = 2048


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse(model: type[BaseModel], data: Any) -> BaseModel:
    """Validate a decoded JSON body; the first problem becomes a 400 that names its field (`messages[0].role`)."""
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = [(_field(err["loc"], data, missing=err["type"] == "missing"), err) for err in e.errors()]
        # a union reports each member's failure: a list too long beats "not a string" for `content`
        field, err = next((fe for fe in errors if fe[0] == errors[0][0] and not fe[1]["type"].endswith("_type")),
                          errors[0])
        raise APIError(400, f"{field}: {err['msg']}" if field else err["msg"], param=field) from None


def _field(loc: tuple, data: Any, missing: bool) -> str | None:
    """`messages[0].content` from a pydantic error location. The location also holds the union member tried
    (`stop.str`, `content.list[ContentPart]`): a part names a field only where it indexes the body (or is the
    missing key itself)."""
    path, value = [], data
    for i, p in enumerate(loc):
        if isinstance(p, int) and isinstance(value, list) and 0 <= p < len(value):
            path.append(f"[{p}]")
            value = value[p]
        elif isinstance(p, str) and isinstance(value, dict) and p in value:
            path.append(f".{p}")
            value = value[p]
        elif missing and i == len(loc) - 1:
            path.append(f".{p}")
    return "".join(path).lstrip(".") or None


_SURROGATE = re.compile("[\ud800-\udfff]")
# where a decoded body can have gotten one: a \uD800-\uDFFF escape, or raw UTF-8 of one (json.loads decodes bytes
# with surrogatepass); a pair (an emoji written as two escapes) matches too and is then found valid
_SURROGATE_SOURCE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def lone_surrogate(body: bytes, data: Any) -> str | None:
    """The field (`messages[0].content`) of the first string in the decoded `data` that holds a lone UTF-16
    surrogate -- not Unicode text, and nothing downstream (tokenizer, UTF-8 output) can take it; None if none does.
    `body` (the raw bytes) is scanned first, so ordinary bodies cost one regex pass."""
    if (b"\\u" not in body and b"\xed" not in body) or not _SURROGATE_SOURCE.search(body):
        return None
    stack = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path or "body"
        elif isinstance(value, dict):
            for k, v in reversed(value.items()):
                key = ascii(k)[1:-1] if _SURROGATE.search(k) else k
                stack.append((f"{path}.{key}" if path else key, v))
        elif isinstance(value, list):
            stack += ((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))
    return None


def value_error(e: ValueError, param: str | None = None) -> APIError:
    """The engine's and SamplingParams' ValueErrors as 400s ("SamplingParams.top_k must be ..." names top_k)."""
    message = str(e)
    m = re.match(r"SamplingParams\.(\w+) ", message)
    if m:
        param = m.group(1)
        message = message[len("SamplingParams."):]
    code = "context_length_exceeded" if "context length" in message else None
    return APIError(400, message, param=param, code=code)


class _Body(BaseModel):
    # Unknown fields are ignored (clients send `user`, `metadata`, ...); NaN / Infinity are refused. Strict types, as
    # OpenAI checks them: "10", 4.0 or true for an integer is a 400, not a 10, 4 or 1 (an int is a fine float).
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields /v1/completions and /v1/chat/completions share: OpenAI's, then vLLM's extensions."""
    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1)  # None: generation_config.json's, else off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, defaults: dict, max_tokens: int | None, logprobs: int | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """SamplingParams for this request; temperature, top_p, top_k, min_p and repetition_penalty fall back to the
        model's generation_config.json (`defaults`) when the client leaves them out, as vLLM does."""
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by dsv2", param="logit_bias")
        knobs = with_generation_defaults(defaults, **{k: getattr(self, k) for k in GENERATION_CONFIG_KNOBS})
        try:
            return SamplingParams(
                n=self.n, **knobs, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty, max_tokens=max_tokens, min_tokens=self.min_tokens,
                stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, seed=self.seed,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output)
        except ValueError as e:
            raise value_error(e) from None


class CompletionRequest(_Sampling):
    prompt: Any  # str | list[str] | list[int] | list[list[int]], checked by prompts() for a clearer message
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        # type() sets, not isinstance per item: a body of millions of ids is checked in C (and bool is not int)
        kinds = set(map(type, p)) if isinstance(p, list) else set()
        if kinds == {int}:
            return [p]
        if kinds == {str} or (kinds == {list} and all(set(map(type, x)) <= {int} for x in p)):
            return list(p)
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of "
                            "token-id lists (and not empty)", param="prompt")

    def check(self) -> None:
        if self.suffix:
            raise APIError(400, "suffix is not supported by dsv2", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of is not supported by dsv2 (leave it out, or equal to n)", param="best_of")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens must be at least 1; 0 is only valid with echo (to score the prompt)",
                           param="max_tokens")


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_MESSAGES)] | None = None
    name: str | None = None


CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list | None = None
    response_format: dict | None = None

    def check(self) -> None:
        if self.tools:
            raise APIError(400, "tools are not supported by dsv2", param="tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise APIError(400, "response_format other than text is not supported by dsv2", param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


def conversation(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template takes them: text parts joined, `developer` read as `system`."""
    out = []
    for i, m in enumerate(messages):
        role = CHAT_ROLES.get(m.role)
        if role is None:
            raise APIError(400, f"messages[{i}].role is {m.role!r}; dsv2 takes system, user and assistant messages",
                           param=f"messages[{i}].role")
        content = m.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages[{i}].content[{j}]: only text parts are supported (got type "
                                        f"{part.type!r})", param=f"messages[{i}].content[{j}]")
            content = "\n".join(part.text for part in content)
        if content is None:
            if role != "assistant":
                raise APIError(400, f"messages[{i}].content is missing", param=f"messages[{i}].content")
            content = ""
        out.append({"role": role, "content": content})
    return out


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, max_length=MAX_MESSAGES)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[StrictInt]

