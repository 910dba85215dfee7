"""Sampling for comparison: final latents, decoded frames, timings and costs of one request, sequential or on ranks.

Used by the benchmark and the tests; both compare a parallel run with a sequential one of the same seed. Every
sample comes from the loader and loop the CLI and the notebook use (asyncvid.runtime.loaders), repeated and timed.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from asyncvid.eval.fidelity import psnr  # noqa: F401  (re-exported: the tests compare frames through it)
from asyncvid.models.devices import synchronize
from asyncvid.runtime.generate import Sampled
from asyncvid.runtime.loaders import ModelSpec, load_sampler


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
        synchronize(self.device)
        self._start = time.perf_counter()

    def _post(self, module, args, out):
        synchronize(self.device)
        self.total += time.perf_counter() - self._start

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def sequential_sample(model: str, request, *, device=None, dtype=torch.float32, repeats: int = 1,
                      scheduler: str | None = None) -> Sample:
    """Sequential sampling in this process (threads as set by the caller); with repeats > 1, a warm-up run and the
    median loop time of `repeats` more."""
    device = device or torch.device("cpu")
    loaded = load_sampler(None, ModelSpec(model, device=str(device), dtype=_name(dtype), scheduler=scheduler))
    clock = UNetClock(loaded.pipe.unet, device)
    unet_s = []

    def once():
        clock.total = 0.0
        out = loaded.sample(request)
        unet_s.append(clock.total)
        return out

    runs = _runs(once, repeats)
    clock.close()
    last = runs[-1]
    return Sample(last.latents, last.frames, statistics.median(r.loop_s for r in runs), last.decode_s,
                  end_s=statistics.median(r.total_s for r in runs), peak_bytes=[peak_bytes(device)],
                  unet_s=statistics.median(unet_s[-len(runs):]))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _runs(once, repeats: int) -> list[Sampled]:
    if repeats > 1:
        once()  # warm-up: first-call allocations and lazy initialisation
    return [once() for _ in range(repeats)]


def _slowest(value: float, device) -> float:
    """The largest value over ranks: a loop ends when the slowest rank's does."""
    t = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _loaded(rank, model: str, request, config, dtype, scheduler):
    """The sampler as the CLI loads it, its stage split balanced for this request's shape."""
    spec = ModelSpec(model, config, dtype=_name(dtype), scheduler=scheduler,
                     plan_shape=(request.num_frames, request.height, request.width))
    return load_sampler(rank, spec)


def asyncdiff_sample(rank, model: str, request, config, dtype=torch.float32, repeats: int = 1,
                     scheduler: str | None = None) -> Sample | None:
    """AsyncDiff sampling on this rank (call through `launch.run`); rank 0 returns the Sample, others None."""
    loaded = _loaded(rank, model, request, config, dtype, scheduler)
    runs = _runs(lambda: loaded.sample(request), repeats)
    last = runs[-1]
    loop_s = _slowest(statistics.median(r.loop_s for r in runs), rank.device)
    end_s = _slowest(statistics.median(r.total_s for r in runs), rank.device)
    state = loaded.hook.state
    sent = state.bytes_sent
    if config.cfg_parallel:  # each rank also sends its half of every noise prediction to its counterpart
        sent += request.num_inference_steps * last.latents.numel() * last.latents.element_size()
    info = [None] * rank.world_size
    dist.all_gather_object(info, (sent, loaded.weight_share, state.compute_s / max(state.hook_s, 1e-9),
                                  peak_bytes(rank.device)))
    if rank.rank != 0:
        return None
    return Sample(last.latents, last.frames, loop_s, last.decode_s, [i[0] for i in info], [i[1] for i in info],
                  [i[2] for i in info], end_s=end_s, peak_bytes=[i[3] for i in info])


def parataa_sample(rank, model: str, request, config, dtype=torch.float32, repeats: int = 1,
                   scheduler: str | None = None) -> Sample | None:
    """ParaTAA sampling on this rank (call through `launch.run`); every rank holds the whole pipeline and computes
    its share of each round's batch. Rank 0 returns the Sample (with the solver's record), others None."""
    loaded = _loaded(rank, model, request, config, dtype, scheduler)
    runs = _runs(lambda: loaded.sample(request), repeats)
    last = runs[-1]
    loop_s = _slowest(statistics.median(r.loop_s for r in runs), rank.device)
    end_s = _slowest(statistics.median(r.total_s for r in runs), rank.device)
    record = last.record["parataa"]
    # Each round all-gathers every rank's padded share of the window's rows (one noise prediction each).
    rows = [-(-(hi - lo) * record["branches"] // rank.world_size) for lo, hi in (r["window"] for r in record["per_round"])]
    sent = sum(rows) * last.latents.numel() * last.latents.element_size()
    info = [None] * rank.world_size
    dist.all_gather_object(info, peak_bytes(rank.device))
    if rank.rank != 0:
        return None
    return Sample(last.latents, last.frames, loop_s, last.decode_s, [sent] * rank.world_size,
                  [1.0] * rank.world_size, [], end_s=end_s, peak_bytes=list(info), parataa=record)
