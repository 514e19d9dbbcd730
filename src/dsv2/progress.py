"""A small terminal progress bar (stderr), so long work shows rate and ETA without extra dependencies."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int | None, desc: str = "", unit: str = "it", enabled: bool = True, stream=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.start = self.last = time.perf_counter()
        self.postfix = ""

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        now = time.perf_counter()
        if self.enabled and (now - self.last > 0.2 or (self.total and self.n >= self.total)):
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.n / elapsed
        if self.total:
            frac = min(self.n / self.total, 1.0)
            bar = "#" * int(frac * 24) + "-" * (24 - int(frac * 24))
            eta = (self.total - self.n) / rate if rate > 0 else 0
            text = f"{self.desc} [{bar}] {self.n}/{self.total} {rate:,.1f} {self.unit}/s ETA {_hms(eta)}"
        else:
            text = f"{self.desc} {self.n} {rate:,.1f} {self.unit}/s {_hms(elapsed)}"
        if self.postfix:
            text += f" | {self.postfix}"
        end = "\r" if self.stream.isatty() else "\n"
        self.stream.write(text.ljust(100)[:200] + end)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            if self.stream.isatty():
                self.stream.write("\n")


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
