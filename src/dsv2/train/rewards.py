"""GRPO rewards: a function (prompt, completion, **fields) -> float, built in or the user's.

    reward = load_reward("exact_match")                 # fields: answer
    reward = load_reward("python_asserts")              # fields: tests (a list of asserts, or one string)
    reward = load_reward("my_rewards.py:score")         # a function in a file
    reward = load_reward("mypackage.rewards:score")     # a function in an importable module
    reward(prompt, completion, answer="42")

`prompt` is the prompt line's "prompt" string, or its "messages" list for chat prompts; `fields` are the line's
other fields. A user's function runs in this process (it is the user's code); the completion's code, which is the
model's, only ever runs in the sandbox (train/sandbox.py).
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
from collections.abc import Callable

from .sandbox import run_asserts

Reward = Callable[..., float]


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def extract_answer(completion: str) -> str:
    """The answer a completion gives: the contents of its last \\boxed{...} when it has one (the DeepSeekMath
    convention), else its first non-empty line; whitespace collapsed."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", completion)
    if boxed:
        text = boxed[-1]
    else:
        text = next((line for line in completion.splitlines() if line.strip()), "")
    return " ".join(text.split())


def exact_match(prompt, completion: str, answer=None, **fields) -> float:
    """1.0 when the completion's answer (extract_answer) equals the line's `answer` -- as numbers when both parse
    as numbers ("42.0" == "42", "1,000" == "1000"), else as strings after collapsing whitespace -- else 0.0."""
    if answer is None:
        raise ValueError("the exact_match reward reads an \"answer\" field, and this prompt line has none")
    given, wanted = extract_answer(completion), " ".join(str(answer).split())
    a, b = _number(given), _number(wanted)
    if a is not None and b is not None:
        return float(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9))
    return float(given == wanted)


def extract_code(prompt, completion: str) -> str:
    """The program a completion stands for: its last ```python fenced block when it has one; else, for a raw
    prompt (a string), the prompt followed by the completion (a completion continues the prompt's code, e.g. a
    function's body after its signature); else (chat) the completion itself."""
    blocks = re.findall(r"```(?:python|py)?[^\n]*\n(.*?)```", completion, flags=re.S)
    if blocks:
        return blocks[-1]
    return prompt + completion if isinstance(prompt, str) else completion


def python_asserts(prompt, completion: str, tests=None, timeout: float = 10.0, **fields) -> float:
    """The fraction of the line's `tests` (Python asserts) that pass after the completion's code (extract_code)
    runs -- in a sandboxed child process with time and memory limits (train/sandbox.py), never in this one. Code
    that raises, loops forever, exhausts its memory or dies scores 0."""
    if tests is None:
        raise ValueError("the python_asserts reward reads a \"tests\" field (a list of asserts), and this prompt "
                         "line has none")
    tests = [tests] if isinstance(tests, str) else list(tests)
    if not tests or not all(isinstance(t, str) for t in tests):
        raise ValueError(f"\"tests\" must be a non-empty list of Python statements (strings), got {tests!r}")
    return run_asserts(extract_code(prompt, completion), tests, timeout=timeout).score


BUILTIN = {"exact_match": (exact_match, ("answer",)), "python_asserts": (python_asserts, ("tests",))}


def required_fields(spec: str) -> tuple[str, ...]:
    """The prompt-line fields a built-in reward reads (none known for a user's function)."""
    return BUILTIN[spec][1] if spec in BUILTIN else ()


def load_reward(spec: str) -> Reward:
    """A built-in name, FILE.py:FUNCTION or module:function -> the reward function."""
    if spec in BUILTIN:
        return BUILTIN[spec][0]
    usage = (f"choose a built-in ({', '.join(BUILTIN)}), FILE.py:FUNCTION or module:function -- a function "
             "(prompt, completion, **fields) -> float")
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ValueError(f"--reward {spec!r} is not a reward: {usage}")
    if where.endswith(".py") or os.sep in where:
        if not os.path.isfile(where):
            raise FileNotFoundError(f"--reward {spec!r}: no file {where}")
        module_name = f"dsv2_reward_{abs(hash(os.path.abspath(where)))}"
        loader = importlib.util.spec_from_file_location(module_name, where)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise ValueError(f"--reward {spec!r}: cannot import module {where!r} ({e}); {usage}") from None
    fn = getattr(module, name, None)
    if fn is None:
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"--reward {spec!r}: {where} has no {name!r}" + (f" (it has {', '.join(found[:10])})"
                                                                         if found else ""))
    if not callable(fn):
        raise ValueError(f"--reward {spec!r}: {name} in {where} is a {type(fn).__name__}, not a function")
    return fn


def score(reward: Reward, prompt, completion: str, fields: dict, name: str = "reward") -> float:
    """reward(prompt, completion, **fields) as a finite float, or an error that names the reward."""
    value = reward(prompt, completion, **fields)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"the reward {name} returned {value!r}; it must return a number") from None
    if not math.isfinite(value):
        raise ValueError(f"the reward {name} returned {value}; it must return a finite number")
    return value
