"""GRPO rewards: the built-ins, loading a user's function, and the sandbox that runs a model's code."""
from __future__ import annotations

import os
import resource
import time

import pytest

from dsv2.train.rewards import (exact_match, extract_answer, extract_code, load_reward, python_asserts,
                                required_fields, score)
from dsv2.train.sandbox import run_asserts


def test_exact_match():
    assert exact_match("2+3=", " 5\nand more", answer="5") == 1.0
    assert exact_match("2+3=", "5.0", answer=5) == 1.0  # numbers compare as numbers
    assert exact_match("", "1,000", answer="1000") == 1.0
    assert exact_match("", "so \\boxed{12} or \\boxed{13}", answer="13") == 1.0  # the last box
    assert exact_match("", "6", answer="5") == 0.0
    assert exact_match("", "", answer="5") == 0.0
    assert exact_match("", "  hello   world ", answer="hello world") == 1.0
    assert extract_answer("\n\n  x = 1\ny") == "x = 1"
    with pytest.raises(ValueError, match="answer"):
        exact_match("", "5")


def test_extract_code():
    assert extract_code("def f():\n", "    return 1\n") == "def f():\n    return 1\n"  # a raw prompt continues
    fenced = "Here:\n```python\ndef f():\n    return 2\n```\nDone."
    assert extract_code("def f():\n", fenced) == "def f():\n    return 2\n"
    assert extract_code([{"role": "user", "content": "x"}], "def f(): pass") == "def f(): pass"  # chat


def test_python_asserts_fraction():
    tests = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 1"]
    assert python_asserts("def add(a, b):\n", "    return a + b\n", tests=tests) == pytest.approx(2 / 3)
    assert python_asserts("def add(a, b):\n", "    return a - b\n", tests=tests[:1]) == 0.0
    assert python_asserts("", "syntax error here (", tests=tests) == 0.0
    assert python_asserts("", "x = 1", tests="assert x == 1") == 1.0  # one string is one test
    with pytest.raises(ValueError, match="tests"):
        python_asserts("", "x = 1")


def _rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_sandbox_survives_infinite_loop_and_memory_bomb(tmp_path):
    before, t0 = _rss_kb(), time.monotonic()
    spin = run_asserts("while True:\n    pass\n", ["assert True"], timeout=20, cpu_seconds=1)
    assert (spin.passed, spin.status) == (0, "killed")  # the CPU limit ended it
    sleeper = run_asserts("import time\nwhile True:\n    time.sleep(0.1)\n", ["assert True"], timeout=1.5)
    assert (sleeper.passed, sleeper.status) == (0, "timeout")  # no CPU used: the wall clock ended it
    for bomb in ("x = bytearray(1 << 40)\n", "x = []\nwhile True:\n    x.append(bytearray(1 << 24))\n"):
        r = run_asserts(bomb, ["assert True"], memory=256 << 20)
        assert r.passed == 0 and r.status in ("error", "killed")
    assert time.monotonic() - t0 < 60
    assert _rss_kb() - before < 50_000  # this process never held the bomb
    assert run_asserts("x = 2", ["assert x == 2"]).score == 1.0  # and works as before


def test_sandbox_contains_side_effects(tmp_path):
    outside = tmp_path / "victim.txt"
    outside.write_text("keep")
    for code in (f"import os\nos.remove({str(outside)!r})",
                 f"open({str(outside)!r}, 'w').write('gone')",
                 f"import os\nos.close(os.open({str(outside)!r}, os.O_WRONLY | os.O_TRUNC))",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                 "import os\nos.fork()",
                 "import subprocess\nsubprocess.run(['true'])",
                 "import socket\nsocket.create_connection(('127.0.0.1', 9))"):
        r = run_asserts(code, ["assert True"])
        assert (r.passed, r.status) == (0, "error"), code
    assert outside.read_text() == "keep"
    # files inside the sandbox's own directory are fine
    assert run_asserts("open('scratch.txt', 'w').write('x')", ["assert open('scratch.txt').read() == 'x'"]).score == 1
    # printing what the result line looks like, then leaving, does not pass
    fake = run_asserts("import os\nprint('0123 5 1')\nos._exit(0)", ["assert True"])
    assert (fake.passed, fake.status) == (0, "killed")


def test_load_reward(tmp_path, monkeypatch):
    assert load_reward("exact_match") is exact_match
    assert required_fields("python_asserts") == ("tests",)
    f = tmp_path / "my_rewards.py"
    f.write_text("def length(prompt, completion, target=0, **fields):\n    return -abs(len(completion) - target)\n"
                 "VALUE = 3\n")
    fn = load_reward(f"{f}:length")
    assert score(fn, "p", "abcd", {"target": 3}) == -1.0
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_rewards:length")("p", "ab", target=2) == 0
    with pytest.raises(ValueError, match="not a reward"):
        load_reward("no_colon_here")
    with pytest.raises(FileNotFoundError, match="no file"):
        load_reward(str(tmp_path / "missing.py") + ":f")
    with pytest.raises(ValueError, match="has no 'nope'.*length"):
        load_reward(f"{f}:nope")
    with pytest.raises(ValueError, match="not a function"):
        load_reward(f"{f}:VALUE")
    with pytest.raises(ValueError, match="cannot import"):
        load_reward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="must return a number"):
        score(lambda p, c: "high", "p", "c", {}, "bad")
    with pytest.raises(ValueError, match="finite"):
        score(lambda p, c: float("nan"), "p", "c", {}, "bad")
