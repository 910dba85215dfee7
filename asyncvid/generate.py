"""One video from a loaded pipeline: seed the generator, run the adapter, time the phases, wrap the frames."""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version
from typing import Callable

import numpy as np
import torch

from .video import Video

StepCallback = Callable[..., None]  # (steps done, steps total[, note: what the sampler is doing, e.g. its round])


def package_versions() -> dict[str, str]:
    """Versions that decide the output bits, recorded in every sidecar."""
    found = {}
    for name in ("asyncvid", "torch", "diffusers", "transformers", "av"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "unknown"
    return found


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] to uint8 with rounding (what every writer stores)."""
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def reset_sampler_state(pipe) -> None:
    """Per-call state of samplers hooked into the UNet starts fresh (the pipelines do not reset hooks)."""
    registry = getattr(pipe.unet, "_diffusers_hook", None)
    if registry is not None:
        registry.reset_stateful_hooks()


def generate(pipe, adapter, request, *, on_step: StepCallback | None = None, metadata: dict | None = None,
             decoder: Callable | None = None) -> Video | None:
    """Sample one video with the pipeline's own loop; the sidecar metadata records settings and timings.

    With `decoder(pipe, adapter, latents, request)`, the loop returns latents and the decoder makes the frames
    (parallel decoding); ranks on which it returns None get None.
    """
    adapter.check(pipe, request)
    reset_sampler_state(pipe)
    # A CPU generator gives the same noise on every device, so CPU and GPU runs start from the same latents.
    generator = torch.Generator("cpu").manual_seed(request.seed)
    marks: list[float] = []

    def callback(pipeline, step, timestep, tensors):
        marks.append(time.perf_counter())
        if on_step is not None:
            on_step(step + 1, request.num_inference_steps)
        return tensors

    start = time.perf_counter()
    with torch.inference_mode():
        if decoder is None:
            frames = adapter.call(pipe, request, generator=generator, callback=callback)
        else:
            latents = adapter.call(pipe, request, generator=generator, callback=callback, output_type="latent")
            frames = decoder(pipe, adapter, latents, request)
    end = time.perf_counter()
    if frames is None:
        return None
    last_step = marks[-1] if marks else end
    meta = {
        **request.describe(),
        **(metadata or {}),
        "versions": package_versions(),
        "timings": {
            "total_s": round(end - start, 4),
            "until_last_step_s": round(last_step - start, 4),
            "decode_s": round(end - last_step, 4),
        },
    }
    return Video(frames=to_uint8(frames), fps=request.fps, metadata=meta)
