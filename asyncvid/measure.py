"""Sampling for comparison: final latents, decoded frames and timings of one request, sequential or on ranks.

Used by the benchmark and the tests; both compare a parallel run with a sequential one of the same seed.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from .fidelity import psnr  # noqa: F401  (re-exported: the tests compare frames through it)
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
    end_s: float = 0.0  # the whole call: encoding, loop and decoding (median, like loop_s)
    peak_bytes: list[int] = field(default_factory=list)  # per rank: peak RSS on the CPU, peak allocated on CUDA
    unet_s: float = 0.0  # of the loop, inside the UNet's forward (sequential runs only)
    parataa: dict = field(default_factory=dict)  # rounds, windows and evaluations (ParaTAA runs only)


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
        frames = _decode(pipe, adapter, latents, request, decoder)
        end = time.perf_counter()
    return latents, (None if frames is None else to_uint8(frames)), loop_end - start, end - loop_end


def _decode(pipe, adapter, latents, request, decoder):
    if decoder is not None:
        return decoder(pipe, adapter, latents, request)
    return adapter.decode(pipe, latents, request, 0, latents.shape[adapter.FRAME_DIM])


def peak_bytes(device: torch.device) -> int:
    """This process's peak memory: resident set on the CPU (Linux reports KiB), allocated memory on CUDA."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class UNetClock:
    """Time spent inside the UNet's forward, summed over calls (forward hooks; removed by `close`)."""

    def __init__(self, unet, device: torch.device):
        self.total, self.device, self._start = 0.0, device, 0.0
        self._handles = [unet.register_forward_pre_hook(self._pre), unet.register_forward_hook(self._post)]

    def _pre(self, module, args):
        _sync(self.device)
        self._start = time.perf_counter()

    def _post(self, module, args, out):
        _sync(self.device)
        self.total += time.perf_counter() - self._start

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sequential_sample(model: str, request, *, device=None, dtype=torch.float32, repeats: int = 1,
                      scheduler: str | None = None) -> Sample:
    """Sequential sampling in this process (threads as set by the caller); with repeats > 1, a warm-up run and the
    median loop time of `repeats` more."""
    from .pipelines import load_pipeline

    device = device or torch.device("cpu")
    pipe, adapter, _ = load_pipeline(model, device=device, dtype=dtype)
    set_scheduler(pipe, scheduler)
    clock = UNetClock(pipe.unet, device)
    unet_s = []

    def once():
        clock.total = 0.0
        out = sample(pipe, adapter, request)
        unet_s.append(clock.total)
        return out

    runs = _runs(once, repeats)
    clock.close()
    latents, frames, _, decode_s = runs[-1]
    return Sample(latents, frames, statistics.median(r[2] for r in runs), decode_s,
                  end_s=statistics.median(r[2] + r[3] for r in runs), peak_bytes=[peak_bytes(device)],
                  unet_s=statistics.median(unet_s[-len(runs):]))


def _runs(once, repeats: int) -> list:
    if repeats > 1:
        once()  # warm-up: first-call allocations and lazy initialisation
    return [once() for _ in range(repeats)]


def _slowest(value: float, device) -> float:
    """The largest value over ranks: a loop ends when the slowest rank's does."""
    t = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


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
    loop_s = _slowest(statistics.median(r[2] for r in runs), rank.device)
    end_s = _slowest(statistics.median(r[2] + r[3] for r in runs), rank.device)
    state = staged.hook.state
    sent = state.bytes_sent
    if config.cfg_parallel:  # each rank also sends its half of every noise prediction to its counterpart
        sent += request.num_inference_steps * latents.numel() * latents.element_size()
    info = [None] * rank.world_size
    dist.all_gather_object(info, (sent, staged.weight_share, state.compute_s / max(state.hook_s, 1e-9),
                                  peak_bytes(rank.device)))
    if rank.rank != 0:
        return None
    return Sample(latents, frames, loop_s, decode_s, [i[0] for i in info], [i[1] for i in info],
                  [i[2] for i in info], end_s=end_s, peak_bytes=[i[3] for i in info])


def parataa_sample(rank, model: str, request, config, dtype=torch.float32, repeats: int = 1,
                   scheduler: str | None = None) -> Sample | None:
    """ParaTAA sampling on this rank (call through `launch.run`); every rank holds the whole pipeline and computes
    its share of each round's batch. Rank 0 returns the Sample (with the solver's record), others None."""
    from .jobs import quiet_libraries
    from .parallel_decode import parallel_decode
    from .parataa_run import report, sample as parataa_run
    from .pipelines import load_pipeline

    quiet_libraries()
    pipe, adapter, _ = load_pipeline(model, device=rank.device, dtype=dtype)
    set_scheduler(pipe, scheduler)
    solved = []

    def once():
        start = time.perf_counter()
        latents, solution, branches = parataa_run(pipe, adapter, request, config, rank=rank)
        loop_end = time.perf_counter()
        with torch.inference_mode():
            frames = _decode(pipe, adapter, latents, request, parallel_decode)
        solved.append((solution, branches))
        return latents, (None if frames is None else to_uint8(frames)), loop_end - start, time.perf_counter() - loop_end

    runs = _runs(once, repeats)
    latents, frames, _, decode_s = runs[-1]
    loop_s = _slowest(statistics.median(r[2] for r in runs), rank.device)
    end_s = _slowest(statistics.median(r[2] + r[3] for r in runs), rank.device)
    solution, branches = solved[-1]
    record = report(solution, request.num_inference_steps, branches)
    # Each round all-gathers every rank's padded share of the window's rows (one noise prediction each).
    rows = [-(-(r.hi - r.lo) * branches // rank.world_size) for r in solution.rounds]
    sent = sum(rows) * latents.numel() * latents.element_size()
    info = [None] * rank.world_size
    dist.all_gather_object(info, peak_bytes(rank.device))
    if rank.rank != 0:
        return None
    return Sample(latents, frames, loop_s, decode_s, [sent] * rank.world_size, [1.0] * rank.world_size, [],
                  end_s=end_s, peak_bytes=list(info), parataa={**record, "branches": branches})
