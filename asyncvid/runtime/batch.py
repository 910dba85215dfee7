"""The CLI's batch: every video of one command, made on one sampler and written as soon as it is done.

Sequential sampling runs in this process; parallel sampling on a pool of worker processes (the same pool the
notebook API uses), or on the ranks of an outside launcher (torchrun). Outputs already made with the same settings
are skipped (asyncvid.video.resume).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import pickle
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.errors import UsageError
from asyncvid.models.devices import resolve_device
from asyncvid.parataa.config import ParaTAAConfig
from asyncvid.runtime import launch
from asyncvid.runtime.launch import Rank, RankFailed
from asyncvid.runtime.layout import RankLayout
from asyncvid.runtime.loaders import ModelSpec, load_sampler, runs_in_process
from asyncvid.runtime.pool import WorkerPool
from asyncvid.video.outputs import save_with_sidecar
from asyncvid.video.resume import to_make


@dataclass
class Job:
    """Everything needed to make and write the videos of one command (picklable: it travels to torchrun ranks)."""

    task: str  # "text-to-video" or "image-to-video"
    model: str
    requests: list
    targets: list[Path]
    fmt: str = "mp4"
    overwrite: bool = False
    motion_adapter: str | None = None
    device: str | None = None
    dtype: str | None = None
    sampler: AsyncDiffConfig | ParaTAAConfig | None = None  # None: sequential sampling
    devices: int = 1
    quiet: bool = True  # hide library warnings and loading bars on every rank
    allow_pickle: bool = False  # load pickle weights too (they can run code)
    variant: str | None = None  # the form of the weights (asyncvid.models.variants)
    threads: int | None = None  # CPU threads per process (default: the cores shared evenly by the processes)
    oversubscribe: bool = False  # allow more processes than CPU cores
    scheduler: str | None = None  # None: the pipeline's own; else a name from asyncvid.models.schedulers
    loras: tuple = ()  # asyncvid.models.lora.Lora, fused in order
    failures: list[str] = field(default_factory=list)  # one line per video that failed
    # Per request, whether to make it (None: decide from the outputs and their sidecars, asyncvid.video.resume).
    make: list[bool] | None = None
    data_parallel: int = 1  # groups of the sampler's ranks, each making whole videos (asyncvid.runtime.layout)
    # How local workers start (asyncvid.runtime.pool.WorkerPool; None: from launch's fork server): "fork" skips
    # their ~4 s of imports, for a caller that has run no tensor work yet (the CLI).
    start_method: str | None = None

    def rank_layout(self, world_size: int | None = None) -> RankLayout:
        """The groups on `world_size` processes (default: --devices)."""
        return RankLayout.of(self.sampler, self.data_parallel, world_size or self.devices)

    def spec(self) -> ModelSpec:
        first = self.requests[0]
        return ModelSpec(self.model, self.sampler, self.motion_adapter, self.device, self.dtype, self.scheduler,
                         (first.num_frames, first.height, first.width), self.quiet, self.allow_pickle,
                         self.variant, self.loras)


class JobFailed(RuntimeError):
    """Some videos of a batch failed; the others were written."""


def run_job(job: Job) -> list[Path]:
    """Make every video of the job; returns the written paths (on rank 0; other ranks return []).

    Sequential sampling runs in this process; parallel sampling, or several data-parallel groups, on a pool of
    worker processes (the same pool the notebook API uses), or on the ranks of an outside launcher (torchrun). A
    video that fails is reported and the others are still made; JobFailed is raised at the end.
    """
    device = resolve_device(job.device)
    if job.make is None and not launch.launched_externally():
        job.make = to_make(job.requests, job.targets, job.spec(), overwrite=job.overwrite)
    if job.make is not None and not any(job.make):
        _print_skipped(job)
        return []
    if launch.launched_externally():
        return launch.run(_rank_main, job.devices, device, job, threads=job.threads)
    layout = job.rank_layout()
    if runs_in_process(job.sampler, job.devices) and layout.data_parallel == 1:
        with launch.cpu_threads(job.threads, device):
            with _status(f"loading {job.model}", show=True):
                loaded = load_sampler(None, job.spec())
            _check_task(loaded, job)
            return _make_all(_one_by_one(loaded.generate), job)
    # A forked worker copies this process: no spinner thread may be running then.
    with _status(f"starting {layout.world_size} workers and loading {job.model} on each",
                 show=job.start_method != "fork"):
        pool = WorkerPool(job.spec(), layout.world_size, device, threads=job.threads,
                          oversubscribe=job.oversubscribe, layout=layout, start_method=job.start_method)
    with pool:
        _check_task(pool, job)
        return _make_all(pool.imap, job, layout=layout)


def _rank_main(rank: Rank, job: Job) -> list[Path]:
    """One rank under an outside launcher. Each data-parallel group makes the videos dealt to it; rank 0 writes
    them all (the other groups' first ranks send theirs), so every output lands on rank 0's disk. Within a group
    every rank samples in lockstep, so a failure there ends the job."""
    layout = job.rank_layout(rank.world_size)
    layout.check_world_size(rank.world_size, launched=True)  # before any collective: fails on every rank alike
    # Videos reach rank 0 whenever their group finishes them: on a group of their own, without the timeout.
    mail = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7)) if layout.data_parallel > 1 else None
    # Rank 0 decides what is left to make (other machines may not see the outputs), so every rank skips alike.
    decided = [to_make(job.requests, job.targets, job.spec(), overwrite=job.overwrite) if rank.rank == 0 else None]
    dist.broadcast_object_list(decided, src=0)
    job.make = decided[0]
    if not any(job.make):
        if rank.rank == 0:
            _print_skipped(job)
        return []
    here = launch.place(rank, layout)
    group = layout.group_of(rank.rank)
    with _status(f"loading {job.model} on {rank.world_size} ranks", show=rank.rank == 0):
        loaded = load_sampler(here, job.spec())
    _check_task(loaded, job)
    keep_going = layout.group_size == 1
    if mail is None:
        return _make_all(_one_by_one(loaded.generate), job, write=rank.rank == 0, keep_going=keep_going)
    # This group's share: the videos to make, dealt in turn.
    todo = [i for i, make in enumerate(job.make) if make]
    dealt = layout.deal(len(todo))
    if rank.rank == 0:
        for i in (i for i, make in enumerate(job.make) if not make):
            print(f"skipped {job.targets[i]} (done with the same settings)", flush=True)
    job.make = [False] * len(job.requests)
    for k, i in enumerate(todo):
        job.make[i] = dealt[k] == group
    imap = _one_by_one(loaded.generate, group)
    if rank.rank != 0:
        forward = functools.partial(_send, mail) if here.rank == 0 else None
        _make_all(imap, job, write=False, keep_going=keep_going, forward=forward)
        return []
    delivery = _Delivery(job, layout, len(todo), functools.partial(print, flush=True), keep_going)
    others = sum(1 for g in dealt if g != 0)
    receiver = threading.Thread(target=_receive, args=(mail, others, delivery), daemon=True)
    receiver.start()
    _make_all(imap, job, keep_going=keep_going, layout=layout, delivery=delivery, raise_failures=False)
    receiver.join()
    if delivery.error is not None:
        raise delivery.error
    if job.failures:
        raise JobFailed(f"{len(job.failures)} of {len(todo)} videos failed; the others were written")
    return delivery.written


def _send(mail, index: int, group: int, result) -> None:
    """A group's video (or its failure) to rank 0, which writes it: its pickled size, then its bytes."""
    data = torch.frombuffer(bytearray(pickle.dumps((index, group, result))), dtype=torch.uint8)
    dist.send(torch.tensor([len(data)]), dst=0, group=mail, tag=_SIZE)
    dist.send(data, dst=0, group=mail, tag=_DATA)


def _receive(mail, count: int, delivery: _Delivery) -> None:
    """Rank 0: write the `count` videos the other groups send, in whatever order they finish. Whatever goes wrong
    here (a shared error such as UsageError, or a sender gone) is kept for the main thread to raise."""
    for _ in range(count):
        try:
            size = torch.zeros(1, dtype=torch.int64)
            sender = dist.recv(size, group=mail, tag=_SIZE)  # from whichever group is done first
            data = torch.empty(int(size), dtype=torch.uint8)
            dist.recv(data, src=sender, group=mail, tag=_DATA)
            message = pickle.loads(data.numpy().tobytes())
        except Exception as err:
            delivery.error = RankFailed(f"receiving the other groups' videos failed ({type(err).__name__}: {err})")
            return
        try:
            delivery(*message)
        except Exception as err:
            delivery.error = err
            return


_SIZE, _DATA = 1, 2  # tags: a size is only ever matched with a size, from any sender


def _one_by_one(generate: Callable, group: int = 0):
    """An imap over one sampler in this process: (index, group, video or the error it raised), in order."""

    def imap(requests, on_step=None):
        for index, request in enumerate(requests):
            step = None if on_step is None else functools.partial(on_step, index)
            try:
                yield index, group, generate(request, on_step=step)
            except (RankFailed, UsageError):
                raise  # the ranks are gone, or a bad input or setting that the other videos share
            except Exception as err:
                yield index, group, err

    return imap


class _Delivery:
    """Write each finished video with its sidecar as soon as it is done, or record its failure; say so in one line
    (with several groups, each line also counts the batch). Under torchrun rank 0 calls it from two threads (its own
    group's videos, and the others' as they arrive): one video at a time is written."""

    def __init__(self, job: Job, layout: RankLayout | None, total: int, say: Callable, keep_going: bool):
        self.job, self.layout, self.total, self.say, self.keep_going = job, layout, total, say, keep_going
        self.written: list[Path] = []
        self.error: Exception | None = None
        self.start = time.perf_counter()
        self.lock = threading.Lock()

    def __call__(self, index: int, group: int, result) -> None:
        target = self.job.targets[index]
        if isinstance(result, (RankFailed, UsageError)):
            raise result
        with self.lock:
            if isinstance(result, Exception):
                if not self.keep_going:
                    raise result
                self.job.failures.append(f"{target.name}: {result}")
                print(f"error: {target.name} failed: {result}", file=sys.stderr, flush=True)
                return
            if self.layout is not None and self.layout.data_parallel > 1:
                result.metadata["layout"] = self.layout.describe(group)
            self.written.append(save_with_sidecar(result, target, self.job.fmt, overwrite=self.job.overwrite))
            rate = ""
            if self.layout is not None and self.layout.data_parallel > 1:
                hours = (time.perf_counter() - self.start) / 3600
                rate = f", group {group}; {len(self.written)}/{self.total} videos, {len(self.written) / hours:.0f} videos/h"
            # Plain text: a path is neither rich markup ("out[1]") nor wrapped at 80 columns when piped.
            self.say(f"wrote {self.written[-1]} ({result.num_frames} frames, "
                     f"{result.metadata['timings']['total_s']:.1f} s{rate})")


def _make_all(imap: Callable, job: Job, *, write: bool = True, keep_going: bool = True,
              layout: RankLayout | None = None, delivery: _Delivery | None = None, forward: Callable | None = None,
              raise_failures: bool = True) -> list[Path]:
    """Sample the requests to make through `imap` (asyncvid.runtime.pool.WorkerPool.imap's contract) and write
    each video as soon as it is done (where `write`; `forward(index, group, result)` hands it on instead)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    make = job.make or [True] * len(job.requests)
    chosen = [i for i, m in enumerate(make) if m]
    bars = {}
    with Progress(*columns, transient=True, disable=not (write and sys.stderr.isatty())) as progress:
        say = functools.partial(progress.console.print, markup=False, highlight=False, soft_wrap=True)
        if write and delivery is None:
            for i, m in enumerate(make):
                if not m:
                    say(f"skipped {job.targets[i]} (done with the same settings)")
        delivery = delivery or _Delivery(job, layout, len(chosen), say, keep_going)
        overall = progress.add_task("videos", total=len(chosen)) if len(chosen) > 1 else None

        def on_step(k: int, done: int, total: int, note: str = "") -> None:
            name = job.targets[chosen[k]].name
            if k not in bars:
                bars[k] = progress.add_task(name, total=total)
            progress.update(bars[k], completed=done, description=f"{name} {note}".rstrip())

        for k, group, result in imap([job.requests[i] for i in chosen], on_step):
            if k in bars:
                progress.remove_task(bars.pop(k))
            if forward is not None:
                forward(chosen[k], group, result)
            if isinstance(result, Exception) and (not keep_going or isinstance(result, (RankFailed, UsageError))):
                raise result
            if write:
                delivery(chosen[k], group, result)
                if overall is not None:
                    progress.update(overall, advance=1)
    if job.failures and raise_failures:
        raise JobFailed(f"{len(job.failures)} of {len(chosen)} videos failed; the others were written")
    return delivery.written


def _print_skipped(job: Job) -> None:
    for target in job.targets:
        print(f"skipped {target} (done with the same settings)", flush=True)


def _check_task(loaded, job: Job) -> None:
    if loaded.task != job.task:
        command = "generate" if loaded.task == "text-to-video" else "i2v"
        raise UsageError(f"model '{job.model}' does {loaded.task}, not {job.task}; use `asyncvid {command}` with it")


def _status(text: str, *, show: bool):
    """A spinner with `text` on a terminal while the model loads or workers start (rank 0 only): seconds pass
    there before the first step."""
    if not (show and sys.stderr.isatty()):
        return contextlib.nullcontext()
    return Console(stderr=True).status(text + " ...")
