"""A batch of videos from one model: sequential in this process, or AsyncDiff across ranks; rank 0 writes."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import launch
from .asyncdiff_config import AsyncDiffConfig
from .devices import resolve_device, resolve_dtype
from .generate import generate
from .outputs import save_with_sidecar
from .parallel_decode import parallel_decode
from .schedulers import set_scheduler


@dataclass
class Job:
    """Everything a rank needs to make and write the videos (picklable: it travels to worker processes)."""

    task: str  # "text-to-video" or "image-to-video"
    model: str
    requests: list
    targets: list[Path]
    fmt: str = "mp4"
    overwrite: bool = False
    motion_adapter: str | None = None
    device: str | None = None
    dtype: str | None = None
    sampler: AsyncDiffConfig | None = None  # None: sequential sampling
    devices: int = 1
    quiet: bool = True  # hide library warnings and loading bars on every rank
    threads: int | None = None  # CPU threads per process (default: the cores shared evenly by the processes)
    oversubscribe: bool = False  # allow more processes than CPU cores
    scheduler: str | None = None  # None: the pipeline's own; else a name from asyncvid.schedulers


def run_job(job: Job) -> list[Path]:
    """Make every video of the job; returns the written paths (on rank 0; other ranks return [])."""
    device = resolve_device(job.device)
    if job.sampler is None and job.devices == 1 and not launch.launched_externally():
        with launch.cpu_threads(job.threads, device):
            return _sequential(job, device)
    return launch.run(_rank_main, job.devices, device, job, threads=job.threads, oversubscribe=job.oversubscribe)


def _sequential(job: Job, device) -> list[Path]:
    from .pipelines import load_pipeline

    dtype = resolve_dtype(job.dtype, device)
    pipe, adapter, folder = load_pipeline(job.model, device=device, dtype=dtype, motion_adapter=job.motion_adapter)
    _check_task(adapter, job)
    set_scheduler(pipe, job.scheduler)
    meta = _metadata(job, folder, device, dtype, {"name": "sequential"})
    return _make_all(pipe, adapter, job, meta, write=True)


def _rank_main(rank: launch.Rank, job: Job) -> list[Path]:
    if job.quiet:
        quiet_libraries()
    from .asyncdiff_setup import setup_asyncdiff
    from .pipelines import adapter_for, resolve_model, resolve_motion_adapter, units_for

    dtype = resolve_dtype(job.dtype, rank.device)
    folder = resolve_model(job.model)
    adapter = adapter_for(folder)
    _check_task(adapter, job)
    first = job.requests[0]
    shape = {"frames": first.num_frames, "height": first.height, "width": first.width}
    config = job.sampler or AsyncDiffConfig(stages=1, warmup=first.num_inference_steps)
    motion = resolve_motion_adapter(job.motion_adapter) if job.motion_adapter else None
    settings = {"model": job.model, "motion_adapter": job.motion_adapter, "sampler": config.describe(),
                "scheduler": job.scheduler,
                "requests": [r.describe() for r in job.requests], "dtype": str(dtype)}
    staged = setup_asyncdiff(folder, adapter, units_for, config, shape=shape, device=rank.device, dtype=dtype,
                             motion_adapter=motion, settings=settings, scheduler=job.scheduler)
    sampler = {**config.describe(), "devices": rank.world_size, "plan": staged.plan.as_lists()}
    meta = _metadata(job, folder, rank.device, dtype, sampler)
    return _make_all(staged.pipe, adapter, job, meta, write=rank.rank == 0, hook=staged.hook,
                     decoder=parallel_decode)


def _make_all(pipe, adapter, job: Job, meta: dict, *, write: bool, hook=None, decoder=None) -> list[Path]:
    """Sample each request and write it as soon as it is done (only where `write`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    written = []
    with Progress(*columns, transient=True, disable=not (write and sys.stderr.isatty())) as progress:
        for request, target in zip(job.requests, job.targets):
            bar = progress.add_task(target.name, total=request.num_inference_steps)
            video = generate(pipe, adapter, request, metadata=meta, decoder=decoder,
                             on_step=lambda done, total, bar=bar: progress.update(bar, completed=done))
            progress.remove_task(bar)
            if video is None:  # a rank other than 0 under parallel decoding
                continue
            if hook is not None:
                video.metadata["sampler"] = {**video.metadata["sampler"], "bytes_sent_rank0": hook.state.bytes_sent}
            if write:
                path = save_with_sidecar(video, target, job.fmt, overwrite=job.overwrite)
                written.append(path)
                seconds = video.metadata["timings"]["total_s"]
                # Plain text: a path is neither rich markup ("out[1]") nor wrapped at 80 columns when piped.
                progress.console.print(f"wrote {path} ({video.num_frames} frames, {seconds:.1f} s)",
                                       markup=False, highlight=False, soft_wrap=True)
    return written


def quiet_libraries() -> None:
    """Hide diffusers/transformers warnings and loading bars (workers start with default logging)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _check_task(adapter, job: Job) -> None:
    from .errors import UsageError

    if adapter.TASK != job.task:
        command = "generate" if adapter.TASK == "text-to-video" else "i2v"
        raise UsageError(f"model '{job.model}' does {adapter.TASK}, not {job.task}; use `asyncvid {command}` with it")


def _metadata(job: Job, folder, device, dtype, sampler: dict) -> dict:
    return {"model": job.model, "model_folder": str(folder), "device": str(device),
            "dtype": str(dtype).removeprefix("torch."), "sampler": sampler, "scheduler": job.scheduler or "pipeline"}
