"""train/allocator.py: glibc keeps a training step's freed buffers for the next step instead of handing them back.
Each case runs in its own interpreter (the setting is for the whole process)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")

PROBE = """
import resource, sys, torch
from dsv2.train.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.randn(4096, 4096)  # 64 MB, far above glibc's mmap threshold
per_step = []
for _ in range(12):
    before = faults()
    (x * 2).sum()  # a 64 MB temporary made and freed
    per_step.append(faults() - before)
print(kept, sorted(per_step[2:])[5])  # the median after two warm-ups (a heap that grows once in a while is fine)
"""


def _probe(mode: str, **env) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0], int(out[1])


def test_freed_blocks_are_reused_without_page_faults():
    kept, faults = _probe("keep")
    assert kept == "True"
    assert faults < 500  # the temporary's 16,384 pages come back warm from the heap
    _, faults_default = _probe("default")
    assert faults_default > 10_000  # glibc's default: a fresh mmap per temporary, every page faulted in again


def test_the_users_own_malloc_settings_win():
    assert _probe("keep", DSV2_KEEP_FREED_MEMORY="0")[0] == "False"
    kept, faults = _probe("keep", MALLOC_MMAP_THRESHOLD_="131072")
    assert kept == "False" and faults > 10_000
