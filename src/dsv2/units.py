"""Sizes as people write them on a command line or in an argument: 4GiB, 512MiB, 1.5G, or plain bytes."""
from __future__ import annotations


def parse_bytes(value: int | float | str) -> int:
    """4294967296, "4GiB", "4GB", "512MiB", "1.5G" -> bytes (K, M, G, T are powers of 1024)."""
    if isinstance(value, (int, float)):
        return int(value)
    s = value.strip().upper().replace("IB", "").replace("B", "")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        return int(float(s[:-1]) * units[s[-1]]) if s and s[-1] in units else int(float(s))
    except ValueError:
        raise ValueError(f"cannot read {value!r} as a size; write e.g. 4GiB or 512MiB") from None
