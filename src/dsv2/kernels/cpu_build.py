"""Building dsv2's C++ CPU kernels (mla_decode_cpu.cpp, moe_cpu.cpp) at first use, with the C++ compiler
torch.compile already needs (g++ / CXX), for the vector ISA torch runs with (AVX-512, AVX2 or the compiler's
default; `-mcpu=native` on ARM). Each library is cached under ~/.cache/dsv2/kernels by a hash of its source, the
compiler and flags, and the CPU, and loaded with ctypes into the process (the OpenMP runtime is the one torch already
loaded). DSV2_NO_CPU_KERNELS=1 turns them all off (every kernel has a torch path it falls back to).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading

BUILD_LOCK = threading.Lock()


def arch_flags() -> list[str]:
    """Compiler flags for the vector ISA torch runs with here (so ATEN_CPU_CAPABILITY=avx2 / DSV2_CPU_CAPABILITY
    builds the AVX2 kernel an AVX2 machine gets)."""
    from ..capability import cpu_capability
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        level = cpu_capability().level
        if level == "avx512":
            return ["-march=native", "-mprefer-vector-width=512"]
        if level == "avx2":
            return ["-mavx2", "-mfma", "-mf16c"]
        return []
    if machine in ("aarch64", "arm64"):
        return ["-mcpu=native"]
    return []


def compiler() -> str | None:
    """The C++ compiler to build with: $CXX, else g++, c++ or clang++ on PATH (None: none here)."""
    for cxx in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cxx and shutil.which(cxx):
            return cxx
    return None


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dsv2", "kernels")


def load(source: str, signatures: dict[str, tuple[list, object]], fallback: str) -> ctypes.CDLL | str:
    """The library built from `source` with each function's (argtypes, restype) declared, or why it could not be
    built -- said once on stderr as "dsv2: <fallback> (<why>)", the torch path that serves instead."""
    with BUILD_LOCK:
        try:
            lib = ctypes.CDLL(build(source))
        except Exception as e:  # no compiler, a failed build
            print(f"dsv2: {fallback} ({e})", file=sys.stderr)
            return str(e)
        for name, (argtypes, restype) in signatures.items():
            getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, restype
        return lib


def build(source: str) -> str:
    """Path of the shared library built from the C++ file `source` for this machine (built now unless cached).
    Raises RuntimeError saying why when it cannot be built."""
    if os.environ.get("DSV2_NO_CPU_KERNELS"):
        raise RuntimeError("DSV2_NO_CPU_KERNELS is set")
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (CXX, g++, c++ or clang++ on PATH)")
    with open(source, "rb") as f:
        text = f.read()
    name = os.path.splitext(os.path.basename(source))[0]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    for flags in (arch_flags(), []):  # the ISA's flags, then the compiler's defaults
        cmd = [cxx, "-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", *flags]
        key = hashlib.sha256(text + " ".join(cmd).encode() + version.encode() + platform.machine().encode()
                             + _cpu_model().encode()).hexdigest()[:20]
        path = os.path.join(cache_dir(), f"{name}-{key}.so")
        if os.path.exists(path):
            return path
        os.makedirs(cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
        os.close(fd)
        p = subprocess.run([*cmd, source, "-o", tmp], capture_output=True, text=True)
        if p.returncode == 0:
            os.replace(tmp, path)  # atomic: another process sees the whole library or none
            return path
        os.unlink(tmp)
        error = p.stderr.strip().splitlines()[-1:] or [f"exit code {p.returncode}"]
    raise RuntimeError(f"building {os.path.basename(source)} failed: {error[0]}")


def _cpu_model() -> str:
    """The CPU's model and flags (-march=native builds for exactly this kind of CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = [line for line in f if line.startswith(("model name", "flags", "Features"))][:2]
        return "".join(info)
    except OSError:
        return platform.processor()
