"""What every sampling command does: validate everything before a model loads or a process starts, then hand the
batch to the library (asyncvid.runtime.batch). Library imports sit inside the functions: `asyncvid --help` and a
typo in an option must not wait for torch and diffusers to import."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Optional

import typer

from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.cli.options import Sampler
from asyncvid.errors import UsageError
from asyncvid.parataa.config import ParaTAAConfig
from asyncvid.requests import UsageWarning


def sampler_config(sampler: Sampler, stages: int, stride: int, warmup: int, time_shift: bool, split: Optional[str],
                   cfg_parallel: bool, cost: str, weight_cap: float, parataa: dict):
    """The sampler's config from the command's options (None: sequential); each config validates itself."""
    if sampler is Sampler.sequential:
        return None
    if sampler is Sampler.parataa:
        return ParaTAAConfig(**parataa)
    return AsyncDiffConfig(stages=stages, stride=stride, warmup=warmup, time_shift=time_shift,
                           split=tuple(s.strip() for s in split.split(",")) if split else None,
                           cfg_parallel=cfg_parallel, cost=cost, weight_cap=weight_cap)


def run(build, task, *, model, motion_adapter, out, fmt, overwrite, device, dtype, debug, devices, threads,
        oversubscribe, scheduler, sampler, allow_pickle=False):
    """Validate everything before the model loads or a process starts, then hand the job to the library."""
    quiet_libraries(debug)
    _show_usage_warnings()
    try:
        from asyncvid.models.devices import resolve_device, resolve_dtype  # torch, diffusers: see the module docstring
        from asyncvid.runtime.batch import Job, run_job
        from asyncvid.video.outputs import plan_targets, prepare_out_dir

        requests, stems = build()
        config = sampler()
        if devices < 1:
            raise UsageError(f"devices must be at least 1, got {devices}")
        if threads is not None and threads < 1:
            raise UsageError(f"threads must be at least 1, got {threads}")
        if config is None and devices > 1 and not _external():
            raise UsageError(f"--devices {devices} needs a parallel sampler; add --sampler asyncdiff or drop --devices")
        if config is None and _external() and _external_world() > 1:
            raise UsageError(
                f"sequential sampling runs in one process, but the launcher started {_external_world()}; "
                f"add --sampler asyncdiff (stages + stride - 1 = {_external_world()}) or launch one process"
            )
        if config is not None:
            config.check_world_size(devices if not _external() else _external_world())
        dtype_name = dtype.value if dtype else None
        resolve_dtype(dtype_name, resolve_device(device))
        from asyncvid.pipelines import preflight

        if allow_pickle and isinstance(config, AsyncDiffConfig):
            raise UsageError("--allow-pickle works with --sampler sequential or parataa only (AsyncDiff reads each "
                             "stage's weights from safetensors); convert the weights to safetensors")
        # In this process, before any worker starts.
        preflight(model, task, requests, motion_adapter=motion_adapter, allow_pickle=allow_pickle)
        # Existing outputs are not refused here: run_job skips those whose sidecar has the same settings.
        targets = plan_targets(prepare_out_dir(out), stems, fmt, overwrite=True)
        job = Job(task, model, requests, targets, fmt=fmt, overwrite=overwrite, motion_adapter=motion_adapter,
                  device=device, dtype=dtype_name, sampler=config, devices=devices, quiet=not debug,
                  threads=threads, oversubscribe=oversubscribe, scheduler=scheduler.value if scheduler else None,
                  allow_pickle=allow_pickle)
        run_job(job)
    except UsageError as err:
        if debug:
            raise
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:  # the workers are already gone and no partial file is left
        typer.echo("interrupted", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # now: freeing torch's modules at interpreter exit takes seconds
    except RuntimeError as err:  # a rank died (RankFailed) or some videos failed (JobFailed)
        from asyncvid.runtime.batch import JobFailed  # already imported by now: no cost
        from asyncvid.runtime.launch import RankFailed

        if debug or not isinstance(err, (JobFailed, RankFailed)):
            raise
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1)


def _external() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _external_world() -> int:
    return int(os.environ["WORLD_SIZE"])


def _show_usage_warnings() -> None:
    """asyncvid's warnings to the user (a truncated prompt, pickle weights) print as one `warning: ...` line."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UsageWarning):
            typer.echo(f"warning: {message}", err=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def quiet_libraries(debug: bool) -> None:
    """Hide library warnings and loading bars unless --debug: the CLI prints its own progress."""
    if not debug:
        # Before transformers is first imported: it reads this once, and some of its warnings come at import time.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from asyncvid.runtime.loaders import quiet_libraries as quiet  # imports diffusers: not at --help time

        quiet()
        logging.getLogger("torch.distributed").setLevel(logging.ERROR)
