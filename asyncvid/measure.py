"""Sampling for comparison: final latents, decoded frames and timings of one request, sequential or on ranks.

Used by the benchmark and the tests; both compare a parallel run with a sequential one of the same seed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from .generate import reset_sampler_state, to_uint8
from .schedulers import set_scheduler


@dataclass
class Sample:
    """One sampled video: final latents, uint8 frames, and what it cost."""

    latents: torch.Tensor
    frames: np.ndarray
    loop_s: float  # the pipeline call up to the end of its last denoising step
    decode_s: float
    bytes_sent: list[int] = field(default_factory=list)  # per rank, during one loop
    weight_share: list[float] = field(default_factory=list)  # of the UNet's parameters held, per rank
    compute_share: list[float] = field(default_factory=list)  # of the time in the UNet hook spent computing, per rank


def sample(pipe, adapter, request, *, decoder=None) -> tuple[torch.Tensor, np.ndarray | None, float, float]:
    """(latents, frames, loop seconds, decode seconds) of one request through the pipeline's own loop."""
    reset_sampler_state(pipe)
    generator = torch.Generator("cpu").manual_seed(request.seed)
    marks = []

    def callback(pipeline, step, timestep, tensors):
        marks.append(time.perf_counter())
        return tensors

    with torch.inference_mode():
        start = time.perf_counter()
        latents = adapter.call(pipe, request, generator=generator, callback=callback, output_type="latent")
        loop_end = marks[-1] if marks else time.perf_counter()
        if decoder is not None:
            frames = decoder(pipe, adapter, latents, request)
        else:
            frames = adapter.decode(pipe, latents, request, 0, latents.shape[adapter.FRAME_DIM])
        end = time.perf_counter()
    return latents, (None if frames is None else to_uint8(frames)), loop_end - start, end - loop_end


def sequential_sample(model: str, request, *, device=None, dtype=torch.float32, repeats: int = 1,
                      scheduler: str | None = None) -> Sample:
    """Sequential sampling in this process (threads as set by the caller); with repeats > 1, a warm-up run and the
    median loop time of `repeats` more."""
    from .pipelines import load_pipeline

    pipe, adapter, _ = load_pipeline(model, device=device or torch.device("cpu"), dtype=dtype)
    set_scheduler(pipe, scheduler)
    runs = _runs(lambda: sample(pipe, adapter, request), repeats)
    latents, frames, _, decode_s = runs[-1]
    return Sample(latents, frames, statistics.median(r[2] for r in runs), decode_s)


def _runs(once, repeats: int) -> list:
    if repeats > 1:
        once()  # warm-up: first-call allocations and lazy initialisation
    return [once() for _ in range(repeats)]


def asyncdiff_sample(rank, model: str, request, config, dtype=torch.float32, repeats: int = 1,
                     scheduler: str | None = None) -> Sample | None:
    """AsyncDiff sampling on this rank (call through `launch.run`); rank 0 returns the Sample, others None."""
    from .asyncdiff_setup import setup_asyncdiff
    from .jobs import quiet_libraries
    from .parallel_decode import parallel_decode
    from .pipelines import adapter_for, resolve_model, units_for

    quiet_libraries()
    folder = resolve_model(model)
    adapter = adapter_for(folder)
    shape = {"frames": request.num_frames, "height": request.height, "width": request.width}
    staged = setup_asyncdiff(folder, adapter, units_for, config, shape=shape, device=rank.device, dtype=dtype,
                             settings={"model": model, "request": request.describe(), "config": config.describe()},
                             scheduler=scheduler)
    runs = _runs(lambda: sample(staged.pipe, adapter, request, decoder=parallel_decode), repeats)
    latents, frames, _, decode_s = runs[-1]
    loop_s = torch.tensor(statistics.median(r[2] for r in runs), dtype=torch.float64, device=rank.device)
    dist.all_reduce(loop_s, op=dist.ReduceOp.MAX)  # the loop ends when the slowest rank's does
    state = staged.hook.state
    info = [None] * rank.world_size
    dist.all_gather_object(info, (state.bytes_sent, staged.weight_share, state.compute_s / max(state.hook_s, 1e-9)))
    if rank.rank != 0:
        return None
    return Sample(latents, frames, float(loop_s), decode_s, [i[0] for i in info], [i[1] for i in info],
                  [i[2] for i in info])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of uint8 frames, in dB (inf when identical)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
