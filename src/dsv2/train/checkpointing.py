"""The run directory: training checkpoints and metrics.jsonl.

    RUN_DIR/
      config.json                    the model config (Hugging Face layout)
      train_config.json              the training settings
      tokenizer/                     tokenizer.json + tokenizer_config.json of the prepared data
      metrics.jsonl                  one JSON object per logging interval, evaluation and final evaluation
      checkpoints/step-00001000.pt   model, optimizer, step, RNG states, data position, log accumulators

A checkpoint is written to a temporary file, fsynced, then renamed over its final name (os.replace is atomic),
so a crash mid-write leaves the previous checkpoints untouched; only then are the oldest beyond `keep` removed.
Loading tries the newest first and falls back to older ones if a file cannot be read.
"""
from __future__ import annotations

import json
import os
import random
import re
import sys

import numpy as np
import torch

from ..fileio import atomic_write

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
_NAME = re.compile(r"^step-(\d+)\.pt$")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    d = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(d):
        return []
    found = [(int(m.group(1)), os.path.join(d, n)) for n in os.listdir(d) if (m := _NAME.match(n))]
    return sorted(found)


def save_checkpoint(run_dir: str, step: int, state: dict, keep: int) -> str:
    d = os.path.join(run_dir, CHECKPOINTS)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"step-{step:08d}.pt")
    with atomic_write(path, "wb") as f:
        torch.save(state, f)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        os.remove(old)
    return path


def load_checkpoint(path: str) -> dict:
    # weights_only: a checkpoint is data (tensors, numbers, strings), never code to unpickle
    return torch.load(path, map_location="cpu", weights_only=True)


def load_latest(run_dir: str, step: int | None = None) -> tuple[dict, str] | None:
    """The newest readable checkpoint (or the one at `step`), or None when there is none."""
    for s, path in reversed(list_checkpoints(run_dir)):
        if step is not None and s != step:
            continue
        try:
            return load_checkpoint(path), path
        except Exception as e:  # a damaged file (disk trouble): say so and fall back to the previous one
            print(f"warning: cannot read checkpoint {path} ({type(e).__name__}: {e}); trying an older one",
                  file=sys.stderr)
    if step is not None:
        raise FileNotFoundError(f"no readable checkpoint for step {step} in {os.path.join(run_dir, CHECKPOINTS)}")
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


def truncate_metrics(run_dir: str, step: int) -> None:
    """Keep the records up to `step` (the checkpoint a resume starts from); later ones are logged again."""
    path = os.path.join(run_dir, METRICS)
    if not os.path.isfile(path):
        return
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step and r.get("kind") != "final"]
    with atomic_write(path) as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
