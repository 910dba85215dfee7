"""The library API for scripts and notebooks: load a model once, then make videos with diffusers' argument names.

With `devices` > 1 the model loads on worker processes (asyncvid.runtime.pool) that stay alive until `close()`, the end
of a `with` block, or interpreter exit; with one device and sequential sampling it loads in this process. With
`data_parallel` D the workers form D groups, each making whole videos: pass a list of prompts (or images) to make
D videos at once; the videos come back in the list's order.
"""

from __future__ import annotations

import os
import sys
import tempfile
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from PIL import Image

from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.errors import UsageError
from asyncvid.models.devices import resolve_device, resolve_dtype
from asyncvid.models.sampling_defaults import Recommended
from asyncvid.parataa.config import ParaTAAConfig
from asyncvid.pipelines import preflight, recommended_sampling
from asyncvid.requests import ImageToVideo, TextToVideo
from asyncvid.runtime import launch
from asyncvid.runtime.layout import RankLayout
from asyncvid.runtime.loaders import ModelSpec, check_plan, load_sampler, runs_in_process
from asyncvid.runtime.pool import WorkerPool
from asyncvid.video.frames import Video
from asyncvid.video.images import load_image

SAMPLERS = (AsyncDiffConfig, ParaTAAConfig)  # config types a `sampler` may be, besides None (sequential)


def load(model: str | Callable, *, devices: int | None = None, sampler: AsyncDiffConfig | None = None, device: str | None = None,
         dtype: str | None = None, motion_adapter: str | None = None, scheduler: str | None = None,
         threads: int | None = None, oversubscribe: bool = False, num_frames: int | None = None,
         height: int | None = None, width: int | None = None, quiet: bool = True,
         data_parallel: int = 1, variant: str | None = None) -> VideoPipeline:
    """Load `model` (an embedded name, a diffusers folder or a cached hub id) for sampling with `sampler` on
    `devices` processes in all (default: 1, or what `data_parallel` groups of the sampler need). `num_frames`,
    `height` and `width` are the sizes a stage-parallel sampler balances its split for (default: the model's); any
    size can be asked for afterwards. `variant` picks a form of the weights (e.g. "fp16": `*.fp16.safetensors`;
    default: the plain files, or the one variant the folder has).

    `model` may also be a function that builds the pipeline (an AnimateDiffPipeline or StableVideoDiffusionPipeline,
    with your scheduler, fused LoRAs, ...), called once in each worker: define it at the top level of a module the
    workers can import (a .py file beside the notebook), since workers are spawned processes and receive it by name.
    """
    return VideoPipeline(model, devices=devices, sampler=sampler, device=device, dtype=dtype,
                         motion_adapter=motion_adapter, scheduler=scheduler, threads=threads,
                         oversubscribe=oversubscribe, plan_shape=(num_frames, height, width), quiet=quiet,
                         data_parallel=data_parallel, variant=variant)


class VideoPipeline:
    """A loaded model: `text_to_video` / `image_to_video` return a Video; `close()` ends its worker processes."""

    def __init__(self, model: str | Callable, *, devices: int | None, sampler, device, dtype, motion_adapter, scheduler,
                 threads, oversubscribe, plan_shape, quiet, data_parallel: int = 1, variant: str | None = None):
        self.layout = _check_layout(devices, sampler, threads, data_parallel)
        devices = self.layout.world_size
        torch_device = resolve_device(device)
        resolve_dtype(dtype, torch_device)  # fail here, not on every worker
        self.spec = ModelSpec(model, sampler, motion_adapter, device, dtype, scheduler, plan_shape, quiet,
                              variant=variant)
        self.devices, self.threads, self._device = devices, threads, torch_device
        self._pool = self._loaded = None
        in_process = runs_in_process(sampler, devices) and self.layout.data_parallel == 1
        if callable(model):
            _check_build_fn(model, in_process)
        else:
            # A bad model, scheduler or split fails here in one line, before any worker starts (as in the CLI), and
            # what is decided for the user (a variant, a component left out) is said once.
            preflight(model, None, [], motion_adapter=motion_adapter, scheduler=scheduler, variant=variant)
        if in_process:
            with launch.cpu_threads(threads, torch_device):
                self._loaded = load_sampler(None, self.spec)
        else:
            if isinstance(sampler, AsyncDiffConfig) and sampler.split and not callable(model):
                frames, height, width = plan_shape
                check_plan(model, sampler, SimpleNamespace(num_frames=frames, height=height, width=width),
                           motion_adapter, variant)
            self._pool = WorkerPool(self.spec, devices, torch_device, threads=threads, oversubscribe=oversubscribe,
                                    layout=self.layout)
        self._images = tempfile.TemporaryDirectory(prefix="asyncvid-images-")  # PIL inputs, as files for workers

    @property
    def task(self) -> str:
        """"text-to-video" or "image-to-video"."""
        return self._pool.task if self._pool is not None else self._loaded.task

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the workers (empty when the model runs in this process)."""
        return self._pool.pids if self._pool is not None else []

    @cached_property
    def _recommended(self) -> Recommended:
        """The model's recommended sampling settings, read once (its folder's sampling.json; else diffusers')."""
        return Recommended() if callable(self.spec.model) else recommended_sampling(self.spec.model)

    def text_to_video(self, prompt: str | list[str], *, negative_prompt: str = "", num_frames: int | None = None,
                      height: int | None = None, width: int | None = None, num_inference_steps: int = 25,
                      guidance_scale: float | None = None, seed: int | None = None,
                      generator: torch.Generator | None = None, fps: int = 8,
                      shared_noise: float | None = None, noise_mean: float | None = None,
                      shared_grid: int | None = None) -> Video | list[Video]:
        """A video of `prompt` (AnimateDiff), or one per prompt of a list (made by the data-parallel groups at
        once, returned in order); `None` sizes and frames mean the model's defaults, `None` guidance, shared noise,
        noise mean and shared grid the model's recommended ones (its folder's sampling.json; else 7.5 and
        independent noise)."""
        own = self._recommended
        requests = [TextToVideo(p, negative_prompt=negative_prompt, num_frames=num_frames, height=height,
                                width=width, num_inference_steps=num_inference_steps,
                                guidance_scale=own.guidance_scale if guidance_scale is None else guidance_scale,
                                shared_noise=own.shared_noise if shared_noise is None else shared_noise,
                                noise_mean=own.noise_mean if noise_mean is None else noise_mean,
                                shared_grid=own.shared_grid if shared_grid is None else shared_grid,
                                seed=_seed(seed, generator), fps=fps) for p in _listed(prompt)]
        return self._generate(requests) if isinstance(prompt, list) else self._generate(requests)[0]

    def image_to_video(self, image, *, num_frames: int | None = None, height: int | None = None,
                       width: int | None = None, num_inference_steps: int = 25, min_guidance_scale: float = 1.0,
                       max_guidance_scale: float | None = None, motion_bucket_id: int = 127,
                       noise_aug_strength: float = 0.02, decode_chunk_size: int | None = None, seed: int | None = None,
                       generator: torch.Generator | None = None, fps: int = 7, shared_noise: float | None = None,
                       noise_mean: float | None = None) -> Video | list[Video]:
        """A video that starts from `image` (a path or a PIL image; Stable Video Diffusion), or one per image of a
        list (made by the data-parallel groups at once, returned in order); guidance at the last frame, shared noise
        and noise mean left `None` take the model's recommended ones (its folder's sampling.json; else SVD's 3 and
        independent noise)."""
        own = self._recommended
        max_guidance_scale = own.max_guidance_scale if max_guidance_scale is None else max_guidance_scale
        requests = [ImageToVideo(self._image_path(i), num_frames=num_frames, height=height, width=width,
                                 num_inference_steps=num_inference_steps, min_guidance_scale=min_guidance_scale,
                                 max_guidance_scale=max_guidance_scale, motion_bucket_id=motion_bucket_id,
                                 noise_aug_strength=noise_aug_strength, decode_chunk_size=decode_chunk_size,
                                 seed=_seed(seed, generator), fps=fps,
                                 shared_noise=own.shared_noise if shared_noise is None else shared_noise,
                                 noise_mean=own.noise_mean if noise_mean is None else noise_mean)
                    for i in _listed(image)]
        return self._generate(requests) if isinstance(image, list) else self._generate(requests)[0]

    def close(self) -> None:
        """End the worker processes (if any) and free the model; safe to call more than once."""
        if self._pool is not None:
            self._pool.close()
        self._loaded = None
        self._images.cleanup()

    def __enter__(self) -> VideoPipeline:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None and exc[0] is not None and not issubclass(exc[0], Exception):
            self._pool.kill()  # an interrupt: do not wait for the workers
        self.close()

    def __repr__(self) -> str:
        sampler = self.spec.sampler.describe()["name"] if self.spec.sampler is not None else "sequential"
        state = "closed" if self._closed else ("workers " + ", ".join(map(str, self.worker_pids)) if self._pool
                                               else "in this process")
        return f"VideoPipeline(model={self.spec.label!r}, sampler={sampler}, devices={self.devices}, {state})"

    @property
    def _closed(self) -> bool:
        return self._pool.closed if self._pool is not None else self._loaded is None

    def _generate(self, requests: list) -> list[Video]:
        if self._closed:
            raise RuntimeError("this pipeline is closed (or was interrupted); call asyncvid.load again")
        if requests and requests[0].describe()["task"] != self.task:
            method = "text_to_video" if self.task == "text-to-video" else "image_to_video"
            raise UsageError(f"model '{self.spec.label}' does {self.task}; call {method} instead")
        if self._pool is None:
            with launch.cpu_threads(self.threads, self._device):
                return [self._loaded.generate(request) for request in requests]
        videos = [None] * len(requests)
        errors = []
        for index, group, result in self._pool.imap(requests):
            if isinstance(result, Exception):
                errors.append((index, result))
                continue
            if self.layout.data_parallel > 1:
                result.metadata["layout"] = self.layout.describe(group)
            videos[index] = result
        if errors:
            index, first = min(errors, key=lambda e: e[0])
            if len(requests) == 1:
                raise first
            raise BatchFailed(f"{len(errors)} of {len(requests)} videos failed (the first, #{index}: {first}); "
                              f"the others are in this error's .videos", videos) from first
        return videos

    def _image_path(self, image) -> Path:
        if isinstance(image, Image.Image):  # the workers read files: hand them a lossless copy
            path = Path(self._images.name) / f"image-{len(os.listdir(self._images.name))}.png"
            image.convert("RGB").save(path, format="PNG")
            return path
        if not isinstance(image, (str, os.PathLike)):
            raise TypeError(f"image must be a path or a PIL image, got {type(image).__name__}")
        load_image(Path(image))  # a missing or unreadable file fails here, with the file's name
        return Path(image).resolve()


class BatchFailed(RuntimeError):
    """Some videos of a list failed; `.videos` holds the others in order (None where one failed)."""

    def __init__(self, message: str, videos: list):
        super().__init__(message)
        self.videos = videos


def _listed(value) -> list:
    if isinstance(value, list):
        if not value:
            raise UsageError("the list is empty; pass at least one prompt or image")
        return value
    return [value]


def _check_layout(devices, sampler, threads, data_parallel: int = 1) -> RankLayout:
    """The rank layout the arguments describe; bad values fail here, before any worker starts."""
    if isinstance(data_parallel, bool) or not isinstance(data_parallel, int) or data_parallel < 1:
        raise UsageError(f"data_parallel must be a whole number >= 1, got {data_parallel!r}")
    if devices is not None and (isinstance(devices, bool) or not isinstance(devices, int) or devices < 1):
        raise UsageError(f"devices must be a whole number >= 1, got {devices!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UsageError(f"threads must be a whole number >= 1 or None, got {threads!r}")
    if sampler is not None and not isinstance(sampler, SAMPLERS):
        raise TypeError(f"sampler must be None (sequential) or one of {', '.join(s.__name__ for s in SAMPLERS)}, "
                        f"got {type(sampler).__name__}")
    if data_parallel > 1:
        layout = RankLayout.of(sampler, data_parallel, devices)
        layout.check_world_size(devices or layout.world_size)
        return layout
    devices = 1 if devices is None else devices
    if sampler is None and devices > 1:
        raise UsageError(f"devices={devices} needs a parallel sampler; pass sampler=AsyncDiffConfig(stages={devices})")
    if sampler is not None:
        sampler.check_world_size(devices)
    return RankLayout(1, devices)


def _check_build_fn(fn: Callable, in_process: bool) -> None:
    """Workers receive a build function by name: it must be a top-level function of a module they can import."""
    if in_process:
        return
    name = getattr(fn, "__qualname__", type(fn).__name__)
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    notebook = module is not None and module.__name__ == "__main__" and not hasattr(module, "__file__")
    if "<" in name or module is None or getattr(module, name, None) is not fn or notebook:
        raise UsageError(f"build function {name!r} cannot reach the worker processes: define it at the top level of "
                         f"a .py file and import it from there (workers are spawned and import it by name; a "
                         f"lambda, a nested function or a notebook cell's function cannot be)")


def _seed(seed: int | None, generator: torch.Generator | None) -> int:
    """The seed to sample with: `seed`, or the one an unused `generator` was seeded with (default 0)."""
    if seed is not None and generator is not None:
        raise UsageError("pass seed or generator, not both")
    if generator is None:
        return 0 if seed is None else seed
    initial = generator.initial_seed()
    fresh = torch.Generator(generator.device).manual_seed(initial)
    if not torch.equal(fresh.get_state(), generator.get_state()):
        raise UsageError(f"generator has been used since it was seeded with {initial}; pass seed={initial} or a "
                         f"fresh torch.Generator().manual_seed(n) (the noise is drawn on the CPU from the seed)")
    return initial
