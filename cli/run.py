"""What every sampling command does: validate everything before a model loads or a process starts, then hand the
batch to the library (asyncvid.runtime.batch). Library imports sit inside the functions: `asyncvid --help` and a
typo in an option must not wait for torch and diffusers to import."""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.cli.options import DEFAULT_WARMUP, Sampler
from asyncvid.errors import UsageError
from asyncvid.models.lora import parse as parse_lora
from asyncvid.parataa.config import ParaTAAConfig
from asyncvid.requests import UsageWarning


def sampler_config(sampler: Sampler, stages: int, stride: int, warmup: int | None, time_shift: bool,
                   split: Optional[str], cfg_parallel: bool, cost: str, weight_cap: float, parataa: dict, steps: int,
                   stale: str = "extrapolate", refresh: int = 0):
    """The sampler's config from the command's options (None: sequential); each config validates itself, and
    against the step count here (a --warmup above --steps is refused; the default warm-up is capped at it)."""
    if sampler is Sampler.sequential:
        return None
    if sampler is Sampler.parataa:
        config = ParaTAAConfig(**parataa)
        config.check_steps(steps)
        return config
    config = AsyncDiffConfig(stages=stages, stride=stride, warmup=min(DEFAULT_WARMUP, steps) if warmup is None
                             else warmup, time_shift=time_shift,
                             split=tuple(s.strip() for s in split.split(",")) if split else None,
                             cfg_parallel=cfg_parallel, cost=getattr(cost, "value", cost), weight_cap=weight_cap,
                             stale=stale, refresh=refresh)
    config.check_steps(steps)
    return config


def run(build, task, *, model, motion_adapter, out, fmt, overwrite, device, dtype, debug, devices, threads,
        oversubscribe, scheduler, sampler, allow_pickle=False, finish=None, data_parallel=1, parallel=None, variant=None,
        loras=None):
    """Check everything before the model loads or a process starts, then hand the batch to the library.

    1. What needs neither torch nor the model (requests, sampler, layout, output folder): a typo fails at once.
    2. The device and the model (its files, its task, each request against it), in this process, once.
    3. The batch (asyncvid.runtime.batch); `finish(requests)` first fills in what the model decides (its guidance).
    """
    try:
        requests, stems = build()
        config = sampler()
        loras = tuple(parse_lora(spec) for spec in loras or ())
        if parallel is None:
            devices = _check_layout(config, devices, threads, data_parallel)
        else:
            _check_auto(config, devices, threads, data_parallel)
        if allow_pickle and isinstance(config, AsyncDiffConfig):
            raise UsageError("--allow-pickle works with --sampler sequential or parataa only (AsyncDiff reads each "
                             "stage's weights from safetensors); convert the weights to safetensors")
        check_out_dir(out)  # the folder itself is made when the first video is written
        quiet_libraries(debug)
        _show_usage_warnings()
        from asyncvid.models.devices import resolve_device, resolve_dtype  # torch, diffusers: see the module docstring
        from asyncvid.pipelines import preflight
        from asyncvid.runtime.batch import Job, run_job
        from asyncvid.runtime.loaders import check_plan
        from asyncvid.video.outputs import plan_targets

        dtype_name = dtype.value if dtype else None
        torch_device = resolve_device(device)
        resolve_dtype(dtype_name, torch_device)
        scheduler_name = scheduler.value if scheduler else None
        preflight(model, task, requests, motion_adapter=motion_adapter, allow_pickle=allow_pickle,
                  scheduler=scheduler_name, variant=variant, loras=loras)
        if isinstance(config, AsyncDiffConfig) and config.split:  # a manual split this UNet cannot take: once, here
            check_plan(model, config, requests[0], motion_adapter, variant)
        requests = finish(requests) if finish is not None else requests
        computed = False  # whether this process has run tensor work (then its workers must not be forked)
        if parallel is not None:  # the cost model picks the sampler and the groups for this batch on these devices
            from asyncvid.runtime.auto import choose

            choice = choose(model, requests, devices=devices, device=torch_device, dtype=dtype_name,
                            motion_adapter=motion_adapter, warmup=DEFAULT_WARMUP, variant=variant)
            typer.echo(f"parallel auto: {choice.describe(len(requests))}", err=True)
            config, data_parallel, devices = choice.sampler, choice.data_parallel, choice.processes
            threads = threads or choice.threads
            computed = choice.measured_here  # timing units ran tensor work here; the cache alone runs none
        # Existing outputs are not refused here: run_job skips those whose sidecar has the same settings.
        targets = plan_targets(out.resolve(), stems, fmt, overwrite=True)
        job = Job(task, model, requests, targets, fmt=fmt, overwrite=overwrite, motion_adapter=motion_adapter,
                  device=device, dtype=dtype_name, sampler=config, devices=devices, quiet=not debug,
                  threads=threads, oversubscribe=oversubscribe, scheduler=scheduler_name,
                  allow_pickle=allow_pickle, variant=variant, data_parallel=data_parallel, loras=loras,
                  start_method=_start_method(torch_device, computed))
        if torch_device.type == "cpu" and threads is None:
            _warn_if_busy(_external_world() if _external() else devices)
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


def _check_layout(config, devices: int | None, threads: int | None, data_parallel: int = 1) -> int:
    """Processes and threads against the sampler and the data-parallel groups, on every rank alike (under a
    launcher too); returns the processes to start (--devices, or what the groups need when it is left out)."""
    if devices is not None and devices < 1:
        raise UsageError(f"devices must be at least 1, got {devices}; use --devices 1 or more")
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}; use --threads 1 or more")
    if data_parallel < 1:
        raise UsageError(f"--data-parallel must be at least 1, got {data_parallel}; use --data-parallel 1 or more")
    if data_parallel > 1:
        from asyncvid.runtime.layout import RankLayout  # no torch: checked at once

        layout = RankLayout.of(config, data_parallel, _external_world() if _external() else devices)
        world = _external_world() if _external() else (devices or layout.world_size)
        layout.check_world_size(world, launched=_external())
        return world
    devices = 1 if devices is None else devices
    if config is None and devices > 1 and not _external():
        raise UsageError(f"--devices {devices} needs a parallel sampler or groups; add --sampler asyncdiff, or "
                         f"--data-parallel {devices} for {devices} videos at once, or drop --devices")
    if config is None and _external() and _external_world() > 1:
        raise UsageError(
            f"sequential sampling runs in one process, but the launcher started {_external_world()}; "
            f"add --sampler asyncdiff (stages + stride - 1 = {_external_world()}), or --data-parallel "
            f"{_external_world()} for {_external_world()} videos at once, or launch one process"
        )
    if isinstance(config, AsyncDiffConfig):
        config.check_world_size(_external_world() if _external() else devices, launched=_external())
    elif config is not None:
        config.check_world_size(_external_world() if _external() else devices)
    return devices


def _check_auto(config, devices: int | None, threads: int | None, data_parallel: int) -> None:
    """--parallel auto chooses the sampler and the groups itself, in one process that sees the devices."""
    if config is not None:
        name = "asyncdiff" if isinstance(config, AsyncDiffConfig) else "parataa"
        raise UsageError(f"--parallel auto chooses the sampler itself, got --sampler {name}; drop one of them")
    if _external():
        raise UsageError("--parallel auto chooses how many processes to start, but a launcher has started them; "
                         "pass --sampler and --data-parallel yourself (`asyncvid plan --parallel auto` suggests them)")
    if data_parallel != 1:
        raise UsageError(f"--parallel auto chooses --data-parallel itself, got --data-parallel {data_parallel}; "
                         f"drop one of them")
    if devices is not None and devices < 1:
        raise UsageError(f"devices must be at least 1, got {devices}; use --devices 1 or more")
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}; use --threads 1 or more")


def _start_method(device, computed: bool) -> str | None:
    """Fork the local workers where that is safe, so that they start in under a second instead of importing torch
    and diffusers again for ~4 s each (on 8 prompts of the embedded model that is the difference between 1.1x
    and 1.3x for two data-parallel groups): on the CPU, on Linux, and only while this process has run no tensor
    work (the checks read files and headers, and plans use fake tensors; --parallel auto's timing does run some,
    and a fork after OpenMP has started its threads leaves a child that hangs in its first parallel op). Else None:
    launch.start_context's fork server, which has run no tensor work and holds no CUDA state, where it can."""
    import multiprocessing

    fork = device.type == "cpu" and not computed and "fork" in multiprocessing.get_all_start_methods()
    return "fork" if fork and sys.platform == "linux" else None


def check_out_dir(out: Path) -> None:
    """`out` is, or can become, a writable folder; nothing is created (that waits for the first video)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out '{out}' is a file, not a folder; pass --out with a folder (created if missing)")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out '{out}' cannot be created: '{existing}' is a file; pass --out with another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"output folder '{existing}' is not writable (permission denied); pass --out with a "
                         f"writable folder")


def _warn_if_busy(processes: int) -> None:
    """The default threads share every core among the processes; if other work already holds some, each process
    waits for its threads (on a 2-core machine one busy core made a video 14x slower). Say so once, to a person:
    choosing fewer threads silently would change the output's rounding, so the choice stays the user's."""
    if not sys.stderr.isatty():
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0]
    free = max(1, cores - math.ceil(busy - 0.25))  # the cores others leave idle
    if busy >= 1.0 and free < cores:
        typer.echo(f"warning: other work keeps about {busy:.1f} of this machine's {cores} cores busy (load average); "
                   f"{cores // max(processes, 1)} threads per process may run much slower: try --threads "
                   f"{max(1, free // max(processes, 1))}", err=True)


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
