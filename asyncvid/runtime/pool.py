"""Worker processes, one per rank, that load a model once and then sample request after request.

The caller (a notebook kernel or the CLI) coordinates from outside the process group: it sends each request to
every rank of one group over a pipe and takes the video from the group's first rank. With data-parallel groups
(asyncvid.runtime.layout) each idle group is handed the next request, so the groups make different videos at once. Outside, because a coordinator inside the group would sit in
collectives where it can neither be interrupted nor notice a dead rank, would own the process's one default group
for as long as the kernel lives, and would change the kernel's thread count. Its cost is one idle process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from multiprocessing.connection import wait

import torch
from tqdm import tqdm

from asyncvid.errors import UsageError
from asyncvid.pipelines import resolve_model
from asyncvid.runtime import launch
from asyncvid.runtime.launch import RankFailed
from asyncvid.runtime.layout import RankLayout
from asyncvid.runtime.loaders import load_sampler

__all__ = ["RankFailed", "RequestFailed", "WorkerPool"]

ERROR_GRACE_S = 5.0  # after one rank reports an error, how long the others get to report theirs
STOP_GRACE_S = 3.0  # after asking workers to stop, how long before they are killed


class RequestFailed(RuntimeError):
    """One request failed on a rank while every rank stayed in step: the pool can take the next request."""


class WorkerPool:
    """`world_size` ranks that each load `spec` once (loaders.load_sampler) and sample every request sent to them."""

    def __init__(self, spec, world_size: int, device: torch.device, *, threads: int | None = None,
                 oversubscribe: bool = False, layout: RankLayout | None = None, start_method: str | None = None):
        """`start_method` None (the default: launch.start_context, forked by a server that imported torch and
        diffusers once), "spawn" (each worker imports them afresh) or "fork" (they start at once, sharing the
        caller's imports; only where the caller has run no tensor work and holds no CUDA state or other threads,
        e.g. the CLI before its first video: a fork copies a thread pool half-made).
        """
        self.layout = layout or RankLayout(1, world_size)
        self.layout.check_world_size(world_size)
        launch.check_device_count(world_size, device, oversubscribe, self.layout)
        if not callable(spec.model):  # build an embedded model once, here, rather than on every rank at once
            resolve_model(spec.model, variant=spec.variant)
        ctx = mp.get_context(start_method) if start_method else launch.start_context()
        port = launch.free_port()
        self._conns, self._procs = [], []
        # Ends the workers when the pool is closed, garbage-collected, or at interpreter exit (finalize runs atexit).
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._conns)
        self.calls = 0
        try:
            for rank in range(world_size):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=_serve, name=f"asyncvid-rank{rank}", daemon=True,
                                   args=(theirs, spec, rank, self.layout, device, port, threads))
                self._conns.append(ours)
                proc.start()
                self._procs.append(proc)
                theirs.close()
            self.workers = self._collect()  # per rank: pid, load time, task
        except BaseException:
            self.kill()  # a rank that failed to start or load has left: the others cannot sample without it
            raise
        self.task = self.workers[0]["task"]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def generate(self, request, on_step=None):
        """The video of `request` from the first group; raises RankFailed (and closes the pool) if a rank dies or
        hangs."""
        ((_, _, result),) = self.imap([request], None if on_step is None else lambda i, *step: on_step(*step))
        if isinstance(result, Exception):
            raise result
        return result

    def imap(self, requests, on_step=None):
        """Yield (index, group, video or the exception that request raised) as each request is done, each handed
        to the next idle group; `on_step(index, done, total, note)` reports progress. RankFailed (a dead or hung
        rank) is raised, and closes the pool; stopping the iteration while a group is still at work closes it too
        (the ranks cannot be stopped half-way through a video)."""
        if self.closed:
            raise RankFailed("this pool of workers is closed (a rank failed, or a call was interrupted); load the model "
                             "again")
        pending = list(enumerate(requests))[::-1]
        busy: dict[int, list] = {}  # group -> [request index, replies, errors, time of the first error]
        layout = self.layout

        def start(group: int) -> None:
            index, request = pending.pop()
            for rank in layout.ranks_of(group):
                try:
                    self._conns[rank].send(("generate", request))
                except (BrokenPipeError, ConnectionResetError, EOFError):
                    self._fail(rank, self._exit_reason(rank))
            busy[group] = [index, {}, {}, None]
            self.calls += 1

        try:
            for group in range(layout.data_parallel):
                if pending:
                    start(group)
            while busy:
                waiting = [r for g, entry in busy.items() for r in layout.ranks_of(g) if r not in entry[1]]
                ready = self._ready(waiting)
                for rank in waiting:
                    entry = busy[layout.group_of(rank)]
                    kind, payload = self._message(rank, ready)
                    if kind == "step":
                        if on_step is not None:
                            on_step(entry[0], *payload)
                    elif kind == "ok":
                        entry[1][rank] = payload
                    elif kind == "error":
                        entry[1][rank] = entry[2][rank] = payload
                        entry[3] = entry[3] or time.monotonic()
                done = [g for g, entry in busy.items() if len(entry[1]) == layout.group_size]
                for group in done:  # each group is still in step, even if its request failed
                    index, replies, errors, _ = busy.pop(group)
                    yield index, group, self._result(replies, errors, layout.ranks_of(group)[0])
                    if pending:
                        start(group)
                if done:
                    continue  # the caller may have taken long: read the pipes again before judging silence
                for group, (index, replies, errors, first_error) in busy.items():
                    ranks = layout.ranks_of(group)
                    if first_error and time.monotonic() - first_error > ERROR_GRACE_S:
                        # The silent ranks wait in a collective (for the failed rank) or are stuck themselves.
                        silent = min(r for r in ranks if r not in replies)
                        failed = min(errors)
                        self._fail(silent, f"stopped answering; rank {failed} failed: {errors[failed][1]}")
        except GeneratorExit:  # the caller stopped asking: only groups still at work must be stopped
            if busy and not self.closed:
                self.kill()
            raise
        except BaseException:
            if not self.closed:
                self.kill()  # an interrupt in the middle of a call: the ranks cannot be stopped half-way
            raise

    @staticmethod
    def _result(replies: dict, errors: dict, leader: int):
        """The leader's video, or the error of the lowest failed rank as an exception."""
        if not errors:
            return replies[leader]
        rank = min(errors)
        usage, message, _ = errors[rank]
        return UsageError(message) if usage else RequestFailed(f"rank {rank} failed: {message}")

    def close(self) -> None:
        """Ask the workers to leave, then end any that do not; safe to call more than once."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None and not issubclass(exc[0], Exception):
            self.kill()  # KeyboardInterrupt, SystemExit: do not wait for the workers
        self.close()

    def kill(self) -> None:
        """End every worker now (they may be inside a collective and cannot be asked)."""
        _terminate(self._procs)
        self._finalizer()

    def _ready(self, ranks: list[int]) -> list:
        """The pipes and process sentinels of `ranks` that have something to say (within 0.2 s)."""
        return wait([self._conns[r] for r in ranks] + [self._procs[r].sentinel for r in ranks], timeout=0.2)

    def _message(self, rank: int, ready: list) -> tuple:
        """`rank`'s next (kind, payload) if it sent one, else (None, None); a rank that died fails the pool."""
        conn, proc = self._conns[rank], self._procs[rank]
        if conn in ready or (proc.sentinel in ready and conn.poll()):
            try:
                return conn.recv()
            except (EOFError, ConnectionResetError):
                self._fail(rank, self._exit_reason(rank))
        elif proc.sentinel in ready:
            self._fail(rank, self._exit_reason(rank))
        return None, None

    def _collect(self) -> list:
        """Every rank's reply to loading; a dead rank, or one error with the others silent, fails."""
        replies: dict[int, object] = {}
        errors: dict[int, tuple] = {}
        first_error = None
        try:
            while len(replies) < len(self._procs):
                waiting = [r for r in range(len(self._procs)) if r not in replies]
                ready = self._ready(waiting)
                for rank in waiting:
                    kind, payload = self._message(rank, ready)
                    if kind == "ok":
                        replies[rank] = payload
                    elif kind == "error":
                        replies[rank] = errors[rank] = payload
                        first_error = first_error or time.monotonic()
                if first_error and len(replies) < len(self._procs) and time.monotonic() - first_error > ERROR_GRACE_S:
                    # The silent ranks wait in a collective (for the failed rank) or are stuck themselves.
                    silent = min(r for r in range(len(self._procs)) if r not in replies)
                    failed = min(errors)
                    self._fail(silent, f"stopped answering; rank {failed} failed: {errors[failed][1]}")
        except BaseException:
            if not self.closed:
                self.kill()  # an interrupt in the middle of a call: the ranks cannot be stopped half-way
            raise
        if errors:  # every rank answered, so the pool is still in step: only this request failed
            rank = min(errors)
            usage, message, _ = errors[rank]
            if usage:
                raise UsageError(message)
            raise RequestFailed(f"rank {rank} failed: {message}")
        return [replies[r] for r in range(len(self._procs))]

    def _fail(self, rank: int, reason: str):
        self.kill()
        raise RankFailed(f"rank {rank} failed ({reason}); stopped all {len(self._procs)} ranks")

    def _exit_reason(self, rank: int) -> str:
        proc = self._procs[rank]
        proc.join(timeout=1)
        code = proc.exitcode
        if code is None:
            return "stopped answering"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"


def _serve(conn, spec, rank: int, layout: RankLayout, device, port: int, threads: int | None) -> None:
    """A worker: join the group, load once, then sample each request until told to stop or the caller is gone."""
    # Ctrl-C reaches the whole process group; the coordinator decides what an interrupt ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    launch.watch_parent()
    # tqdm's default lock is a multiprocessing semaphore that a worker ending with os._exit (or killed) would leave
    # to the resource tracker, which then warns at exit; a worker's bars are off and its own, so a thread lock does.
    tqdm.set_lock(threading.RLock())

    try:
        with launch.process_group(rank, layout.world_size, rank, device, port, threads) as here:
            here = launch.place(here, layout)
            start = time.perf_counter()
            loaded = load_sampler(here, spec)
            conn.send(("ok", {"pid": os.getpid(), "load_s": time.perf_counter() - start, "task": loaded.task}))
            _loop(conn, loaded, here.rank)
    except BaseException as err:  # report anything, then leave
        _report(conn, err)
        code = launch.USAGE_EXIT if isinstance(err, UsageError) else 1
    else:
        code = 0
    # Skip the interpreter's teardown (seconds of freeing modules): nothing is left to write.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _loop(conn, loaded, rank: int) -> None:
    def step(done, total, note=""):
        conn.send(("step", (done, total, note)))

    while True:
        try:
            command, request = conn.recv()
        except EOFError:  # the coordinator is gone
            return
        if command == "stop":
            return
        try:
            video = loaded.generate(request, on_step=step if rank == 0 else None)
        except Exception as err:  # this request failed; the rank can take the next one
            _report(conn, err)
            continue
        conn.send(("ok", video))


def _report(conn, err: BaseException) -> None:
    try:
        conn.send(("error", (isinstance(err, UsageError), f"{type(err).__name__}: {err}"
                             if not isinstance(err, UsageError) else str(err), traceback.format_exc())))
    except (OSError, EOFError):
        pass


def _terminate(procs) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()


def _shutdown(procs, conns) -> None:
    for conn in conns:
        try:
            conn.send(("stop", None))
        except (OSError, EOFError):
            pass
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    _terminate(procs)
    for proc in procs:
        proc.join(timeout=2)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=2)
    for conn in conns:
        conn.close()
