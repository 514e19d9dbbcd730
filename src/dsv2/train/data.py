"""Tokenized pretraining data: `prepare` writes shards, `TokenShards` maps them, `TrainBatches` samples them.

On disk (one directory):
    manifest.json            tokenizer (path, sha256, ids), dtype, per split: shard files, tokens, documents, bytes
    train-00000.bin ...      raw little-endian uint16 (vocab < 65536) or uint32 token ids, one stream per shard:
    validation-00000.bin     [bos] doc [eos] [bos] doc [eos] ...  (eos separates documents, as the model sees at
                             inference, where prompts start with bos)
Documents go to validation by a hash of their key (file path / JSONL line), so the split is stable.

Batches are a pure function of (seed, step), never of iterator state, so a resumed run sees exactly the batches
an uninterrupted one would: each epoch is a seeded permutation of fixed-length windows, offset by a seeded shift
so window boundaries move between epochs.
"""
from __future__ import annotations

import json
import os
from bisect import bisect_right

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from ..fileio import atomic_write, file_sha256
from ..progress import Progress
from ..tokenizer import Tokenizer
from .documents import CorpusStats, is_validation, iter_documents

MANIFEST = "manifest.json"
SPLITS = ("train", "validation")


class _ShardWriter:
    """Appends documents to {split}-NNNNN.bin, starting a new shard at a document boundary past shard_tokens."""

    def __init__(self, out_dir: str, split: str, dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None
        self.tokens = self.documents = self.bytes = 0

    def write(self, ids: np.ndarray, n_bytes: int) -> None:
        if self.file is None or (self.shards[-1]["tokens"] and self.shards[-1]["tokens"] + len(ids) > self.shard_tokens):
            self._roll()
        ids.astype(self.dtype).tofile(self.file)  # streamed straight to disk: the corpus never sits in memory
        shard = self.shards[-1]
        shard["tokens"] += len(ids)
        shard["documents"] += 1
        self.tokens += len(ids)
        self.documents += 1
        self.bytes += n_bytes

    def _roll(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.file = open(os.path.join(self.out_dir, name), "wb")
        self.shards.append({"file": name, "tokens": 0, "documents": 0})

    def close(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())  # on disk before the manifest that names it
            self.file.close()
            self.file = None

    def summary(self) -> dict:
        return {"tokens": self.tokens, "documents": self.documents, "bytes": self.bytes, "shards": self.shards}


def prepare(inputs: list[str], tokenizer_dir: str, out_dir: str, text_field: str = "text", val_fraction: float = 0.01,
            include: list[str] | None = None, exclude: list[str] | None = None, shard_tokens: int = 1 << 27,
            batch_documents: int = 256, overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenize `inputs` (files, directories, JSONL) into shards under `out_dir`; returns the manifest.

    Documents are read, tokenized (a batch of `batch_documents` at a time, on all cores) and appended to the
    shard files as they stream by; `bytes` counts their UTF-8 bytes, for bits-per-byte evaluation.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction} must be in [0, 1)")
    tok = Tokenizer.from_pretrained(tokenizer_dir)  # special ids and add_bos_token
    tok_file = os.path.join(tokenizer_dir, "tokenizer.json")
    raw = HFTokenizer.from_file(tok_file)  # batch encoding on all cores
    raw.encode_special_tokens = True  # a "<|EOT|>" inside a document is text, not a control token
    vocab = raw.get_vocab_size(with_added_tokens=True)
    if tok.eos_token_id is None:
        raise ValueError(f"{tokenizer_dir}: the tokenizer has no eos token to separate documents with")
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest_path):
        if not overwrite:
            raise ValueError(f"{out_dir} already holds prepared data ({MANIFEST}); pass --overwrite to replace it")
        os.remove(manifest_path)  # the directory is invalid until the new manifest lands
    for name in os.listdir(out_dir):
        if name.endswith(".bin") and name.startswith(SPLITS):
            os.remove(os.path.join(out_dir, name))

    writers = {s: _ShardWriter(out_dir, s, dtype, shard_tokens) for s in SPLITS}
    stats = CorpusStats()
    bos = [tok.bos_token_id] if tok.add_bos_token else []
    eos = [tok.eos_token_id]
    bar = Progress(None, "tokenizing", unit="docs", enabled=progress)

    def flush(batch: list[tuple[str, str]]) -> None:
        encodings = raw.encode_batch([text for _, text in batch], add_special_tokens=False)
        for (key, text), enc in zip(batch, encodings):
            ids = np.array(bos + enc.ids + eos, dtype=np.int64)
            split = "validation" if is_validation(key, val_fraction) else "train"
            writers[split].write(ids, len(text.encode("utf-8")))
        bar.update(len(batch), postfix=f"{writers['train'].tokens + writers['validation'].tokens:,} tokens")

    batch: list[tuple[str, str]] = []
    try:
        for doc in iter_documents(inputs, text_field, include, exclude, stats):
            batch.append(doc)
            if len(batch) == batch_documents:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    finally:
        for w in writers.values():
            w.close()
        bar.close()
    if writers["train"].tokens == 0:
        raise ValueError(f"no training documents found in {inputs} (include={include}, exclude={exclude}, "
                         f"skipped: {stats.skipped or 'none'})")

    manifest = {
        "format": "dsv2-tokens", "version": 1,
        "tokenizer": {"path": os.path.abspath(tokenizer_dir), "sha256": file_sha256(tok_file), "vocab_size": vocab,
                      "bos_token_id": tok.bos_token_id if bos else None, "eos_token_id": tok.eos_token_id},
        "dtype": np.dtype(dtype).name,
        "document_format": "[bos] tokens [eos]" if bos else "tokens [eos]",
        "inputs": [os.path.abspath(i) for i in inputs], "text_field": text_field,
        "include": include, "exclude": exclude, "val_fraction": val_fraction, "split_key": "sha256(document key)",
        "files_read": stats.files, "skipped": stats.skipped,
        "splits": {s: w.summary() for s, w in writers.items()},
    }
    with atomic_write(manifest_path) as f:  # the commit point: the directory is valid from here on
        json.dump(manifest, f, indent=2)
    return manifest


def read_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {MANIFEST} in {data_dir!r}: prepare the data first with `dsv2 data prepare`")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class TokenShards:
    """One split of a prepared directory as read-only memory maps (nothing is loaded up front)."""

    def __init__(self, data_dir: str, split: str = "train"):
        self.manifest = read_manifest(data_dir)
        info = self.manifest["splits"].get(split)
        if info is None:
            raise ValueError(f"{data_dir}: no split {split!r}; splits: {list(self.manifest['splits'])}")
        self.split, self.bytes, self.documents = split, info["bytes"], info["documents"]
        dtype = np.dtype(self.manifest["dtype"])
        self.shards = []
        for s in info["shards"]:
            path = os.path.join(data_dir, s["file"])
            if not os.path.isfile(path) or os.path.getsize(path) != s["tokens"] * dtype.itemsize:
                raise ValueError(f"{path} is missing or not {s['tokens']} tokens long as {MANIFEST} says; "
                                 "prepare the data again")
            if s["tokens"]:
                self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        self.tokens = sum(len(s) for s in self.shards)


class TrainBatches:
    """Batches of windows of seq_len + 1 tokens (inputs = window[:-1], targets = window[1:]) as a pure function
    of (seed, index): sample k is window perm_e[k mod N] of epoch e = k // N, where perm_e and the epoch's
    boundary shift come from a generator seeded with (seed, e)."""

    def __init__(self, shards: TokenShards, seq_len: int, seed: int):
        self.shards, self.T, self.seed = shards, seq_len, seed
        # windows per shard, leaving room for any shift in [0, T): window j spans [shift + jT, shift + jT + T + 1)
        counts = [max((len(s) - seq_len) // seq_len, 0) for s in shards.shards]
        self.starts = np.cumsum([0] + counts)
        self.windows = int(self.starts[-1])
        if self.windows == 0:
            raise ValueError(f"the {shards.split} split has {shards.tokens} tokens in {len(shards.shards)} shard(s): "
                             f"too few for one window of {seq_len + 1}; use more data or a shorter --seq-len")
        self._epoch: tuple[int, np.ndarray, int] | None = None

    def _plan(self, epoch: int) -> tuple[np.ndarray, int]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch = (epoch, rng.permutation(self.windows), int(rng.integers(0, self.T)))
        return self._epoch[1], self._epoch[2]

    def epoch_of(self, sample: int) -> float:
        return sample / self.windows

    def locate(self, sample: int) -> tuple[int, int]:
        """(shard, first token) of sample k's window."""
        perm, shift = self._plan(sample // self.windows)
        w = int(perm[sample % self.windows])
        s = bisect_right(self.starts, w) - 1
        return s, shift + (w - int(self.starts[s])) * self.T

    def get(self, first_sample: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Samples first_sample .. first_sample + batch_size - 1 -> inputs, targets [B, T] int64."""
        rows = np.empty((batch_size, self.T + 1), dtype=np.int64)
        for b in range(batch_size):
            s, begin = self.locate(first_sample + b)
            rows[b] = self.shards.shards[s][begin:begin + self.T + 1]
        return rows[:, :-1], rows[:, 1:]


def eval_windows(shards: TokenShards, seq_len: int, limit: int | None = None):
    """Consecutive windows over a whole split, every token a target exactly once (except each shard's first):
    yields (inputs, targets) [T'] int64 with T' = seq_len except the last of each shard. With `limit`, that many
    full windows spread evenly across the split (a fixed, cheap sample for periodic validation)."""
    spans = []  # (shard, begin, end) of each window
    for i, s in enumerate(shards.shards):
        spans += [(i, b, min(b + seq_len + 1, len(s))) for b in range(0, len(s) - 1, seq_len)]
    if limit is not None:
        full = [sp for sp in spans if sp[2] - sp[1] == seq_len + 1]
        step = max(len(full) / limit, 1.0)
        spans = [full[int(j * step)] for j in range(min(limit, len(full)))]
    for i, b, e in spans:
        w = np.asarray(shards.shards[i][b:e], dtype=np.int64)
        yield w[:-1], w[1:]
