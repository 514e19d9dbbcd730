import os

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_ci_runs_the_readme_test_command_verbatim():
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = f.read().splitlines()
    commands = [l for l in lines[:6] if l.startswith("python3 -m venv")]
    assert len(commands) == 2, "the README must open with exactly two commands"
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert commands[1] in ci
