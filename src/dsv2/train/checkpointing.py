"""The run directory: training checkpoints and metrics.jsonl.

    RUN_DIR/
      config.json                           the model config (Hugging Face layout)
      train_config.json                     the training settings
      tokenizer/                            tokenizer.json + tokenizer_config.json of the prepared data
      metrics.jsonl                         one JSON object per logging interval, evaluation and final evaluation
      checkpoints/step-00001000.pt          model, optimizer, step, RNG states, data position, log accumulators
      checkpoints/step-00001000.pt.sha256   its checksum, in sha256sum's format (`sha256sum -c` checks it too)
      checkpoints/step-00001000/            the same, sharded, from a data-parallel run (sharded_checkpoint.py)
      superseded/<time>-after-step-N/       what a resume from step N set aside: later metrics and checkpoints

A checkpoint is written with fileio.atomic_write (a temp file, fsynced, renamed over its name), its checksum landing
first, so a crash mid-write leaves the previous checkpoints untouched and every step-*.pt has its checksum; only
then are the oldest beyond `keep` removed. Loading verifies the checksum and tries the newest first, falling back to
older ones when a file is damaged (flipped bits, a truncated copy); when none is intact it fails and changes nothing.
One-process runs write step-N.pt; data-parallel runs write step-N/ directories (torch.distributed.checkpoint, a
manifest of checksums); a run resumes from either kind, on any number of processes.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import time

import numpy as np
import torch

from ..fileio import ASIDE, STAGING, atomic_write, file_sha256, fsync_dir, recover_directory
from .sharded_checkpoint import read_sharded, verify_sharded

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
CHECKSUM = ".sha256"
SUPERSEDED = "superseded"
_NAME = re.compile(r"^step-(\d+)(\.pt)?$")


class DamagedCheckpointError(ValueError):
    """A training checkpoint whose bytes changed since it was written, or that cannot be read; names the file."""


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint -- step-N.pt files and step-N/ directories -- oldest first."""
    d = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(d):
        return []
    found = [(int(m.group(1)), os.path.join(d, n)) for n in os.listdir(d)
             if (m := _NAME.match(n)) and (os.path.isfile if m.group(2) else os.path.isdir)(os.path.join(d, n))]
    return sorted(found)


def checkpoint_path(run_dir: str, step: int, sharded: bool = False) -> str:
    name = f"step-{step:08d}"
    return os.path.join(run_dir, CHECKPOINTS, name if sharded else name + ".pt")


class _Sha256Writer:
    """A file that hashes what passes through it, so the checksum costs no second read."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, b) -> int:
        self.sha256.update(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(run_dir: str, step: int, state: dict, keep: int) -> str:
    path = checkpoint_path(run_dir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path, "wb") as f:
        hashed = _Sha256Writer(f)
        torch.save(state, hashed)
        with atomic_write(path + CHECKSUM) as c:  # before the checkpoint takes its name
            c.write(f"{hashed.sha256.hexdigest()}  {os.path.basename(path)}\n")
    prune_checkpoints(run_dir, keep)
    return path


def prune_checkpoints(run_dir: str, keep: int) -> None:
    """After a save: remove all but the newest `keep` checkpoints, and what killed saves left behind."""
    d = os.path.join(run_dir, CHECKPOINTS)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        _remove(old)
        _remove(old + CHECKSUM)
    for name in os.listdir(d):
        if name.endswith(ASIDE):  # a directory swap cut between its renames: finish it
            recover_directory(os.path.join(d, name.removesuffix(ASIDE)))
    for name in os.listdir(d):  # partial temp files and directories, checksums of files never renamed in
        orphan = name.endswith(CHECKSUM) and not os.path.exists(os.path.join(d, name.removesuffix(CHECKSUM)))
        if name.endswith(STAGING) or orphan:
            _remove(os.path.join(d, name))


def load_checkpoint(path: str) -> dict:
    """Check `path` against its checksum, then read it; DamagedCheckpointError when either fails."""
    try:
        with open(path + CHECKSUM, encoding="utf-8") as f:
            recorded = f.read().split()[0]
    except FileNotFoundError:
        recorded = None
        print(f"warning: {path} has no checksum ({os.path.basename(path)}{CHECKSUM}: an older dsv2 wrote it, or the "
              "file was removed); loading it unverified", file=sys.stderr)
    except (OSError, IndexError, UnicodeDecodeError) as e:
        raise DamagedCheckpointError(f"{path}{CHECKSUM}: unreadable checksum file ({e or 'empty'})") from None
    if recorded is not None and (actual := file_sha256(path)) != recorded:
        raise DamagedCheckpointError(f"{path}: checksum mismatch -- its sha256 is {actual[:16]}... but "
                                     f"{recorded[:16]}... was recorded when it was written: its bytes changed since "
                                     "(a disk or copy error, a truncated copy)")
    try:
        # weights_only: a checkpoint is data (tensors, numbers, strings), never code to unpickle
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).split(". ")[0]
        raise DamagedCheckpointError(f"{path}: truncated or corrupt ({type(e).__name__}: {reason})") from None


def read_checkpoint(path: str, world=None) -> dict:
    """A step-N.pt checkpoint whole, or a step-N/ directory's run state without its tensors (`load_sharded`
    reads those into a model); DamagedCheckpointError when it is not intact. Collective for a directory with a
    data-parallel `world`."""
    if not os.path.isdir(path):
        return load_checkpoint(path)
    problem = verify_sharded(path, world)
    if problem:
        raise DamagedCheckpointError(problem)
    try:
        return read_sharded(path, world.rank if world is not None else 0)
    except Exception as e:
        raise DamagedCheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e).split('. ')[0]})") from None


def load_latest(run_dir: str, step: int | None = None, world=None) -> tuple[dict, str] | None:
    """The newest intact checkpoint (with `step`: that one) and its path, as `read_checkpoint` returns it; None
    when the run has none yet. A damaged one is reported and the one before it tried; when none is intact,
    DamagedCheckpointError names every file and what was wrong with it. Every rank of a data-parallel `world`
    calls it, and all get the same checkpoint."""
    d = os.path.join(run_dir, CHECKPOINTS)
    found = list_checkpoints(run_dir)
    if step is not None:
        paths = dict(found)
        if step not in paths:
            raise FileNotFoundError(f"no checkpoint for step {step} in {d}; it holds steps "
                                    f"{', '.join(str(s) for s, _ in found) or 'none'}")
        try:
            return read_checkpoint(paths[step], world), paths[step]
        except DamagedCheckpointError as e:
            raise DamagedCheckpointError(f"{e}. Choose another step; {d} holds steps "
                                         f"{', '.join(str(s) for s, _ in found)}") from None
    problems = []
    for _, path in reversed(found):
        try:
            state = read_checkpoint(path, world)
        except DamagedCheckpointError as e:
            problems.append(str(e))
            continue
        for p in problems if world is None or world.main else ():
            print(f"warning: cannot read checkpoint {p}; using {os.path.basename(path)} instead", file=sys.stderr)
        return state, path
    if problems:
        raise DamagedCheckpointError(
            f"none of the {len(found)} checkpoint(s) in {d} is intact:\n  " + "\n  ".join(problems) + "\n"
            "Nothing was changed: metrics.jsonl and the checkpoints are as they were. Put back a good copy of one of "
            "these files (from a backup or another machine) and run again; or train anew with another --out; or, to "
            f"retrain this run from step 0, first move {d} out of the way.")
    return None


# ---- RNG states (restored on resume so anything random continues exactly) --------------------------------
def rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"],
                       "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": np.array(n["key"], dtype=np.uint32),
                                                               "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- metrics.jsonl -------------------------------------------------------------------------------------------
def append_metrics(run_dir: str, record: dict) -> None:
    with open(os.path.join(run_dir, METRICS), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, METRICS)
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # the torn last line of a killed run
                pass
    return out


def set_aside_after(run_dir: str, step: int) -> str | None:
    """Before a resume from `step`: move what the run recorded past it -- metrics.jsonl records (and the final
    summary) and checkpoints -- to RUN_DIR/superseded/<time>-after-step-<step>/, so the continuation writes one
    history without duplicates while the abandoned one stays on disk to compare with (or to delete). Returns that
    directory, or None when nothing was past `step`."""
    path = os.path.join(run_dir, METRICS)
    kept, later = [], []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    r = json.loads(line)
                    past = r.get("step", 0) > step or r.get("kind") == "final"
                except json.JSONDecodeError:  # the torn last line of a killed run
                    past = True
                (later if past else kept).append(line if line.endswith("\n") else line + "\n")
    newer = [p for s, p in list_checkpoints(run_dir) if s > step]
    if not later and not newer:
        return None
    base = os.path.join(run_dir, SUPERSEDED, f"{time.strftime('%Y%m%d-%H%M%S')}-after-step-{step}")
    dest, n = base, 1
    while os.path.exists(dest):
        n += 1
        dest = f"{base}-{n}"
    os.makedirs(dest)
    if later:  # the copy first: a crash in between leaves records twice, never nowhere
        with atomic_write(os.path.join(dest, METRICS)) as f:
            f.writelines(later)
        with atomic_write(path) as f:
            f.writelines(kept)
    if newer:
        os.mkdir(os.path.join(dest, CHECKPOINTS))
        for p in newer:
            for src in (p, p + CHECKSUM):  # the checkpoint first: none is ever left behind without its checksum
                # (a step-N/ directory's checksums are inside it)
                if os.path.exists(src):
                    os.rename(src, os.path.join(dest, CHECKPOINTS, os.path.basename(src)))
        fsync_dir(os.path.join(dest, CHECKPOINTS))
        fsync_dir(os.path.join(run_dir, CHECKPOINTS))
    return dest


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
        return
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
