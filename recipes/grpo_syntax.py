"""The task of recipes/grpo-syntax.sh: finish a line of Python so that it parses.

    python recipes/grpo_syntax.py OUT_DIR [--train N] [--held-out N]   # OUT_DIR/train.jsonl, held_out.jsonl
    dsv2 grpo --prompts OUT_DIR/train.jsonl --reward recipes/grpo_syntax.py:parses ...

Prompts are one-line statements of the CPython standard library cut after an opening bracket, a comma or a space
inside brackets, so that something is left open; the completion (up to its first newline) must close it into a
statement that parses -- any completion that does counts, not only the original. Held-out prompts come from the
stdlib files held out from dsv2-tiny-stdlib's tokenizer and pretraining (the same 3% by a hash of the path, as in
recipes/tiny-stdlib.sh), training prompts from the others.

The reward parses with ast.parse and never runs anything, so it needs no sandbox.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import random
import sysconfig

from dsv2.train.documents import is_validation

OPENERS = "([{"


def parses(prompt, completion: str, **fields) -> float:
    """1.0 when the prompt followed by the completion's first line is a complete Python statement, else 0.0."""
    line = completion.split("\n", 1)[0]
    if not line.strip():
        return 0.0
    try:
        ast.parse(prompt + line)
    except (SyntaxError, ValueError):
        return 0.0
    return 1.0


def _depth_after(text: str) -> int:
    """Brackets left open at the end of `text` (ignoring brackets inside string literals, roughly)."""
    depth, quote = 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in OPENERS:
            depth += 1
        elif ch in ")]}":
            depth -= 1
    return depth if quote is None else -1  # inside a string: not a cut we take


def cuts(line: str, rng: random.Random) -> str | None:
    """A prefix of `line` ending after "(", "[", "{", ", " or a space, with a bracket still open."""
    points = [i + 1 for i, ch in enumerate(line) if ch in OPENERS + ", " and 0 < i + 1 < len(line) - 1]
    points = [i for i in points if _depth_after(line[:i]) > 0 and not line[:i].endswith("  ")]
    return line[:rng.choice(points)] if points else None


def statements(path: str) -> list[str]:
    """The file's one-line statements that parse on their own and hold a bracket, 20-80 characters."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    out = []
    for raw in lines:
        line = raw.strip()
        if not 20 <= len(line) <= 80 or not any(c in line for c in OPENERS) or line.startswith(("#", "@")):
            continue
        if line.endswith(":") or "\\" in line:
            continue
        try:
            ast.parse(line)
        except SyntaxError:
            continue
        out.append(line)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--train", type=int, default=2000, help="training prompts (default 2000)")
    ap.add_argument("--held-out", type=int, default=200, help="held-out prompts (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    stdlib = sysconfig.get_paths()["stdlib"]
    pools: dict[str, list[str]] = {"train": [], "held_out": []}
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d != "site-packages")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                key = os.path.relpath(path, stdlib).replace(os.sep, "/")  # the key `dsv2 data prepare` split by
                split = "held_out" if is_validation(key, 0.03) else "train"
                pools[split].extend(statements(path))
    rng = random.Random(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    for split, n in (("train", args.train), ("held_out", args.held_out)):
        lines = sorted(set(pools[split]))
        rng.shuffle(lines)
        written = 0
        with open(os.path.join(args.out_dir, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for line in lines:
                prompt = cuts(line, rng)
                if prompt is None:
                    continue
                f.write(json.dumps({"prompt": prompt, "original": line}) + "\n")
                written += 1
                if written == n:
                    break
        print(f"{split}: {written} prompts from {len(lines)} statements -> {args.out_dir}/{split}.jsonl")


if __name__ == "__main__":
    main()
