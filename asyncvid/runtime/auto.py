"""--parallel auto: the layout (data-parallel groups x AsyncDiff stages, and CPU threads) that finishes a batch soonest.

The cost model: a video's denoising loop takes `warm-up x (sum of unit times) + (steps - warm-up) x (the slowest
stage's time)` (AsyncDiff's rounds after warm-up; one stage: every step whole), a batch ceil(videos / groups) videos'
time. Unit times are measured here (cached, asyncvid.asyncdiff.cost_cache); on the CPU at 1 thread and at every
core, and scaled between as a power of the threads. Transfers between stages, decoding and encoding are left out:
they are the same for every layout or small beside the UNet (docs/BENCHMARKS.md compares the prediction with runs).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.asyncdiff.cost_cache import cache_dir
from asyncvid.asyncdiff.plan import make_plan
from asyncvid.asyncdiff.timing import measure_unit_costs
from asyncvid.errors import UsageError
from asyncvid.models.devices import resolve_dtype
from asyncvid.pipelines import adapter_for, latent_shape, resolve_model, resolve_motion_adapter, units_for
from asyncvid.runtime import launch

MAX_STAGES = 4  # AsyncDiff's speedup flattens past 4 stages (Chen et al. 2024, table 3)


@dataclass(frozen=True)
class Choice:
    """One layout: `data_parallel` groups of `stages` ranks (1: sequential), `threads` per process on the CPU."""

    data_parallel: int
    stages: int
    threads: int | None
    warmup: int
    video_s: float  # predicted denoising loop of one video
    batch_s: float  # predicted for the batch
    measured_here: bool = False  # unit times were measured in this process (not all read from the cache)

    @property
    def processes(self) -> int:
        return self.data_parallel * self.stages

    @property
    def sampler(self) -> AsyncDiffConfig | None:
        return None if self.stages == 1 else AsyncDiffConfig(stages=self.stages, warmup=self.warmup)

    def name(self) -> str:
        sampler = "sequential" if self.stages == 1 else f"asyncdiff {self.stages} stages"
        threads = "" if self.threads is None else f", {self.threads} thread{'s' * (self.threads > 1)} per process"
        return f"data-parallel {self.data_parallel} x {sampler}{threads}"

    def describe(self, videos: int) -> str:
        return (f"{self.name()}: predicted {self.video_s:.1f} s per video, {self.batch_s:.1f} s for {videos} "
                f"video{'s' * (videos != 1)} (denoising loops)")


def loop_seconds(unit_s: list[float], stages: int, steps: int, warmup: int) -> float:
    """One video's denoising loop on `stages` AsyncDiff stages balanced on `unit_s` (1: sequential)."""
    whole = sum(unit_s)
    if stages == 1:
        return steps * whole
    slowest = max(make_plan([str(i) for i in range(len(unit_s))], unit_s, stages).stage_costs())
    warm = min(warmup, steps)
    return warm * whole + (steps - warm) * slowest


def candidates(unit_s_at, devices: int, videos: int, steps: int, warmup: int, cpu: bool) -> list[Choice]:
    """Every layout on `devices` (on the CPU, cores: fewer processes get more threads each), fastest batch first;
    ties go to the lower latency per video. `unit_s_at(threads)` gives the unit times at a thread count."""
    choices = []
    for stages in range(1, min(MAX_STAGES, devices) + 1):
        groups = range(1, devices // stages + 1) if cpu else [devices // stages]
        for data_parallel in groups:
            threads = devices // (data_parallel * stages) if cpu else None
            video = loop_seconds(unit_s_at(threads or 1), stages, steps, warmup)
            choices.append(Choice(data_parallel, stages, threads, warmup, video,
                                  math.ceil(videos / data_parallel) * video))
    return sorted(choices, key=lambda c: (round(c.batch_s, 9), c.video_s, c.processes))


def choose(model: str, requests: list, *, devices: int | None, device: torch.device, dtype: str | None = None,
           motion_adapter: str | None = None, warmup: int = 3, variant: str | None = None) -> Choice:
    """The layout that finishes `requests` soonest on `devices` (default: the GPUs, or the CPU cores, here)."""
    return table(model, requests, devices=devices, device=device, dtype=dtype, motion_adapter=motion_adapter,
                 warmup=warmup, variant=variant)[0]


def table(model: str, requests: list, *, devices: int | None, device: torch.device, dtype: str | None = None,
          motion_adapter: str | None = None, warmup: int = 3, variant: str | None = None) -> list[Choice]:
    """Every layout's prediction for `requests`, best first (what `asyncvid plan --parallel auto` prints)."""
    cpu = device.type == "cpu"
    devices = devices or (launch.threads_per_process(1) if cpu else torch.cuda.device_count())
    if cpu and devices > launch.threads_per_process(1):
        raise UsageError(f"--devices {devices} exceeds the {launch.threads_per_process(1)} CPU cores here; on the "
                         f"CPU a device is a core: use --devices {launch.threads_per_process(1)} or fewer")
    first = requests[0]
    cached = set(cache_dir().glob("*.json"))
    unit_s_at = _unit_times(model, motion_adapter, variant, device, resolve_dtype(dtype, device), cpu, devices,
                            (first.num_frames, first.height, first.width))
    # Timed here (not all from the cache): an unwritable cache times on every run without a trace.
    writable = os.access(next(p for p in (cache_dir(), *cache_dir().parents) if p.exists()), os.W_OK)
    measured = set(cache_dir().glob("*.json")) != cached or not writable
    return [dataclasses.replace(c, measured_here=measured)
            for c in candidates(unit_s_at, devices, len(requests), first.num_inference_steps, warmup, cpu)]


def _unit_times(model, motion_adapter, variant, device, dtype, cpu: bool, cores: int, sizes: tuple):
    """unit_s_at(threads): measured at 1 thread and at `cores` on the CPU (power law between), once on a GPU."""
    folder = resolve_model(model, variant=variant)
    motion = resolve_motion_adapter(motion_adapter) if motion_adapter else None
    unet = adapter_for(folder).unet_skeleton(folder, motion)
    shape = latent_shape(folder, *sizes)
    family = units_for(unet)

    def measure(threads: int) -> list[float]:
        with launch.cpu_threads(threads if cpu else None, device):
            return measure_unit_costs(unet, family, shape, device, dtype)

    one = measure(1)
    if not cpu or cores == 1:
        return lambda threads: one
    every = measure(cores)
    # Threads speed a unit up as threads ** exponent; fitted on the whole UNet, applied to each unit alike.
    exponent = math.log(sum(one) / sum(every)) / math.log(cores)
    return lambda threads: [t * threads ** -exponent for t in one]
