"""Process plumbing for a group of ranks, apart from what the ranks run: finding torchrun's environment, tying a
child's life to its parent's, naming how a process ended, sharing the cores, keeping Ctrl-C out of a step.

    env = torchrun_env()                  # RANK, WORLD_SIZE, ... when started by torchrun, else None
    die_with_parent(parent_pid)           # in a child: SIGKILL when the parent dies (prctl), and a poll of getppid
    describe_exit(proc.returncode)        # "exited with code 1" / "was killed by signal 9 (SIGKILL)"
    torch.set_num_threads(cpu_threads_per_rank(4))
    with sigint_deferred(): ...           # Ctrl-C waits until the block is done, then raises
    leave_group(); left_a_group()         # destroy this process's groups; whether it did (the CLI then exits fast)
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_POLL_S = 0.5
_LEFT = False


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def torchrun_env() -> TorchrunEnv | None:
    """This process's place in a job started by torchrun (or any launcher that sets the same variables)."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        return TorchrunEnv(rank, world, int(env.get("LOCAL_RANK", rank)), int(env.get("LOCAL_WORLD_SIZE", world)))
    except ValueError:
        raise ValueError(f"RANK={env['RANK']!r} / WORLD_SIZE={env['WORLD_SIZE']!r} are not integers; they should "
                         "come from torchrun (unset them to run in one process)") from None


def die_with_parent(parent_pid: int, use_prctl: bool = True) -> None:
    """Make this (child) process end when parent_pid does, even on SIGKILL of the parent.

    Linux: prctl(PR_SET_PDEATHSIG, SIGKILL). It fires when the *thread* that started the child exits, so a parent
    that started us from a thread that may end passes use_prctl=False. Everywhere: a daemon thread that polls
    getppid() (the child is re-parented when its parent dies) and exits the process."""
    if use_prctl and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the poll below still works
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch():
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent_pid:
                print(f"dsv2 worker {os.getpid()}: the parent process {parent_pid} is gone; exiting", file=sys.stderr,
                      flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="dsv2-parent-watch", daemon=True).start()


def describe_exit(returncode: int | None) -> str:
    """How a child process ended, from subprocess's returncode (negative: killed by that signal)."""
    if returncode is None:
        return "is still running"
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = "unknown signal"
    hint = " -- often the out-of-memory killer (see `dmesg`)" if -returncode == signal.SIGKILL else ""
    return f"was killed by signal {-returncode} ({name}){hint}"


def cpu_threads_per_rank(ranks_on_host: int) -> int:
    """Torch threads for each of ranks_on_host processes sharing this host's cores: OMP_NUM_THREADS when set (the
    user's choice, torchrun sets 1), else an even share of the cores this process may run on."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // ranks_on_host)


@contextmanager
def sigint_deferred():
    """Hold Ctrl-C (SIGINT) until the block ends, then deliver it. A block that runs collectives with other
    processes must not stop half-way: the others would wait in the next collective for a peer that never comes.
    Only the main thread receives signals, so elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda sig, frame: caught.append(sig))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)


def leave_group() -> None:
    """Destroy every process group of this process (the default one and its subgroups), and remember it."""
    import torch.distributed as dist
    global _LEFT
    dist.destroy_process_group()
    _LEFT = True


def left_a_group() -> bool:
    """Whether this process took part in a process group and left it: the CLI then exits without the interpreter's
    teardown, where torch 2.13's gloo can abort a rank that has finished (cli._exit_now)."""
    return _LEFT
