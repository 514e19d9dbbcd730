"""Reading a corpus as a stream of documents: text files, directories of them, and JSONL (one document per line).

Each document carries a key that names it independently of where the corpus lives (`lib/os.py`,
`data.jsonl#1042`), so the train/validation split -- a hash of the key -- is the same on every machine and run.
"""
from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class CorpusStats:
    files: int = 0
    documents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".jsonl.gz", ".ndjson"))


def _matches(rel: str, patterns: list[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)


def iter_files(inputs: list[str], include: list[str] | None = None,
               exclude: list[str] | None = None) -> Iterator[tuple[str, str]]:
    """(path, key) for every file the inputs name, directories walked in sorted order. Patterns match the path
    relative to the input directory or the file name (`*.py`, `*/test/*`, `site-packages*`)."""
    for inp in inputs:
        if os.path.isfile(inp):
            yield inp, os.path.basename(inp)
        elif os.path.isdir(inp):
            root = os.path.abspath(inp)
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for name in sorted(filenames):
                    path = os.path.join(dirpath, name)
                    rel = os.path.relpath(path, root).replace(os.sep, "/")
                    if include and not _matches(rel, include):
                        continue
                    if exclude and _matches(rel, exclude):
                        continue
                    if os.path.isfile(path):
                        yield path, rel
        else:
            raise FileNotFoundError(f"input {inp!r} does not exist (pass text files, directories or .jsonl files)")


def iter_documents(inputs: list[str], text_field: str = "text", include: list[str] | None = None,
                   exclude: list[str] | None = None, stats: CorpusStats | None = None) -> Iterator[tuple[str, str]]:
    """(key, text) for every document, streamed: a text file is one document, a JSONL line is one document.
    Files that are not UTF-8 text (binaries) and empty documents are skipped and counted in `stats`."""
    stats = stats if stats is not None else CorpusStats()
    for path, key in iter_files(inputs, include, exclude):
        stats.files += 1
        if _is_jsonl(path):
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
                    text = record.get(text_field) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{n}: no string field {text_field!r} (fields: "
                                         f"{sorted(record) if isinstance(record, dict) else type(record).__name__}); "
                                         "choose the field with --text-field")
                    if text:
                        stats.documents += 1
                        yield f"{key}#{n}", text
                    else:
                        stats.skip("empty")
            continue
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            stats.skip("not UTF-8")
            continue
        if "\x00" in text:
            stats.skip("binary")
        elif text:
            stats.documents += 1
            yield key, text
        else:
            stats.skip("empty")


def is_validation(key: str, val_fraction: float) -> bool:
    """Stable split: the first 8 bytes of sha256(key) as a fraction in [0, 1), compared with val_fraction."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h / 2.0 ** 64 < val_fraction
