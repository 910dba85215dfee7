"""The CLI's batch: every video of one command, made on one sampler and written as soon as it is done.

Sequential sampling runs in this process; parallel sampling on a pool of worker processes (the same pool the
notebook API uses), or on the ranks of an outside launcher (torchrun). Outputs already made with the same settings
are skipped (asyncvid.video.resume).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.errors import UsageError
from asyncvid.models.devices import resolve_device
from asyncvid.parataa.config import ParaTAAConfig
from asyncvid.runtime import launch
from asyncvid.runtime.launch import Rank, RankFailed
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
    threads: int | None = None  # CPU threads per process (default: the cores shared evenly by the processes)
    oversubscribe: bool = False  # allow more processes than CPU cores
    scheduler: str | None = None  # None: the pipeline's own; else a name from asyncvid.models.schedulers
    failures: list[str] = field(default_factory=list)  # one line per video that failed
    # Per request, whether to make it (None: decide from the outputs and their sidecars, asyncvid.video.resume).
    make: list[bool] | None = None

    def spec(self) -> ModelSpec:
        first = self.requests[0]
        return ModelSpec(self.model, self.sampler, self.motion_adapter, self.device, self.dtype, self.scheduler,
                         (first.num_frames, first.height, first.width), self.quiet, self.allow_pickle)


class JobFailed(RuntimeError):
    """Some videos of a batch failed; the others were written."""


def run_job(job: Job) -> list[Path]:
    """Make every video of the job; returns the written paths (on rank 0; other ranks return []).

    Sequential sampling runs in this process; parallel sampling on a pool of worker processes (the same pool the
    notebook API uses), or on the ranks of an outside launcher (torchrun). A video that fails is reported and the
    others are still made; JobFailed is raised at the end.
    """
    device = resolve_device(job.device)
    if job.make is None and not launch.launched_externally():
        job.make = to_make(job.requests, job.targets, job.spec(), overwrite=job.overwrite)
    if job.make is not None and not any(job.make):
        _print_skipped(job)
        return []
    if launch.launched_externally():
        return launch.run(_rank_main, job.devices, device, job, threads=job.threads)
    if runs_in_process(job.sampler, job.devices):
        with launch.cpu_threads(job.threads, device):
            with _status(f"loading {job.model}", show=True):
                loaded = load_sampler(None, job.spec())
            _check_task(loaded, job)
            return _make_all(loaded.generate, job, write=True)
    with _status(f"starting {job.devices} workers and loading {job.model} on each", show=True):
        pool = WorkerPool(job.spec(), job.devices, device, threads=job.threads, oversubscribe=job.oversubscribe)
    with pool:
        _check_task(pool, job)
        return _make_all(pool.generate, job, write=True)


def _rank_main(rank: Rank, job: Job) -> list[Path]:
    """One rank under an outside launcher: every rank samples in lockstep, so a failure ends the job."""
    # Rank 0 decides what is left to make (other machines may not see the outputs), so every rank skips alike.
    decided = [to_make(job.requests, job.targets, job.spec(), overwrite=job.overwrite) if rank.rank == 0 else None]
    dist.broadcast_object_list(decided, src=0)
    job.make = decided[0]
    if not any(job.make):
        if rank.rank == 0:
            _print_skipped(job)
        return []
    with _status(f"loading {job.model} on {rank.world_size} ranks", show=rank.rank == 0):
        loaded = load_sampler(rank, job.spec())
    _check_task(loaded, job)
    return _make_all(loaded.generate, job, write=rank.rank == 0, keep_going=False)


def _make_all(sample: Callable, job: Job, *, write: bool, keep_going: bool = True) -> list[Path]:
    """Sample each request and write it as soon as it is done (only where `write`)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    written = []
    with Progress(*columns, transient=True, disable=not (write and sys.stderr.isatty())) as progress:
        for request, target, make in zip(job.requests, job.targets, job.make or [True] * len(job.requests)):
            if not make:
                if write:
                    progress.console.print(f"skipped {target} (done with the same settings)", markup=False,
                                           highlight=False, soft_wrap=True)
                continue
            bar = progress.add_task(target.name, total=request.num_inference_steps)
            try:
                video = sample(request, on_step=lambda done, total, note="", bar=bar, name=target.name:
                               progress.update(bar, completed=done, description=f"{name} {note}".rstrip()))
                if video is not None and write:
                    written.append(save_with_sidecar(video, target, job.fmt, overwrite=job.overwrite))
            except (RankFailed, UsageError):
                raise  # the pool is gone, or a bad input or setting that the other videos share
            except Exception as err:
                if not keep_going:
                    raise
                job.failures.append(f"{target.name}: {err}")
                print(f"error: {target.name} failed: {err}", file=sys.stderr, flush=True)
                continue
            finally:
                progress.remove_task(bar)
            if video is not None and write:
                seconds = video.metadata["timings"]["total_s"]
                # Plain text: a path is neither rich markup ("out[1]") nor wrapped at 80 columns when piped.
                progress.console.print(f"wrote {written[-1]} ({video.num_frames} frames, {seconds:.1f} s)",
                                       markup=False, highlight=False, soft_wrap=True)
    if job.failures:
        raise JobFailed(f"{len(job.failures)} of {len(job.requests)} videos failed; the others were written")
    return written


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
