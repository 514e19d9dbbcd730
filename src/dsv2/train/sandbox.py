"""Run untrusted Python (a model's completion) against asserts, in a child process that cannot harm the trainer.

    result = run_asserts("def add(a, b):\\n    return a + b", ["assert add(1, 2) == 3"], timeout=5.0)
    result.passed, result.total, result.status     # 1, 1, "ok"

Never in-process: the code runs in a fresh `python -I` (isolated: no site-packages of the user, no PYTHON*
variables, no current directory on sys.path) in its own session, inside a new temporary directory, and:
  - address space, CPU seconds, written file size and open files are capped with resource.setrlimit, set by the
    child on itself before the code runs (so no preexec_fn, which is unsafe in a threaded parent): a memory bomb
    gets MemoryError or dies, an infinite loop hits the CPU limit;
  - the parent waits at most `timeout` seconds of wall time (a sleeping loop uses no CPU), then kills the whole
    process group, so children the code spawned die too;
  - an audit hook refuses what generated code should never need: deleting or renaming files, writing outside its
    temporary directory, starting processes, opening sockets, loading C libraries through ctypes.
The code's own output goes to /dev/null; results come back on a line tagged with a random nonce the code is not
given, so printing "passed" does not pass. Not a security boundary against a determined adversary (use a container
or VM for that): it keeps a policy's accidents and reward hacks from costing more than a zero.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

MEMORY_LIMIT = 512 << 20  # bytes of address space for the child (python itself takes ~20 MB)
CPU_SECONDS = 5

# The child: read the job from stdin, cap itself, guard with an audit hook, run the code, then each assert.
_CHILD = r'''
import json, os, resource, sys
job = json.loads(sys.stdin.read())
nonce, code, tests, root = job["nonce"], job["code"], job["tests"], os.path.realpath(os.getcwd())
for limit, value in ((resource.RLIMIT_AS, job["memory"]), (resource.RLIMIT_CPU, job["cpu"]),
                     (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_NOFILE, 64)):
    resource.setrlimit(limit, (value, value))
out = os.fdopen(os.dup(1), "w")  # the results channel; the code's own prints go to /dev/null
null = os.open(os.devnull, os.O_WRONLY)
os.dup2(null, 1)
os.dup2(null, 2)
DENY = {"os.remove", "os.rmdir", "os.rename", "os.truncate", "shutil.rmtree", "shutil.move", "os.system",
        "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg", "subprocess.Popen",
        "socket.connect", "socket.bind", "socket.sendto", "ctypes.dlopen", "ctypes.dlsym", "os.chmod", "os.chown",
        "os.link", "os.symlink", "os.mkdir", "os.putenv", "os.unsetenv", "pty.spawn"}
WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def guard(event, args):
    if event in DENY:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and isinstance(args[0], (str, bytes)):  # (path, mode, flags); os.open gives mode None
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITES)
        if writes and not os.path.realpath(os.fsdecode(path)).startswith(root + os.sep):
            raise PermissionError("sandbox: writing outside the sandbox directory is not allowed")
sys.addaudithook(guard)
namespace = {"__name__": "solution", "__builtins__": __builtins__}
try:
    exec(compile(code, "solution.py", "exec"), namespace)
    loaded = True
except BaseException:
    loaded = False
passed = 0
for test in tests if loaded else []:
    try:
        exec(compile(test, "test.py", "exec"), namespace)
        passed += 1
    except BaseException:
        pass
out.write(f"\n{nonce} {passed} {int(loaded)}\n")
out.flush()
os._exit(0)
'''


@dataclass(frozen=True)
class SandboxResult:
    passed: int  # asserts that ran without raising
    total: int
    status: str  # "ok", "error" (the code itself raised), "timeout", "killed" (a limit or a signal ended it)

    @property
    def score(self) -> float:
        return self.passed / self.total if self.total else 0.0


def run_asserts(code: str, tests: list[str], timeout: float = 10.0, memory: int = MEMORY_LIMIT,
                cpu_seconds: int = CPU_SECONDS) -> SandboxResult:
    """Run `code`, then each of `tests` (Python statements, typically asserts) in its namespace, in a child process
    (see the module docstring). Whatever the code does, this returns: passed counts the tests that did not raise;
    the code raising, running out of time or memory, or dying counts 0."""
    nonce = secrets.token_hex(16)
    job = json.dumps({"nonce": nonce, "code": code, "tests": list(tests), "memory": int(memory),
                      "cpu": int(cpu_seconds)})
    with tempfile.TemporaryDirectory(prefix="dsv2-sandbox-") as root:
        proc = subprocess.Popen([sys.executable, "-I", "-c", _CHILD], cwd=root, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
                                env={"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"})
        try:
            out, _ = proc.communicate(job.encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            # the child is not reaped yet, so its group id is still its own: kill it and whatever it started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return SandboxResult(0, len(tests), "timeout")
    for line in reversed(out.decode("utf-8", "replace").splitlines()):
        parts = line.split()
        if len(parts) == 3 and parts[0] == nonce:
            passed, loaded = int(parts[1]), parts[2] == "1"
            return SandboxResult(passed, len(tests), "ok" if loaded else "error")
    return SandboxResult(0, len(tests), "killed")
