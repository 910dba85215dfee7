"""Running a function on every rank: under torchrun / accelerate launch (rank and world from the environment), or on
local worker processes that asyncvid starts itself (gloo on CPU, NCCL with one GPU per rank)."""

from __future__ import annotations

import datetime
import importlib
import logging
import multiprocessing as mp
import os
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import connection as mp_connection
from typing import Callable

import torch
import torch.distributed as dist

from asyncvid.errors import UsageError
from asyncvid.runtime.layout import RankLayout

TIMEOUT_S = float(os.environ.get("ASYNCVID_COLLECTIVE_TIMEOUT", "300"))
USAGE_EXIT = 2
USAGE_GRACE_S = 10.0  # bad input fails on every rank: give rank 0 time to report it itself
# What every rank imports whatever it runs (diffusers.hooks brings torch._dynamo, peft and transformers): about 9 s
# of a fresh interpreter's start here, paid once by the fork server instead of by every rank of every launch.
PRELOAD = ["torch", "torch.distributed", "diffusers", "diffusers.hooks", "asyncvid.asyncdiff"]
# What a rank forked by this process's fork server starts with (_state, asked of a probe rank once): the server's
# environment and copies of PRELOAD, not the caller's of the moment. The server is multiprocessing's, one a process.
_server: dict | None = None
_server_lock = threading.Lock()
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rank:
    """Where this process stands: its rank, the world size, its rank on this machine, and its torch device. Within
    a data-parallel group (asyncvid.runtime.layout), `rank` and `world_size` count the group's ranks and `group` is
    its process group (None: the whole world)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: object = None

    def within(self, group, rank: int, world_size: int) -> Rank:
        """This process as rank `rank` of `world_size` in `group`."""
        return Rank(rank, world_size, self.local_rank, self.device, group)


class RankFailed(RuntimeError):
    """Another rank failed; the message names it and its error."""


def launched_externally() -> bool:
    """True under torchrun, accelerate launch or any launcher that sets RANK and WORLD_SIZE."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_device(local_rank: int, requested: torch.device, local_world: int | None = 1) -> torch.device:
    """This rank's device: on CUDA one GPU per rank on this machine (NCCL cannot put two ranks on one GPU), or the
    GPU asked for (`cuda:N`) when one process runs alone; on the CPU, the CPU. `local_world` is the number of ranks
    on this machine, None where the launcher does not say (then a rank that sees one GPU is given it: launchers that
    set CUDA_VISIBLE_DEVICES per rank show each rank its own)."""
    if requested.type != "cuda":
        return requested
    if local_world == 1 and requested.index is not None:
        return requested
    visible = torch.cuda.device_count()
    if local_world is not None and local_world > visible:
        # Every rank on this machine sees the same counts, so every one refuses here, before any collective.
        raise UsageError(f"{local_world} processes on this machine but {visible} GPU(s) visible: NCCL needs one GPU "
                         f"per rank; launch at most {visible} processes per machine (--nproc-per-node or --devices)")
    if local_rank < visible:
        return torch.device("cuda", local_rank)
    if visible == 1:
        return torch.device("cuda", 0)
    raise UsageError(f"local rank {local_rank} but {visible} GPUs visible: NCCL needs one GPU per rank; launch at "
                     f"most {visible} processes per machine, or set LOCAL_WORLD_SIZE")


def threads_per_process(world_size: int) -> int:
    """CPU threads per rank: the cores this process may use, shared evenly by the ranks on this machine."""
    cores = _cores()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, cores // local)


def check_device_count(world_size: int, device: torch.device, oversubscribe: bool = False,
                       layout: RankLayout | None = None) -> None:
    """One GPU per rank on CUDA; on CPU, at most one rank per core unless `oversubscribe` (slower; for testing).
    With data-parallel groups the error names the layout's factors instead of --devices."""
    if layout is not None and layout.data_parallel > 1:
        there = torch.cuda.device_count() if device.type == "cuda" else _cores()
        if world_size > there and not (device.type == "cpu" and oversubscribe):
            kind = "GPUs visible" if device.type == "cuda" else "CPU cores here"
            fewer = max(1, there // layout.group_size)
            raise UsageError(f"{layout.formula()} processes, but there are {there} {kind}; use --data-parallel "
                             f"{fewer} or fewer" + ("" if device.type == "cuda" else " (or --oversubscribe)"))
        return
    if device.type == "cuda" and world_size > torch.cuda.device_count():
        visible = torch.cuda.device_count()
        raise UsageError(f"--devices {world_size} needs {world_size} GPUs but {visible} are visible; use --devices "
                         f"{visible} or make more GPUs visible (CUDA_VISIBLE_DEVICES)")
    cores = _cores()
    if device.type == "cpu" and world_size > cores and not oversubscribe:
        raise UsageError(
            f"--devices {world_size} exceeds the {cores} CPU cores here; use --devices {cores} or fewer "
            f"(or --oversubscribe to run slower, e.g. to test a layout)"
        )


@contextmanager
def cpu_threads(n: int | None, device: torch.device):
    """Run with `n` CPU threads (None: unchanged), restoring the previous count afterwards."""
    before = torch.get_num_threads()
    if n is not None and device.type == "cpu":
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(fn: Callable, world_size: int, device: torch.device, *args, threads: int | None = None,
        oversubscribe: bool = False):
    """Call `fn(rank, *args)` on every rank; returns rank 0's result (on other external ranks, their own)."""
    if launched_externally():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        return _in_group(fn, rank, world, local, device, None, args, threads)
    check_device_count(world_size, device, oversubscribe)
    port = free_port()
    ctx = start_context()
    errors = ctx.SimpleQueue()
    workers = [
        ctx.Process(target=_worker, args=(fn, r, world_size, device, port, errors, args, threads),
                    daemon=True)
        for r in range(1, world_size)
    ]
    for w in workers:
        w.start()
    done = threading.Event()
    threading.Thread(target=_watch, args=(workers, errors, done), daemon=True).start()
    try:
        return _in_group(fn, 0, world_size, 0, device, port, args, threads)
    finally:
        done.set()
        for w in workers:
            w.join(timeout=10)
        _stop(workers)


def start_context():
    """How workers start: forked from a server that imported PRELOAD once (a rank is ready in about a second rather
    than the nine a fresh interpreter takes here) while what such a rank starts with is the caller's (environment,
    copies of PRELOAD, cores), else spawned afresh, so a rank always sees the caller's settings (HF_HOME,
    CUDA_VISIBLE_DEVICES, a sys.path entry ahead of site-packages). The first call starts the server and waits for
    its imports; Linux only (forking a process that imported torch is unsafe on macOS; Windows has no fork)."""
    global _server
    if sys.platform != "linux":
        return mp.get_context("spawn")
    with _server_lock:
        for name in PRELOAD:  # here too, first: importing diffusers sets TORCHINDUCTOR_CACHE_DIR in os.environ
            importlib.import_module(name)
        if _server is None:
            mp.set_forkserver_preload(PRELOAD)  # no effect on a server already running: the probe reads that one
            _server = _probe()
            if _server is not None:  # what C code set (readline sets LINES and COLUMNS) reaches a started
                # interpreter's os.environ, not ours: every rank has it, spawned or forked
                _server["env"] = {k: v for k, v in _server["env"].items() if k in os.environ}
        here = _state()
        if here != _server:
            log.debug("ranks spawned afresh: they would not start as this process is from the fork server")
        return mp.get_context("forkserver" if here == _server else "spawn")


# Variables that change between launches and that no rank reads at import: the rendezvous process_group sets on rank
# 0 for each launch, and pytest's name of the test phase running.
_PER_LAUNCH = ("MASTER_ADDR", "MASTER_PORT", "PYTEST_CURRENT_TEST")


def _state() -> dict:
    """What a rank inherits rather than asks for: the environment (less _PER_LAUNCH), the files PRELOAD's packages
    were imported from (the fork server imports them with a fresh interpreter's sys.path, not the caller's), and
    the cores this process may run on."""
    packages = {name.partition(".")[0] for name in PRELOAD}
    env = {k: v for k, v in os.environ.items() if k not in _PER_LAUNCH}
    return {"env": env, "modules": {p: sys.modules[p].__file__ for p in packages if p in sys.modules},
            "cores": sorted(os.sched_getaffinity(0))}


def _probe() -> dict | None:
    """_state() of a rank forked by the fork server (starting it); None if the probe fails."""
    ctx = mp.get_context("forkserver")
    ours, theirs = ctx.Pipe(duplex=False)
    probe = ctx.Process(target=_report_state, args=(theirs,), daemon=True)
    probe.start()
    theirs.close()
    try:
        state = ours.recv() if ours.poll(TIMEOUT_S) else None
    except (EOFError, OSError):  # the probe died: no state
        state = None
    probe.join(timeout=10)
    ours.close()
    return state


def _report_state(conn) -> None:
    conn.send(_state())


def _in_group(fn, rank, world, local, device, port, args, threads):
    with process_group(rank, world, local, device, port, threads) as here:
        return fn(here, *args)


@contextmanager
def process_group(rank: int, world: int, local: int, device: torch.device, port: int | None, threads: int | None):
    """Join the default process group (collectives time out after ASYNCVID_COLLECTIVE_TIMEOUT seconds, so a stuck
    rank ends the job instead of hanging it) and yield this process's Rank; leave the group on exit."""
    if port is not None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # Ranks on this machine: all of them when asyncvid started them (port given), else as the launcher says.
    local_world = int(os.environ["LOCAL_WORLD_SIZE"]) if "LOCAL_WORLD_SIZE" in os.environ else (
        world if port is not None else None)
    device = rank_device(local, device, local_world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S),
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        with cpu_threads(threads or threads_per_process(world), device):
            yield Rank(rank, world, local, device)
    finally:
        dist.destroy_process_group()


def _worker(fn, rank, world, device, port, errors, args, threads):
    watch_parent()
    try:
        _in_group(fn, rank, world, rank, device, port, args, threads)
    except BaseException as err:  # report anything, then exit non-zero
        errors.put((rank, f"{type(err).__name__}: {err}", traceback.format_exc()))
        sys.stderr.flush()
        os._exit(USAGE_EXIT if isinstance(err, UsageError) else 1)


def place(rank: Rank, layout: RankLayout) -> Rank:
    """`rank` (of the whole world) as a rank of its data-parallel group, with the group's torch process group;
    unchanged when the world is one group. Every rank creates every group, in the same order, as torch requires."""
    if layout.data_parallel == 1:
        return rank
    groups = [dist.new_group(layout.ranks_of(g)) for g in range(layout.data_parallel)]
    return rank.within(groups[layout.group_of(rank.rank)], rank.rank % layout.group_size, layout.group_size)


def watch_parent() -> None:
    """End this worker as soon as the process that started it ends, even by SIGKILL (a killed CLI or notebook
    kernel): multiprocessing's parent sentinel, a pipe only that process holds open, reads as closed then. It is
    the launcher's however the worker started; a fork server's child has the server for its parent, which CPython
    keeps alive while any of its children runs."""
    parent = mp.parent_process()
    if parent is None:
        raise RuntimeError("watch_parent() is for processes that multiprocessing started")
    threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()


def _exit_with(sentinel) -> None:
    mp_connection.wait([sentinel])
    os._exit(1)


def _watch(workers, errors, done: threading.Event) -> None:
    """If a worker dies, rank 0 would wait in a collective until the timeout: report and end the job now."""
    while not done.is_set():
        failed = [w for w in workers if w.exitcode not in (None, 0)]
        if failed:
            if failed[0].exitcode == USAGE_EXIT:
                time.sleep(USAGE_GRACE_S)
            rank, message = workers.index(failed[0]) + 1, f"exit code {failed[0].exitcode}"
            if not errors.empty():
                rank, message, _ = errors.get()
            if done.is_set():
                return
            print(f"error: rank {rank} failed ({message}); stopping all ranks", file=sys.stderr, flush=True)
            _stop(workers)
            os._exit(USAGE_EXIT if failed[0].exitcode == USAGE_EXIT else 1)
        if not any(w.is_alive() for w in workers):
            return
        time.sleep(0.2)


def _stop(workers) -> None:
    for w in workers:
        if w.is_alive():
            w.terminate()
    for w in workers:
        w.join(timeout=5)
        if w.is_alive():
            w.kill()


def _cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
