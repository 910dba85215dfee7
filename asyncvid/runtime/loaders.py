"""Loading a sampler once per rank, then sampling any number of requests with it.

`LOADERS` is the registry: each sampler's config type names the function that loads it on a rank. The CLI, the
notebook API (asyncvid.api), the worker pool, the tests and the benchmark all go through `load_sampler` and
`Loaded.sample` / `Loaded.generate`.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

import diffusers
import transformers

from asyncvid.asyncdiff.attach import attach
from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.asyncdiff.setup import describe_split, flops_plan, setup_asyncdiff
from asyncvid.errors import UsageError
from asyncvid.models.devices import resolve_device, resolve_dtype
from asyncvid.models.lora import Lora, fuse
from asyncvid.models.schedulers import set_scheduler
from asyncvid.parataa.config import ParaTAAConfig
from asyncvid.parataa.run import report
from asyncvid.parataa.run import sample as parataa_sample
from asyncvid.parataa.solver import Round
from asyncvid.pipelines import (
    adapter_for,
    adapter_of,
    latent_shape,
    load_pipeline,
    resolve_model,
    resolve_motion_adapter,
    units_for,
)
from asyncvid.runtime.generate import Sampled, StepCallback, decode, sample
from asyncvid.runtime.launch import Rank
from asyncvid.runtime.parallel_decode import parallel_decode
from asyncvid.video.frames import Video, to_uint8
from asyncvid.video.resume import settings_of


@dataclass(frozen=True)
class ModelSpec:
    """What every rank loads: the model, the sampler and the precision (picklable: it travels to the workers)."""

    model: str | Callable  # a name or folder, or a top-level function that builds the pipeline (asyncvid.load)
    sampler: AsyncDiffConfig | ParaTAAConfig | None = None  # None: sequential sampling
    motion_adapter: str | None = None
    device: str | None = None
    dtype: str | None = None
    scheduler: str | None = None  # None: the pipeline's own; else a name from asyncvid.models.schedulers
    # Sizes the stage split is balanced for (None: the model's); any size can be sampled afterwards.
    plan_shape: tuple[int | None, int | None, int | None] = (None, None, None)  # frames, height, width
    quiet: bool = True  # hide library warnings and loading bars
    allow_pickle: bool = False  # load pickle weights too (they can run code); whole-pipeline samplers only
    variant: str | None = None  # the form of the weights (e.g. "fp16"); None: the plain files, else the one there is
    loras: tuple[Lora, ...] = ()  # fused into the weights in this order (asyncvid.models.lora)

    def describe(self) -> dict:
        """The settings that decide the output (with the request's own): recorded in sidecars, compared on resume."""
        sampler = self.sampler.describe() if self.sampler is not None else {"name": "sequential"}
        settings = {"model": self.label, "motion_adapter": self.motion_adapter, "sampler": sampler,
                    "scheduler": self.scheduler, "dtype": self.dtype}
        if self.variant:  # older sidecars have neither
            settings["variant"] = self.variant
        if self.loras:
            settings["loras"] = [lora.describe() for lora in self.loras]
        return settings

    @property
    def label(self) -> str:
        """The model as a user names it: its name or folder, or `module.function` of a build function."""
        return self.model if isinstance(self.model, str) else f"{self.model.__module__}.{self.model.__qualname__}"


@dataclass
class Loaded:
    """A pipeline loaded on one rank, ready to sample any number of requests."""

    pipe: object
    adapter: object
    spec: ModelSpec
    metadata: dict  # what every video from it records: model folder, device, dtype, sampler
    decoder: Callable | None = None  # parallel decoding: returns None on ranks other than 0
    hook: object | None = None  # the sampler's UNet hook, for its per-call statistics
    weight_share: float = 1.0  # of the UNet's parameters held on this rank
    # A sampler with its own loop: run(loaded, request, on_step) -> Sampled, instead of the pipeline's loop.
    run: Callable | None = None

    @property
    def task(self) -> str:
        return self.adapter.TASK

    def sample(self, request, on_step: StepCallback | None = None) -> Sampled:
        """Latents, frames (None on ranks that do not gather them) and timings of one request."""
        if request.describe()["task"] != self.task:
            raise UsageError(f"model '{self.spec.label}' does {self.task}, not {request.describe()['task']}; "
                             f"use {'text_to_video' if self.task == 'text-to-video' else 'image_to_video'}")
        if self.run is not None:
            return self.run(self, request, on_step)
        return sample(self.pipe, self.adapter, request, on_step=on_step, decoder=self.decoder)

    def generate(self, request, on_step: StepCallback | None = None) -> Video | None:
        """One video with its sidecar metadata (None on ranks that do not gather the frames)."""
        sampled = self.sample(request, on_step)
        metadata = {**self.metadata, "settings": settings_of(request, self.spec)}
        if self.hook is not None:
            metadata["sampler"] = {**metadata["sampler"], "bytes_sent_rank0": self.hook.state.bytes_sent}
        return sampled.video(request, metadata)


def runs_in_process(sampler, devices: int) -> bool:
    """One device and no process group needed: sample in the calling process (AsyncDiff always needs a group)."""
    return devices == 1 and not isinstance(sampler, AsyncDiffConfig)


def load_sampler(rank: Rank | None, spec: ModelSpec) -> Loaded:
    """Load `spec` on this rank (None: in this process, no process group) with its sampler's loader."""
    if spec.quiet:
        quiet_libraries()
    loader = LOADERS.get(type(spec.sampler))
    if loader is None:
        raise TypeError(f"sampler must be None (sequential), an AsyncDiffConfig or a ParaTAAConfig, "
                        f"got {type(spec.sampler).__name__}")
    return loader(rank, spec)


def load_sequential(rank: Rank | None, spec: ModelSpec) -> Loaded:
    """The whole pipeline, sampling with its own loop."""
    pipe, adapter, folder, device, dtype = _whole_pipeline(rank, spec)
    return Loaded(pipe, adapter, spec, _metadata(spec, folder, device, dtype, {"name": "sequential"}))


def _whole_pipeline(rank: Rank | None, spec: ModelSpec):
    """(pipeline, adapter, folder, device, dtype): every weight on this rank's device (or this process's)."""
    device = rank.device if rank is not None else resolve_device(spec.device)
    if callable(spec.model):
        return _built_pipeline(spec, device)
    dtype = resolve_dtype(spec.dtype, device)
    pipe, adapter, folder = load_pipeline(spec.model, device=device, dtype=dtype, motion_adapter=spec.motion_adapter,
                                          allow_pickle=spec.allow_pickle, variant=spec.variant)
    fuse(pipe, spec.loras)
    set_scheduler(pipe, spec.scheduler)
    return pipe, adapter, folder, device, dtype


def _built_pipeline(spec: ModelSpec, device):
    """The pipeline `spec.model()` builds, on `device` (in `spec.dtype` when given, else as built)."""
    pipe = spec.model()
    adapter = adapter_of(pipe)
    if spec.dtype:
        pipe.to(device=device, dtype=resolve_dtype(spec.dtype, device))
    else:
        pipe.to(device=device)
    pipe.set_progress_bar_config(disable=True)
    fuse(pipe, spec.loras)
    set_scheduler(pipe, spec.scheduler)
    return pipe, adapter, f"built by {spec.label}", device, pipe.unet.dtype


def load_asyncdiff(rank: Rank | None, spec: ModelSpec) -> Loaded:
    """This rank's stage of the UNet (its weights only) behind the AsyncDiff hook, in the pipeline's own loop."""
    if rank is None:
        raise UsageError("AsyncDiff runs in a process group; use asyncvid.load(..., devices=N) or the CLI")
    if callable(spec.model):
        return _attach_to_built(rank, spec)
    dtype = resolve_dtype(spec.dtype, rank.device)
    folder = resolve_model(spec.model, variant=spec.variant)
    adapter = adapter_for(folder)
    frames, height, width = spec.plan_shape
    motion = resolve_motion_adapter(spec.motion_adapter) if spec.motion_adapter else None
    staged = setup_asyncdiff(folder, adapter, units_for, spec.sampler,
                             shape=latent_shape(folder, frames, height, width), device=rank.device,
                             dtype=dtype, motion_adapter=motion, settings={**spec.describe(), "shape": spec.plan_shape},
                             group=rank.group, scheduler=spec.scheduler, variant=spec.variant, loras=spec.loras)
    sampler = {**spec.sampler.describe(), "devices": rank.world_size, "plan": staged.plan.as_lists()}
    return Loaded(staged.pipe, adapter, spec, _metadata(spec, folder, rank.device, dtype, sampler),
                  decoder=functools.partial(parallel_decode, group=rank.group), hook=staged.hook,
                  weight_share=staged.weight_share)


def _attach_to_built(rank: Rank, spec: ModelSpec) -> Loaded:
    """A pipeline the user's function builds, whole on every rank, then split (asyncvid.parallelize's way)."""
    pipe, adapter, folder, device, dtype = _built_pipeline(spec, rank.device)
    frames, height, width = spec.plan_shape
    shape = {"frames": frames, "height": height, "width": width, "scale": pipe.vae_scale_factor}
    attached = attach(pipe, units_for(pipe.unet), spec.sampler, shape=shape, group=rank.group,
                      settings=spec.describe())
    sampler = {**spec.sampler.describe(), "devices": rank.world_size, "plan": attached.plan.as_lists()}
    return Loaded(pipe, adapter, spec, _metadata(spec, folder, device, dtype, sampler),
                  decoder=functools.partial(parallel_decode, group=rank.group), hook=attached.hook,
                  weight_share=attached.weight_share)


def load_parataa(rank: Rank | None, spec: ModelSpec) -> Loaded:
    """The whole pipeline on every rank; each ParaTAA round's batch is split across the ranks."""
    pipe, adapter, folder, device, dtype = _whole_pipeline(rank, spec)
    world = rank.world_size if rank is not None else 1
    sampler = {**spec.sampler.describe(), "devices": world}
    return Loaded(pipe, adapter, spec, _metadata(spec, folder, device, dtype, sampler),
                  decoder=functools.partial(parallel_decode, group=rank.group) if world > 1 else None,
                  run=functools.partial(_solve, rank))


def _solve(rank: Rank | None, loaded: Loaded, request, on_step: StepCallback | None = None) -> Sampled:
    """One request by ParaTAA; the progress counts final steps, and the record holds every round."""
    steps, rounds = request.num_inference_steps, []

    def on_round(r: Round) -> None:
        rounds.append(r)
        if on_step is not None:
            moved = f", sample moved {r.change:.2g}" if math.isfinite(r.change) else ""
            on_step(r.final, steps, f"round {len(rounds)}, residual {r.residual:.2g}{moved}")

    start = time.perf_counter()
    latents, solution, branches = parataa_sample(loaded.pipe, loaded.adapter, request, loaded.spec.sampler,
                                                 rank=rank, group=rank.group if rank is not None else None,
                                                 on_round=on_round)
    loop_end = time.perf_counter()
    frames = decode(loaded.pipe, loaded.adapter, latents, request, loaded.decoder)
    end = time.perf_counter()
    if frames is not None and not solution.converged:
        print(f"warning: ParaTAA stopped after {len(solution.rounds)} rounds with {solution.rounds[-1].final} of "
              f"{steps} steps final; raise --max-rounds or --tol", file=sys.stderr)
    return Sampled(latents, None if frames is None else to_uint8(frames), loop_end - start, end - loop_end,
                   {"parataa": report(solution, steps, branches)})


# The registry: a sampler's config type -> how a rank loads it.
LOADERS: dict[type, Callable[[Rank | None, ModelSpec], Loaded]] = {
    type(None): load_sequential,
    AsyncDiffConfig: load_asyncdiff,
    ParaTAAConfig: load_parataa,
}


def _metadata(spec: ModelSpec, folder, device, dtype, sampler: dict) -> dict:
    return {"model": spec.label, "model_folder": str(folder), "device": str(device),
            "dtype": str(dtype).removeprefix("torch."), "sampler": sampler, "scheduler": spec.scheduler or "pipeline"}


def quiet_libraries() -> None:
    """Hide diffusers/transformers warnings and loading bars (workers start with default logging). Leaves
    os.environ alone: a changed environment makes later launches spawn their ranks instead of forking them."""
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def describe_plan(model: str, stages: int, *, frames=None, height=None, width=None, cost="flops", weight_cap=1.0,
                  split=None, motion_adapter=None, device=None, dtype: str | None = None,
                  variant: str | None = None) -> str:
    """The printable plan of `model` split into `stages` (what `asyncvid plan` shows); loads no weights. Measured
    costs are timed on `device` in `dtype` (default: the dtype a run there uses), as a run's own planning does."""
    config = AsyncDiffConfig(stages=stages, cost=cost, weight_cap=weight_cap, split=split)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    folder = resolve_model(model, variant=variant)
    motion = resolve_motion_adapter(motion_adapter) if motion_adapter else None
    return describe_split(model, folder, adapter_for(folder), units_for, config, motion_adapter=motion,
                          shape=latent_shape(folder, frames, height, width), device=torch_device,
                          dtype=torch_dtype)


def check_plan(model: str, config: AsyncDiffConfig, request, motion_adapter: str | None = None,
               variant: str | None = None) -> None:
    """Plan `model`'s split as every rank will (by FLOPs, on the UNet's empty skeleton), so a stage count or manual
    split it cannot take fails in one process before any worker starts (a base model plus adapter too: its skeleton
    is assembled from the configs)."""
    folder = resolve_model(model, variant=variant)
    motion = resolve_motion_adapter(motion_adapter) if motion_adapter else None
    unet = adapter_for(folder).unet_skeleton(folder, motion)
    shape = latent_shape(folder, request.num_frames, request.height, request.width)
    flops_plan(unet, units_for(unet), config, shape)
