"""One video from a loaded pipeline: seed the generator, run the pipeline's own loop to latents, decode, time it.

Every sampler that keeps the pipeline's loop (sequential, AsyncDiff) samples through `sample`; ParaTAA, which solves
the trajectory itself, returns the same `Sampled`. The CLI, the notebook API, the tests and the benchmark all take
their videos from here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Callable

import numpy as np
import torch

from asyncvid.models.devices import synchronize
from asyncvid.video.frames import Video, to_uint8

StepCallback = Callable[..., None]  # (steps done, steps total[, note: what the sampler is doing, e.g. its round])
# decoder(pipe, adapter, latents, request) -> float frames, or None on ranks that do not gather them
Decoder = Callable[..., "np.ndarray | None"]


@dataclass
class Sampled:
    """One request's result on one rank: final latents, uint8 frames (None where not gathered), phase timings."""

    latents: torch.Tensor
    frames: np.ndarray | None
    loop_s: float  # from the call to the end of the last denoising step
    decode_s: float
    record: dict = field(default_factory=dict)  # what the sampler adds to the sidecar (ParaTAA: its rounds)

    @property
    def total_s(self) -> float:
        return self.loop_s + self.decode_s

    def video(self, request, metadata: dict) -> Video | None:
        """The Video with its sidecar metadata (request, frames made, `metadata`, threads, versions, timings); None
        where no frames."""
        if self.frames is None:
            return None
        timings = {"total_s": round(self.total_s, 4), "until_last_step_s": round(self.loop_s, 4),
                   "decode_s": round(self.decode_s, 4)}
        # The request may leave sizes to the model (None); the record holds what was made, and the CPU threads,
        # which decide the float rounding (the settings compared on resume stay the request's own).
        made = {"num_frames": int(self.frames.shape[0]), "height": int(self.frames.shape[1]),
                "width": int(self.frames.shape[2])}
        meta = {**request.describe(), **made, **metadata, "cpu_threads": torch.get_num_threads(),
                "versions": package_versions(), "timings": timings, **self.record}
        return Video(frames=self.frames, fps=request.fps, metadata=meta)


def package_versions() -> dict[str, str]:
    """Versions that decide the output bits, recorded in every sidecar."""
    found = {}
    for name in ("asyncvid", "torch", "diffusers", "transformers", "av"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "unknown"
    return found


def reset_sampler_state(pipe) -> None:
    """Per-call state of samplers hooked into the UNet starts fresh (the pipelines do not reset hooks)."""
    registry = getattr(pipe.unet, "_diffusers_hook", None)
    if registry is not None:
        registry.reset_stateful_hooks()


def sample(pipe, adapter, request, *, on_step: StepCallback | None = None, decoder: Decoder | None = None) -> Sampled:
    """Sample `request` with the pipeline's own loop, then decode (with `decoder`: in parallel across ranks)."""
    adapter.check(pipe, request)
    reset_sampler_state(pipe)
    # A CPU generator gives the same noise on every device, so CPU and GPU runs start from the same latents.
    generator = torch.Generator("cpu").manual_seed(request.seed)
    marks: list[float] = []

    def callback(pipeline, step, timestep, tensors):
        # CUDA runs ahead of the host clock: time the step's work, not its launch.
        synchronize(next((t.device for t in tensors.values() if torch.is_tensor(t)), None))
        marks.append(time.perf_counter())
        if on_step is not None:
            on_step(step + 1, request.num_inference_steps)
        return tensors

    start = time.perf_counter()
    with torch.inference_mode():
        latents = adapter.call(pipe, request, generator=generator, callback=callback, output_type="latent")
        loop_end = marks[-1] if marks else time.perf_counter()
        frames = decode(pipe, adapter, latents, request, decoder)
    synchronize(latents.device)
    end = time.perf_counter()
    return Sampled(latents, None if frames is None else to_uint8(frames), loop_end - start, end - loop_end)


def decode(pipe, adapter, latents: torch.Tensor, request, decoder: Decoder | None = None) -> np.ndarray | None:
    """Float frames of `latents`: by `decoder` where given, else every frame here with the pipeline's VAE code."""
    with torch.inference_mode():
        if decoder is not None:
            return decoder(pipe, adapter, latents, request)
        return adapter.decode(pipe, latents, request, 0, latents.shape[adapter.FRAME_DIM])
