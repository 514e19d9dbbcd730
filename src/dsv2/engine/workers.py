"""The ranks of a tensor-parallel engine. Rank 0 is the LLM in the calling process: it schedules, samples and
detokenizes. Every rank holds its shard of the model (each reads only its slices of the checkpoint) and a whole
copy of the latent cache (MLA's latent is shared by all heads, so it cannot be split by heads), and every rank runs
every step: the model's collectives (an all-reduce after attention and after each MLP/MoE) need all of them.

One host -- LLM(path, tensor_parallel_size=N) starts N-1 worker processes beside the caller, each a fresh Python
interpreter (as multiprocessing's spawn, without re-importing the caller's __main__) running `worker_main`:

    llm = LLM("DeepSeek-V2-Lite-Chat", tensor_parallel_size=2)      # CPU: gloo, the cores split between ranks
    dsv2 serve --model DIR --tensor-parallel-size 8                  # CUDA: nccl, rank r on cuda:r

Several hosts -- the same program on every rank under torchrun, with tensor_parallel_size = WORLD_SIZE. On ranks
other than 0, LLM() runs `run_worker` and then exits the process when rank 0 is done; rank 0 runs the program
(serves HTTP for `dsv2 serve`). Two nodes of 8 GPUs, the same command on each (NODE = 0 or 1, HOST0 = node 0's
address; the model directory at the same path on both):

    torchrun --nnodes 2 --node-rank NODE --nproc-per-node 8 --master-addr HOST0 --master-port 29500 \\
        -m dsv2.cli serve --model /models/DeepSeek-V2-Chat --tensor-parallel-size 16 --host 0.0.0.0

Protocol. Rank 0 sends each message to all ranks with broadcast_object_list on a gloo "control" group that never
times out (idle workers wait there as long as the server is up):
    ("load", LoadMessage)     every rank loads its shard with rank 0's InferencePlan, on its own device
    ("cache", EngineConfig)   every rank sizes a latent cache; all gather; the smallest num_blocks is used everywhere
    ("step", StepInputs)      every rank runs ModelRunner.execute on the same inputs; rank 0 alone samples
    ("stop", None)            the workers leave the loop and exit
The model's collectives run on the default process group, with COLLECTIVE_TIMEOUT: a rank that hangs becomes an
error there instead of a wait forever. A worker that fails writes its error into the group's store (key
dsv2/error/RANK) and exits. Rank 0 checks its workers before every step and, when a collective fails, waits briefly
for the dead one and raises WorkerDied naming it, how it ended and what to do; the LLM is then unusable (its
remaining workers are stopped). Workers ignore SIGINT and SIGTERM (rank 0 decides when they stop: a Ctrl-C or a
draining server must not kill them under it), and die with their parent, also when it is SIGKILLed.
"""
from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
import signal
import subprocess
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from ..capability import InferencePlan
from ..checkpoint import validate
from ..config import ModelConfig
from ..parallel.launch import (TorchrunEnv, cpu_threads_per_rank, describe_exit, die_with_parent, leave_group,
                               sigint_deferred, torchrun_env)
from ..parallel.tensor_parallel import ParallelContext, check_sizes
from ..model import Transformer
from .config import EngineConfig
from .kv_cache import CacheLayout, size_kv_cache
from .prepare import load_for_inference
from .runner import ModelRunner, StepInputs, StepLogits, measure_activation_bytes

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)  # the model's collectives: ranks run the same work in lockstep
CONTROL_TIMEOUT = datetime.timedelta(days=3650)  # workers wait for the next step as long as rank 0 lives
START_TIMEOUT_S = 300.0  # a worker must import torch and reach the store by then
DEATH_WAIT_S = 5.0  # after a failed collective, how long rank 0 waits for a failing worker to finish exiting
STOP_WAIT_S = 20.0  # after "stop", how long a worker gets to exit before it is killed


class WorkerDied(RuntimeError):
    """A tensor-parallel worker process ended while the engine needed it; the LLM cannot go on."""


@dataclasses.dataclass(frozen=True)
class LoadMessage:
    directory: str
    plan: InferencePlan  # rank 0's; each rank replaces the device by its own


def start_workers(tensor_parallel_size, directory: str, device: torch.device) -> Workers | None:
    """None for tensor_parallel_size 1 (one process, as before); else the started group, from rank 0's side. On a
    torchrun rank other than 0 this does not return: the rank serves rank 0 and the process exits."""
    tp = tensor_parallel_size
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tensor_parallel_size={tp!r}: must be an integer >= 1, the number of processes (one per "
                         "GPU, or CPU ranks sharing the cores) the model is split over")
    env = torchrun_env()
    if env is not None and env.world_size > 1 and tp not in (1, env.world_size):
        raise ValueError(f"tensor_parallel_size={tp} under torchrun with WORLD_SIZE={env.world_size}: every rank of "
                         f"the job runs the engine together, so pass --tensor-parallel-size {env.world_size} (or "
                         "run without torchrun: one host starts its own workers)")
    if tp == 1:
        return None
    cfg = ModelConfig.from_pretrained(directory)  # a bad checkpoint or size fails here, before any process starts
    check_sizes(cfg, tp)
    validate(cfg, directory)
    if device.type == "cuda":
        if env is None and device.index not in (None, 0):
            raise ValueError(f"device={device}: with tensor_parallel_size={tp} rank r runs on cuda:r; choose the GPUs "
                             "with CUDA_VISIBLE_DEVICES and pass device='cuda'")
        visible = torch.cuda.device_count()
        needed = tp if env is None else env.local_world_size
        if visible < needed:
            raise ValueError(f"tensor_parallel_size={tp} needs {needed} GPUs on this host, one per rank, but "
                             f"{visible} are visible; lower it, or spread the ranks over hosts with torchrun")
    elif device.type != "cpu":
        raise ValueError(f"device={device}: tensor parallelism runs on CUDA (nccl) or the CPU (gloo)")
    if env is not None and env.world_size > 1:
        if env.rank != 0:
            raise SystemExit(run_worker(env.rank, tp, _rank_device(device, env.local_rank), env.local_world_size))
        return Workers.join_torchrun(env, device)
    return Workers.spawn(tp, device)


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if device.type == "cuda" else torch.device("cpu")


def _init_group(rank: int, world: int, device: torch.device, store=None) -> dist.ProcessGroup:
    """The default process group (the model's collectives) and the control group; returns the control group."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if store is None:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _size_together(model: Transformer, plan: InferencePlan, engine: EngineConfig, ranks_on_host: int,
                   control: dist.ProcessGroup) -> CacheLayout:
    """Every rank sizes a cache from its own free memory; the smallest wins everywhere (the same num_blocks on
    every rank: the scheduler on rank 0 hands out blocks for all of them)."""
    dist.barrier(group=control)  # every rank has loaded its shard before anyone measures free memory
    cfg = model.config
    chunk = min(engine.max_num_batched_tokens, engine.max_model_len or cfg.max_position_embeddings)
    try:
        mine = size_kv_cache(cfg, plan, engine, measure_activation_bytes(model, chunk), ranks_on_host)
    except ValueError as e:
        mine = str(e)
    layouts: list = [None] * dist.get_world_size()
    dist.all_gather_object(layouts, mine, group=control)
    for rank, layout in enumerate(layouts):
        if isinstance(layout, str):
            raise ValueError(layout if rank == 0 else f"tensor-parallel rank {rank}: {layout}")
    return min(layouts, key=lambda layout: layout.num_blocks)


class Workers:
    """Rank 0's side of the group: sends every message, watches the worker processes it started, stops them."""

    def __init__(self, world_size: int, device: torch.device, ranks_on_host: int, procs: list[subprocess.Popen],
                 control: dist.ProcessGroup, store, threads_before: int | None):
        self.world_size, self.device, self.ranks_on_host = world_size, device, ranks_on_host
        self.procs = procs  # procs[i] is rank i + 1 (empty under torchrun: the launcher owns the processes)
        self.control, self.store = control, store
        self.threads_before = threads_before
        self.failure: RuntimeError | None = None  # set once the group cannot run any more, and why
        self.closed = False
        self._busy = threading.RLock()  # one message at a time: a step on the engine thread, shutdown at exit
        atexit.register(self.shutdown)

    # ---- starting ------------------------------------------------------------------------------------------------
    @classmethod
    def spawn(cls, world: int, device: torch.device) -> Workers:
        """Start ranks 1..world-1 on this host as children of this process and form the group with them."""
        if dist.is_initialized():
            raise ValueError(f"tensor_parallel_size={world}: this process already has a torch.distributed process "
                             "group (another LLM with tensor_parallel_size > 1, or your own init_process_group), and "
                             "the engine's ranks need the default group: one tensor-parallel LLM per process at a "
                             "time -- shut the other down first (llm.shutdown())")
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
        threads = cpu_threads_per_rank(world) if device.type == "cpu" else torch.get_num_threads()
        # prctl's parent-death signal fires when the starting *thread* ends: only trust it from the main thread
        pdeathsig = threading.current_thread() is threading.main_thread()
        # the workers import the dsv2 this process runs, wherever it comes from (a checkout, a venv)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
               "OMP_NUM_THREADS": str(threads)}
        procs = []
        try:
            for rank in range(1, world):
                args = [str(rank), str(world), str(store.port), str(os.getpid()), device.type, str(int(pdeathsig))]
                procs.append(subprocess.Popen(
                    [sys.executable, "-c", "from dsv2.engine.workers import worker_main; worker_main()", *args],
                    env=env, stdin=subprocess.DEVNULL))
            _wait_until_started(procs, store)
            threads_before = None
            if device.type == "cpu":
                threads_before = torch.get_num_threads()
                torch.set_num_threads(threads)
            control = _init_group(0, world, _rank_device(device, 0), store)
        except BaseException:
            for p in procs:
                p.kill()
                p.wait()
            raise
        return cls(world, _rank_device(device, 0), world, procs, control, store, threads_before)

    @classmethod
    def join_torchrun(cls, env: TorchrunEnv, device: torch.device) -> Workers:
        """Rank 0 of a torchrun job: the other ranks run the same program and wait in run_worker."""
        rank_device = _rank_device(device, env.local_rank)
        if dist.is_initialized():
            raise ValueError("this process already has a default process group; LLM(tensor_parallel_size=N) under "
                             "torchrun forms its own: create the LLM before (or instead of) init_process_group")
        control = _init_group(0, env.world_size, rank_device)
        return cls(env.world_size, rank_device, env.local_world_size, [], control, _store(), None)

    # ---- the messages ------------------------------------------------------------------------------------------
    def _send(self, kind: str, payload=None) -> None:
        dist.broadcast_object_list([(kind, payload)], src=0, group=self.control)

    def load(self, directory: str, plan: InferencePlan) -> Transformer:
        """Every rank loads its shard; returns rank 0's."""
        return self._guarded(self._load, directory, plan)

    def _load(self, directory: str, plan: InferencePlan) -> Transformer:
        self._send("load", LoadMessage(directory, plan))
        return load_for_inference(directory, plan, ParallelContext(0, self.world_size))

    def size_cache(self, model: Transformer, plan: InferencePlan, engine: EngineConfig) -> CacheLayout:
        """One cache layout for every rank (each allocates its own copy, the same size)."""
        def size():
            self._send("cache", engine)
            try:
                return _size_together(model, plan, engine, self.ranks_on_host, self.control)
            except ValueError as e:  # raised alike on every rank after the gather: the group stays whole
                return e
        layout = self._guarded(size)
        if isinstance(layout, ValueError):
            raise layout
        return layout

    def step(self, runner: ModelRunner, inputs: StepInputs) -> StepLogits:
        """Send the step to every rank and run rank 0's part; the model's collectives keep the ranks in step."""
        with sigint_deferred():  # a step stopped half-way would leave the workers waiting in a collective
            return self._guarded(self._step, runner, inputs)

    def _step(self, runner: ModelRunner, inputs: StepInputs) -> StepLogits:
        self._send("step", inputs)
        return runner.execute(inputs)

    def _guarded(self, fn, *args):
        """Run fn if the group is whole; any error in it breaks the group (the ranks may be out of step), and
        comes back naming the worker that died, if one did."""
        with self._busy:
            if self.failure is not None:
                raise type(self.failure)(*self.failure.args)
            dead = self._dead_workers()
            if dead:
                raise self._fail(None, dead)
            try:
                return fn(*args)
            except BaseException as e:
                collective = isinstance(e, RuntimeError)  # gloo / nccl errors, a timeout; also CUDA out of memory
                failure = self._fail(e, self._dead_workers(wait=DEATH_WAIT_S if collective else 0.0))
                if collective or isinstance(failure, WorkerDied):
                    raise failure from e
                raise  # rank 0's own error (a bad file, Ctrl-C while loading): the workers are stopped, it is shown

    # ---- failures ------------------------------------------------------------------------------------------------
    def _dead_workers(self, wait: float = 0.0) -> list[int]:
        deadline = time.monotonic() + wait
        while True:
            dead = [i + 1 for i, p in enumerate(self.procs) if p.poll() is not None]
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(0.05)

    def _worker_error(self, rank: int) -> str | None:
        if self.store is None:
            return None
        try:
            key = f"dsv2/error/{rank}"
            return self.store.get(key).decode(errors="replace") if self.store.check([key]) else None
        except Exception:
            return None

    def _fail(self, error: BaseException | None, dead: list[int]) -> RuntimeError:
        """The error that ends this group; the remaining workers are stopped."""
        if dead:
            parts = []
            for rank in dead:
                p = self.procs[rank - 1]
                said = self._worker_error(rank)
                parts.append(f"rank {rank} (pid {p.pid}) {describe_exit(p.returncode)}"
                             + (f": {said} (more in its output on stderr)" if said else ""))
            failure = WorkerDied(f"tensor-parallel worker {'; '.join(parts)}. The engine cannot go on without every "
                                 "rank, so it stopped: create a new LLM (or restart dsv2)")
        else:
            said = [f"rank {r}: {m}" for r in range(1, self.world_size) if (m := self._worker_error(r))]
            where = "; ".join(said) if said else (
                "if another rank died or hung, its log says why (torchrun prefixes each line with [rankN])"
                if not self.procs else "every worker is still running")
            failure = RuntimeError(f"the tensor-parallel engine failed on rank 0 ({type(error).__name__}: {error}); "
                                   f"{where}. The ranks may be out of step, so the engine stopped: create a new LLM "
                                   "(or restart dsv2)")
        self.failure = failure
        self._stop(graceful=False)
        return failure

    # ---- stopping --------------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the workers: they leave their loop and exit (killed if they do not within STOP_WAIT_S)."""
        self._stop(graceful=self.failure is None)

    def _stop(self, graceful: bool) -> None:
        # wait for a step in flight (bounded by COLLECTIVE_TIMEOUT); past STOP_WAIT_S, kill the workers under it
        locked = self._busy.acquire(timeout=STOP_WAIT_S)
        try:
            if self.closed:
                return
            self.closed = True
            if self.failure is None:
                self.failure = RuntimeError("this LLM was shut down (its tensor-parallel workers are stopped); "
                                            "create a new one")
            self._stop_processes(graceful and locked)
        finally:
            if locked:
                self._busy.release()

    def _stop_processes(self, graceful: bool) -> None:
        atexit.unregister(self.shutdown)
        if graceful:
            try:
                self._send("stop")
            except Exception:
                graceful = False
        deadline = time.monotonic() + (STOP_WAIT_S if graceful else 0.0)
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if p.poll() is None:
                p.kill()
                p.wait()
        try:
            leave_group()
        except Exception:
            pass
        if self.threads_before is not None:
            torch.set_num_threads(self.threads_before)


def _wait_until_started(procs: list[subprocess.Popen], store) -> None:
    """Each worker writes dsv2/ready/RANK once it reaches the store; a worker that dies first is named."""
    deadline = time.monotonic() + START_TIMEOUT_S
    waiting = set(range(1, len(procs) + 1))
    while waiting:
        for rank in list(waiting):
            p = procs[rank - 1]
            if p.poll() is not None:
                raise WorkerDied(f"tensor-parallel worker rank {rank} (pid {p.pid}) {describe_exit(p.returncode)} "
                                 "while starting; its output above says why")
            if store.check([f"dsv2/ready/{rank}"]):
                waiting.discard(rank)
        if waiting and time.monotonic() > deadline:
            raise WorkerDied(f"tensor-parallel workers {sorted(waiting)} did not start within {START_TIMEOUT_S:.0f} "
                             "s; the machine may be overloaded")
        time.sleep(0.02)


# ---- the worker side ---------------------------------------------------------------------------------------------
def worker_main() -> None:
    """Entry of a worker process started by Workers.spawn: argv = rank world port parent_pid device pdeathsig."""
    rank, world, port, parent = (int(a) for a in sys.argv[1:5])
    device_type, pdeathsig = sys.argv[5], sys.argv[6] == "1"
    die_with_parent(parent, use_prctl=pdeathsig)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                          timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
    store.set(f"dsv2/ready/{rank}", str(os.getpid()))
    sys.exit(run_worker(rank, world, _rank_device(torch.device(device_type), rank), world, store))


def run_worker(rank: int, world: int, device: torch.device, ranks_on_host: int, store=None) -> int:
    """A worker rank: join the group, then load / size / step as rank 0 says until it says stop. Returns the exit
    code. Errors go to stderr and into the store, for rank 0 to report."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 decides when workers stop
        signal.signal(sig, signal.SIG_IGN)
    control = None
    try:
        control = _init_group(rank, world, device, store)
        store = store or _store()
        model = runner = plan = None
        while True:
            message = [None]
            try:
                dist.broadcast_object_list(message, src=0, group=control)
            except RuntimeError:  # rank 0 is gone (its end of the connection closed)
                print(f"dsv2 tensor-parallel rank {rank}: rank 0 went away; exiting", file=sys.stderr, flush=True)
                return 1
            kind, payload = message[0]
            if kind == "step":
                runner.execute(payload)
            elif kind == "load":
                plan = dataclasses.replace(payload.plan, device=str(device))
                model = load_for_inference(payload.directory, plan, ParallelContext(rank, world))
            elif kind == "cache":
                try:
                    layout = _size_together(model, plan, payload, ranks_on_host, control)
                except ValueError:
                    continue  # every rank raised it: rank 0 tells the user and sends "stop"
                runner = ModelRunner(model, layout.num_blocks, layout.block_size, plan.cache_dtype,
                                     payload.kv_cache_dtype)
            elif kind == "stop":
                leave_group()
                return 0
            else:
                raise RuntimeError(f"unknown message {kind!r} from rank 0 (are all ranks running the same dsv2?)")
    except BaseException as e:
        summary = f"{type(e).__name__}: {e}"
        print(f"dsv2 tensor-parallel rank {rank} failed: {summary}", file=sys.stderr, flush=True)
        if not isinstance(e, (ValueError, FileNotFoundError)):
            traceback.print_exc()
        try:
            if store is not None:
                store.set(f"dsv2/error/{rank}", summary)
        except Exception:
            pass
        return 1
