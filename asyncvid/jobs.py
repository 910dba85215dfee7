"""Loading a sampler once per rank and sampling many requests with it; a CLI batch of videos on top of that.

`load_sampler` is the one place that picks how a sampler loads. The CLI, the notebook API (asyncvid.api) and the
worker pool (asyncvid.pool) all go through it and through `Loaded.generate`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import launch
from .asyncdiff_config import AsyncDiffConfig
from .devices import resolve_device, resolve_dtype
from .errors import UsageError
from .generate import StepCallback, generate
from .outputs import save_with_sidecar
from .parallel_decode import parallel_decode
from .resume import settings_of, to_make
from .schedulers import set_scheduler
from .video import Video


@dataclass(frozen=True)
class ModelSpec:
    """What every rank loads: the model, the sampler and the precision (picklable: it travels to the workers)."""

    model: str
    sampler: AsyncDiffConfig | ParaTAAConfig | None = None  # None: sequential sampling
    motion_adapter: str | None = None
    device: str | None = None
    dtype: str | None = None
    scheduler: str | None = None  # None: the pipeline's own; else a name from asyncvid.schedulers
    # Sizes the stage split is balanced for (None: the model's); any size can be sampled afterwards.
    plan_shape: tuple[int | None, int | None, int | None] = (None, None, None)  # frames, height, width
    quiet: bool = True  # hide library warnings and loading bars
    allow_pickle: bool = False  # load pickle weights too (they can run code); whole-pipeline samplers only

    def describe(self) -> dict:
        """The settings that decide the output (with the request's own): recorded in sidecars, compared on resume."""
        sampler = self.sampler.describe() if self.sampler is not None else {"name": "sequential"}
        return {"model": self.model, "motion_adapter": self.motion_adapter, "sampler": sampler,
                "scheduler": self.scheduler, "dtype": self.dtype}


@dataclass
class Loaded:
    """A pipeline loaded on one rank, ready to sample any number of requests."""

    pipe: object
    adapter: object
    spec: ModelSpec
    metadata: dict  # what every video from it records: model folder, device, dtype, sampler
    decoder: Callable | None = None  # parallel decoding: None on ranks other than 0
    hook: object | None = None  # the sampler's UNet hook, for its per-call statistics
    # A sampler with its own loop: run(loaded, request, on_step) -> Video | None, instead of the pipeline's loop.
    run: Callable | None = None

    @property
    def task(self) -> str:
        return self.adapter.TASK

    def generate(self, request, on_step: StepCallback | None = None) -> Video | None:
        """One video (None on ranks that do not gather the frames)."""
        if request.describe()["task"] != self.task:
            raise UsageError(f"model '{self.spec.model}' does {self.task}, not {request.describe()['task']}; "
                             f"use {'text_to_video' if self.task == 'text-to-video' else 'image_to_video'}")
        meta = {**self.metadata, "settings": settings_of(request, self.spec)}
        if self.run is not None:
            return self.run(self, request, on_step)
        video = generate(self.pipe, self.adapter, request, metadata=meta, decoder=self.decoder, on_step=on_step)
        if video is not None and self.hook is not None:
            video.metadata["sampler"] = {**video.metadata["sampler"], "bytes_sent_rank0": self.hook.state.bytes_sent}
        return video


def runs_in_process(sampler, devices: int) -> bool:
    """One device and no process group needed: sample in the calling process (AsyncDiff always needs a group)."""
    return devices == 1 and not isinstance(sampler, AsyncDiffConfig)


def load_sampler(rank: launch.Rank | None, spec: ModelSpec) -> Loaded:
    """Load `spec` on this rank (None: in this process, no process group), dispatching on the sampler's type."""
    if spec.quiet:
        quiet_libraries()
    if spec.sampler is None:
        return _load_sequential(rank, spec)
    if isinstance(spec.sampler, AsyncDiffConfig):
        return _load_asyncdiff(rank, spec)
    from .parataa_config import ParaTAAConfig  # here, so that AsyncDiff and sequential runs never import ParaTAA

    if isinstance(spec.sampler, ParaTAAConfig):
        from .parataa_run import load_parataa

        return load_parataa(rank, spec)
    raise TypeError(f"sampler must be None (sequential), an AsyncDiffConfig or a ParaTAAConfig, "
                    f"got {type(spec.sampler).__name__}")


def _load_sequential(rank: launch.Rank | None, spec: ModelSpec) -> Loaded:
    from .pipelines import load_pipeline

    device = rank.device if rank is not None else resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    pipe, adapter, folder = load_pipeline(spec.model, device=device, dtype=dtype, motion_adapter=spec.motion_adapter,
                                          allow_pickle=spec.allow_pickle)
    set_scheduler(pipe, spec.scheduler)
    return Loaded(pipe, adapter, spec, _metadata(spec, folder, device, dtype, {"name": "sequential"}))


def _load_asyncdiff(rank: launch.Rank | None, spec: ModelSpec) -> Loaded:
    from .asyncdiff_setup import setup_asyncdiff
    from .pipelines import adapter_for, resolve_model, resolve_motion_adapter, units_for

    if rank is None:
        raise UsageError("AsyncDiff runs in a process group; use asyncvid.load(..., devices=N) or the CLI")
    dtype = resolve_dtype(spec.dtype, rank.device)
    folder = resolve_model(spec.model)
    adapter = adapter_for(folder)
    frames, height, width = spec.plan_shape
    motion = resolve_motion_adapter(spec.motion_adapter) if spec.motion_adapter else None
    staged = setup_asyncdiff(folder, adapter, units_for, spec.sampler,
                             shape={"frames": frames, "height": height, "width": width}, device=rank.device,
                             dtype=dtype, motion_adapter=motion, settings={**spec.describe(), "shape": spec.plan_shape},
                             scheduler=spec.scheduler)
    sampler = {**spec.sampler.describe(), "devices": rank.world_size, "plan": staged.plan.as_lists()}
    return Loaded(staged.pipe, adapter, spec, _metadata(spec, folder, rank.device, dtype, sampler),
                  decoder=parallel_decode, hook=staged.hook)


def _metadata(spec: ModelSpec, folder, device, dtype, sampler: dict) -> dict:
    return {"model": spec.model, "model_folder": str(folder), "device": str(device),
            "dtype": str(dtype).removeprefix("torch."), "sampler": sampler, "scheduler": spec.scheduler or "pipeline"}


def quiet_libraries() -> None:
    """Hide diffusers/transformers warnings and loading bars (workers start with default logging)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# --- the CLI's batch: every video of one command, written as soon as it is done ---------------------------------


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
    scheduler: str | None = None  # None: the pipeline's own; else a name from asyncvid.schedulers
    failures: list[str] = field(default_factory=list)  # one line per video that failed
    # Per request, whether to make it (None: decide from the outputs and their sidecars, asyncvid.resume).
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
            loaded = load_sampler(None, job.spec())
            _check_task(loaded, job)
            return _make_all(loaded.generate, job, write=True)
    from .pool import WorkerPool

    with WorkerPool(job.spec(), job.devices, device, threads=job.threads, oversubscribe=job.oversubscribe) as pool:
        _check_task(pool, job)
        return _make_all(pool.generate, job, write=True)


def _rank_main(rank: launch.Rank, job: Job) -> list[Path]:
    """One rank under an outside launcher: every rank samples in lockstep, so a failure ends the job."""
    import torch.distributed as dist

    # Rank 0 decides what is left to make (other machines may not see the outputs), so every rank skips alike.
    decided = [to_make(job.requests, job.targets, job.spec(), overwrite=job.overwrite) if rank.rank == 0 else None]
    dist.broadcast_object_list(decided, src=0)
    job.make = decided[0]
    if not any(job.make):
        if rank.rank == 0:
            _print_skipped(job)
        return []
    loaded = load_sampler(rank, job.spec())
    _check_task(loaded, job)
    return _make_all(loaded.generate, job, write=rank.rank == 0, keep_going=False)


def _make_all(sample: Callable, job: Job, *, write: bool, keep_going: bool = True) -> list[Path]:
    """Sample each request and write it as soon as it is done (only where `write`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .pool import RankFailed

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
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
